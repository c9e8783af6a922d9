"""The DALI loader (CPU pipelines here): the torch loader's contract, alignment, ranks, resume, skips."""

import pickle
import sys

import numpy as np
import pytest
import torch

from magicseg_engine.train.dali_loader import INSTALL_HINT, import_dali
from magicseg_engine.train.data import IGNORE_INDEX, PairLoader
from magicseg_engine.train.synthetic import parse_class

# The checks shared with the torch loader's tests (pytest puts tests/ on sys.path).
# The runs are the torch loader tests' module fixtures: both loaders are checked on the same data.
from test_train_data import (  # noqa: E402,F401
    VOCABULARY,
    build_bad_run,
    check_coordinate_batch,
    check_exact_resume,
    coordinate_run,
    pixels,
    same_batches,
    shapes_run,
)

try:
    import_dali()
    HAS_DALI = True
except ImportError:  # absent, or installed without the libraries it needs
    HAS_DALI = False
needs_dali = pytest.mark.skipif(
    not HAS_DALI, reason="NVIDIA DALI is not installed (pip install 'magicseg-engine[dali]')")

SIZE = 48


def test_a_missing_dali_names_the_extra_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with pytest.raises(ImportError, match=r"pip install 'magicseg-engine\[dali\]'") as err:
        import_dali()
    assert str(err.value) == INSTALL_HINT


def dali_loader(run, **kwargs):
    from magicseg_engine.train.dali_loader import DaliPairLoader

    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("shuffle_buffer", 16)
    return DaliPairLoader(run, size=SIZE, device_id=None, num_threads=2, **kwargs)


@needs_dali
def test_output_contract_on_the_cpu(shapes_run):
    loader = dali_loader(shapes_run, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 5 and loader.epoch == 1
    b = batches[0]
    assert b["image"].shape == b["twin"].shape == (8, 3, SIZE, SIZE) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (8, SIZE, SIZE) and b["mask"].dtype == torch.int64
    assert b["image"].device.type == "cpu"
    keys = [k for x in batches for k in x["key"]]
    assert sorted(keys) == sorted(PairLoader(shapes_run, batch_size=40).index.key(i) for i in range(40))
    for x in batches:
        for mask, classes in zip(x["mask"], x["classes"]):
            assert set(mask.unique().tolist()) - {IGNORE_INDEX} <= set(range(len(classes) + 1))


@needs_dali
def test_image_twin_and_mask_stay_aligned_under_crop_and_flip(coordinate_run):
    loader = dali_loader(coordinate_run, seed=5, ratio=(0.75, 1.33))
    checked = flipped = 0
    for batch in loader:
        c, f = check_coordinate_batch(batch)
        checked, flipped = checked + c, flipped + f
    assert checked > 5000
    assert 3 <= flipped <= 21


@needs_dali
def test_shapes_sit_where_the_mask_says(shapes_run):
    for batch in dali_loader(shapes_run, seed=2, batch_size=20):
        for image, twin, mask, classes in zip(batch["image"], batch["twin"], batch["mask"], batch["classes"]):
            img, tw, m = pixels(image), pixels(twin), mask.numpy()
            for label, name in enumerate(classes, 1):
                region = m == label
                if region.sum() < 10:
                    continue
                colour = np.asarray(parse_class(name)[1], dtype=np.float64)
                in_image = np.linalg.norm(img[region].mean(0) - colour)
                in_twin = np.linalg.norm(tw[region].mean(0) - colour)
                assert in_image < 80 and in_twin > in_image + 60, (name, in_image, in_twin)


@needs_dali
def test_deterministic_given_the_seed(shapes_run):
    first = list(dali_loader(shapes_run, seed=3))
    same_batches(first, list(dali_loader(shapes_run, seed=3)))
    assert [b["key"] for b in dali_loader(shapes_run, seed=4)] != [b["key"] for b in first]


@needs_dali
def test_ranks_read_disjoint_parts_that_cover_the_run(shapes_run):
    world = 4
    loaders = [dali_loader(shapes_run, seed=7, rank=r, world_size=world, batch_size=4) for r in range(world)]
    orders = []
    for _ in range(2):
        parts = [[k for b in loader for k in b["key"]] for loader in loaders]
        keys = [k for part in parts for k in part]
        assert [len(p) for p in parts] == [10] * world
        assert len(set(keys)) == 40, "ranks overlap or miss samples"
        orders.append(keys)
    assert orders[0] != orders[1], "epochs reshuffle"


@needs_dali
@pytest.mark.parametrize("stop_after", [3, 5, 7])  # mid-epoch, at the epoch's end, in the next epoch
def test_resume_continues_with_the_very_next_batch(shapes_run, stop_after):
    check_exact_resume(lambda: dali_loader(shapes_run, seed=11), stop_after,
                       save=lambda state: pickle.loads(pickle.dumps(state)), stop=lambda loader: loader.close())


@needs_dali
def test_bad_input_is_skipped_and_counted_like_the_torch_loader(tmp_path):
    expected = build_bad_run(tmp_path / "run", corrupt_jpeg=False)  # DALI stops on undecodable bytes
    loader = dali_loader(tmp_path / "run", seed=0, batch_size=4, vocabulary=VOCABULARY, even=False)
    assert dict(loader.skipped) == expected["skipped"]
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == expected["usable"] - 1 and "badmask0" not in keys
    assert dict(loader.skipped) == {**expected["skipped"], **expected["later"]}
    torch_keys = [k for b in PairLoader(tmp_path / "run", batch_size=4, vocabulary=VOCABULARY) for k in b["key"]]
    assert sorted(keys) == sorted(torch_keys)

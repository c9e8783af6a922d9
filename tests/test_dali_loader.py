"""The DALI loader (CPU pipelines here): the torch loader's contract, alignment, ranks, resume, skips.

The GPU pipeline (`mixed` decoding, GPU outputs) runs in the tests marked gpu; here its outputs
are stood in for by lists that, like DALI's GPU TensorLists, numpy can read only through as_cpu().
"""

import json
import pickle
import sys
from collections import Counter

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
    kwargs.setdefault("device_id", None)
    return DaliPairLoader(run, size=SIZE, num_threads=2, **kwargs)


# --------------------------------------------------------------------------- GPU outputs, stood in for

class DeviceMemory:
    """What as_tensor() gives for a GPU list: not host memory, so numpy must not read it."""

    def __array__(self, *args, **kwargs):
        raise TypeError("GPU memory: copy the TensorList to the host with as_cpu() first")


class OldFakeTensorListCPU:
    """A host TensorList of a DALI version whose CPU lists have no as_cpu(): as_tensor() is
    numpy-readable, iteration gives its samples."""

    def __init__(self, samples, calls=None):
        self.samples = list(samples)
        self.calls = calls if calls is not None else []

    def as_tensor(self):
        self.calls.append("cpu.as_tensor")
        return np.stack(self.samples)

    def __iter__(self):
        return iter(self.samples)


class FakeTensorListCPU(OldFakeTensorListCPU):
    """A host TensorList as DALI 2 has it: as_cpu() returns the list itself."""

    def as_cpu(self):
        return self


class FakeTensorListGPU:
    """Stands in for DALI's TensorListGPU, recording calls: its data reaches numpy only
    through the host copy as_cpu() returns."""

    def __init__(self, samples):
        self.samples = [np.asarray(x) for x in samples]
        self.calls: list[str] = []

    def as_cpu(self):
        self.calls.append("as_cpu")
        return FakeTensorListCPU(self.samples, self.calls)

    def as_tensor(self):
        self.calls.append("gpu.as_tensor")
        return DeviceMemory()

    def __iter__(self):
        raise TypeError("GPU TensorList samples cannot be read on the host")


def test_gpu_lists_are_copied_to_the_host_before_numpy_reads_them():
    from magicseg_engine.train.dali_loader import _host, _numpy, _to_torch

    gpu = FakeTensorListGPU([np.arange(3), np.arange(3, 6)])
    np.testing.assert_array_equal(_numpy(gpu), [[0, 1, 2], [3, 4, 5]])
    assert gpu.calls == ["as_cpu", "cpu.as_tensor"]  # the GPU list's own as_tensor is never read
    gpu = FakeTensorListGPU([np.ones((2, 2), np.float32)])
    out = _to_torch(gpu, torch.device("cpu"))
    assert out.dtype == torch.float32 and out.shape == (1, 2, 2) and gpu.calls == ["as_cpu", "cpu.as_tensor"]
    # Host lists are read where they are, with or without as_cpu().
    for cpu in (FakeTensorListCPU([np.zeros(2)]), OldFakeTensorListCPU([np.zeros(2)])):
        assert _host(cpu) is cpu
        np.testing.assert_array_equal(_numpy(cpu), [[0.0, 0.0]])


@needs_dali
def test_real_cpu_lists_pass_through_the_host_helper():
    from nvidia.dali.backend import TensorListCPU

    from magicseg_engine.train.dali_loader import _host, _numpy

    tensors = TensorListCPU(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert _host(tensors) is tensors
    np.testing.assert_array_equal(_numpy(tensors), [[0, 1, 2], [3, 4, 5]])


def test_a_batch_of_gpu_outputs_converts_like_a_cpu_one():
    """_convert on what the mixed pipeline gives: images, masks and the label maximum on the
    GPU, the metadata and peeked shapes on the host; a mask with a label beyond its classes is
    still caught from the GPU maximum."""
    from magicseg_engine.train.dali_loader import DaliPairLoader

    rng = np.random.default_rng(0)
    classes = [["red circle"], ["red circle", "blue square"], ["green triangle"]]
    tops = [1, 5, 1]  # sample 1's mask says label 5, beyond its 2 classes
    image = FakeTensorListGPU(rng.standard_normal((3, 3, 4, 4)).astype(np.float32))
    twin = FakeTensorListGPU(rng.standard_normal((3, 3, 4, 4)).astype(np.float32))
    labels = FakeTensorListGPU(rng.integers(0, 2, (3, 4, 4, 1), dtype=np.uint8))
    top_label = FakeTensorListGPU(np.array(tops, dtype=np.uint8))
    meta = FakeTensorListCPU([np.frombuffer(json.dumps({"classes": c}).encode(), np.uint8) for c in classes])
    source = FakeTensorListCPU([np.frombuffer(f"s.tar:{i}:key{i}.pos.jpg".encode(), np.uint8) for i in range(3)])
    shapes = [FakeTensorListCPU([np.array([64, 64, 3])] * 3) for _ in range(3)]

    loader = object.__new__(DaliPairLoader)  # _convert needs the device and the skip counts only
    loader.device, loader.skipped = torch.device("cpu"), Counter()
    batch = loader._convert((image, twin, labels, meta, source, top_label, *shapes), count=3)

    assert batch["key"] == ["key0", "key2"] and batch["classes"] == [classes[0], classes[2]]
    assert loader.skipped == Counter(bad_mask=1)
    torch.testing.assert_close(batch["image"], torch.from_numpy(np.stack(image.samples)[[0, 2]]))
    torch.testing.assert_close(batch["twin"], torch.from_numpy(np.stack(twin.samples)[[0, 2]]))
    assert batch["mask"].dtype == torch.int64
    np.testing.assert_array_equal(batch["mask"].numpy(), np.stack(labels.samples)[[0, 2], ..., 0])
    for gpu in (image, twin, labels, top_label):
        assert "gpu.as_tensor" not in gpu.calls and gpu.calls.count("as_cpu") == 1, gpu.calls


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
@pytest.mark.slow
def test_bad_input_is_skipped_and_counted_like_the_torch_loader(tmp_path):
    expected = build_bad_run(tmp_path / "run", corrupt_jpeg=False)  # DALI stops on undecodable bytes
    loader = dali_loader(tmp_path / "run", seed=0, batch_size=4, vocabulary=VOCABULARY, even=False)
    assert dict(loader.skipped) == expected["skipped"]
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == expected["usable"] - 1 and "badmask0" not in keys
    assert dict(loader.skipped) == {**expected["skipped"], **expected["later"]}
    torch_keys = [k for b in PairLoader(tmp_path / "run", batch_size=4, vocabulary=VOCABULARY) for k in b["key"]]
    assert sorted(keys) == sorted(torch_keys)


# --------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@needs_dali
def test_mixed_decoding_on_the_gpu(shapes_run, tmp_path):
    """device_id set: the mixed decoder's GPU outputs reach torch on the GPU, in the CPU
    pipeline's order, and the label check reads the GPU-decoded masks."""
    loader = dali_loader(shapes_run, seed=0, device_id=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    b = batches[0]
    assert b["image"].device.type == b["twin"].device.type == b["mask"].device.type == "cuda"
    assert b["image"].shape == b["twin"].shape == (8, 3, SIZE, SIZE) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (8, SIZE, SIZE) and b["mask"].dtype == torch.int64
    on_cpu = list(dali_loader(shapes_run, seed=0))
    assert [x["key"] for x in batches] == [x["key"] for x in on_cpu]  # the reader runs on the host either way
    for x in batches:
        for mask, classes in zip(x["mask"], x["classes"]):
            assert set(mask.unique().tolist()) - {IGNORE_INDEX} <= set(range(len(classes) + 1))

    expected = build_bad_run(tmp_path / "run", corrupt_jpeg=False)
    loader = dali_loader(tmp_path / "run", seed=0, batch_size=4, vocabulary=VOCABULARY, even=False, device_id=0)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == expected["usable"] - 1 and "badmask0" not in keys
    assert dict(loader.skipped) == {**expected["skipped"], **expected["later"]}

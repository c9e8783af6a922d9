"""The torch training loader: output contract, aligned crops, order, ranks, exact resume, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

from magicseg_engine.data import ShardWriter, iter_samples
from magicseg_engine.train.data import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, PairLoader
from magicseg_engine.train.synthetic import (
    COORDINATE_CELL,
    coordinate_labels,
    parse_class,
    write_coordinate_run,
    write_synthetic_run,
)

SIZE = 48  # output crops; the runs' images are 64 px, so both up- and down-scaling happen


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_run(out, 40, size=64, seed=1, samples_per_shard=16)
    return out


@pytest.fixture(scope="module")
def coordinate_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("coordinates")
    write_coordinate_run(out, 24, size=64, seed=0, samples_per_shard=12)
    return out


def pixels(normalised: torch.Tensor) -> np.ndarray:
    """[3, H, W] CLIP-normalised -> [H, W, 3] float 0-255."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((normalised.cpu() * std + mean) * 255.0).permute(1, 2, 0).numpy()


def check_coordinate_batch(batch: dict, source_size: int = 64) -> tuple[int, int]:
    """Assert that image, twin and mask agree pixel by pixel; return (pixels checked, flipped samples)."""
    checked = flipped = 0
    scale = 255.0 / (source_size - 1)
    for image, twin, mask in zip(batch["image"], batch["twin"], batch["mask"]):
        img, tw, m = pixels(image), pixels(twin), mask.cpu().numpy()
        pad = (image.cpu().abs().sum(0) == 0).numpy()
        assert (m[pad] == IGNORE_INDEX).all(), "padding must be ignore in the mask"
        assert (twin.cpu().abs().sum(0).numpy()[pad] == 0).all(), "twin padded where the image is"
        # The twin went through the very same geometry: same coordinates, blue 0 instead of 200.
        assert np.abs(img[..., :2] - tw[..., :2])[~pad].max() < 3.5  # JPEG: a level or two
        assert (img[..., 2][~pad] > 150).all() and (tw[..., 2][~pad] < 50).all()
        # Continuous source coordinates of each output pixel, from its red and green.
        x, y = img[..., 0] / scale, img[..., 1] / scale
        edge = COORDINATE_CELL * np.round((np.stack([x, y]) + 0.5) / COORDINATE_CELL) - 0.5
        far = (np.abs(np.stack([x, y]) - edge) > 1.5).all(0)  # not near a cell boundary
        far &= (x > 2) & (y > 2) & (x < source_size - 3) & (y < source_size - 3) & ~pad
        expected = coordinate_labels(np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int))
        assert (m[far] == expected[far]).all(), f"{(m[far] != expected[far]).sum()} mask pixels misaligned"
        checked += int(far.sum())
        rows = ~pad.any(1)
        if rows.any():
            flipped += bool(np.median(np.diff(img[rows][:, :, 0], axis=1)) < 0)
    return checked, flipped


def all_batches(loader):
    return [b for b in loader]


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        assert x["classes"] == y["classes"]
        for name in ("image", "twin", "mask"):
            assert torch.equal(x[name], y[name]), name


def check_exact_resume(make, stop_after: int, save, stop=lambda loader: None) -> None:
    """A loader from `make()` stopped after `stop_after` batches and resumed from `save(state)`
    (the state as a checkpoint file would bring it back) gives exactly the batches of two
    uninterrupted epochs. `stop(loader)` shuts the interrupted loader down."""
    reference = make()
    expected = all_batches(reference) + all_batches(reference)

    interrupted = make()
    seen = []
    while len(seen) < stop_after:
        for batch in interrupted:
            seen.append(batch)
            if len(seen) == stop_after:
                break
    state = save(interrupted.state_dict())
    stop(interrupted)
    del interrupted

    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    while resumed.epoch < 2:
        rest += all_batches(resumed)
    same_batches(seen + rest, expected)


# --- contract and alignment ----------------------------------------------------------------------


def test_output_contract(shapes_run):
    loader = PairLoader(shapes_run, batch_size=8, size=SIZE, seed=0)
    batches = all_batches(loader)
    assert len(batches) == len(loader) == 5
    b = batches[0]
    assert b["image"].shape == b["twin"].shape == (8, 3, SIZE, SIZE) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (8, SIZE, SIZE) and b["mask"].dtype == torch.int64
    assert len(b["classes"]) == len(b["key"]) == 8
    keys = [k for x in batches for k in x["key"]]
    assert len(set(keys)) == 40
    for x in batches:
        for mask, classes in zip(x["mask"], x["classes"]):
            labels = set(mask.unique().tolist()) - {IGNORE_INDEX}
            assert labels <= set(range(len(classes) + 1)) and 1 <= len(classes) <= 2


def test_image_twin_and_mask_stay_aligned_under_crop_and_flip(coordinate_run):
    loader = PairLoader(coordinate_run, batch_size=8, size=SIZE, seed=5, scale=(0.5, 2.0), ratio=(0.75, 1.33))
    checked = flipped = 0
    for batch in loader:
        c, f = check_coordinate_batch(batch)
        checked, flipped = checked + c, flipped + f
    assert checked > 5000
    assert 3 <= flipped <= 21  # about half of 24 samples are flipped


def test_shapes_sit_where_the_mask_says(shapes_run):
    for batch in PairLoader(shapes_run, batch_size=20, size=SIZE, seed=2):
        for image, twin, mask, classes in zip(batch["image"], batch["twin"], batch["mask"], batch["classes"]):
            img, tw, m = pixels(image), pixels(twin), mask.numpy()
            for label, name in enumerate(classes, 1):
                region = m == label
                if region.sum() < 10:  # cropped away
                    continue
                colour = np.asarray(parse_class(name)[1], dtype=np.float64)
                # JPEG and resampling blur small shapes' edges into the background: a margin, not equality.
                in_image = np.linalg.norm(img[region].mean(0) - colour)
                in_twin = np.linalg.norm(tw[region].mean(0) - colour)
                assert in_image < 80 and in_twin > in_image + 60, (name, in_image, in_twin)
            background = m == 0
            assert np.abs(img[background] - tw[background]).mean() < 12


def test_evaluation_crops_are_fixed(coordinate_run):
    loader = PairLoader(coordinate_run, batch_size=24, size=SIZE, augment=False, shuffle=False)
    batch = next(iter(loader))
    assert check_coordinate_batch(batch)[1] == 0
    assert all(torch.equal(batch["image"][0], x) for x in batch["image"])
    assert (batch["mask"] != IGNORE_INDEX).float().mean() > 0.9  # no padding: just the ignore cell


# --- order, determinism, ranks ------------------------------------------------------------------


def test_deterministic_given_the_seed_and_independent_of_workers(shapes_run):
    first = all_batches(PairLoader(shapes_run, batch_size=8, size=SIZE, seed=3))
    same_batches(first, all_batches(PairLoader(shapes_run, batch_size=8, size=SIZE, seed=3)))
    same_batches(first, all_batches(PairLoader(shapes_run, batch_size=8, size=SIZE, seed=3, num_workers=2)))
    other = all_batches(PairLoader(shapes_run, batch_size=8, size=SIZE, seed=4))
    assert [b["key"] for b in other] != [b["key"] for b in first]


def test_epochs_reshuffle_and_augment_anew(shapes_run):
    loader = PairLoader(shapes_run, batch_size=40, size=SIZE, seed=3)
    e0, e1 = next(iter(loader)), next(iter(loader))
    assert loader.epoch == 2
    assert e0["key"] != e1["key"] and sorted(e0["key"]) == sorted(e1["key"])
    i, j = e0["key"].index(e1["key"][0]), 0
    assert not torch.equal(e0["image"][i], e1["image"][j])  # another crop of the same sample


@pytest.mark.parametrize("even", [True, False])
def test_ranks_read_disjoint_parts_that_cover_the_run(shapes_run, even):
    world = 3
    loaders = [PairLoader(shapes_run, batch_size=4, size=SIZE, seed=7, rank=r, world_size=world, even=even)
               for r in range(world)]
    for epoch in range(2):
        parts = [[k for b in loader for k in b["key"]] for loader in loaders]
        keys = [k for part in parts for k in part]
        assert len(keys) == len(set(keys)), "ranks overlap"
        if even:
            assert [len(p) for p in parts] == [13, 13, 13]  # 40 samples: one left out, another each epoch
        else:
            assert len(keys) == 40
    assert len({len(loader) for loader in loaders}) == 1 or not even


# --- exact resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_after", [3, 5, 7])  # mid-epoch, at the epoch's end, in the next epoch
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.slow
def test_resume_continues_with_the_very_next_batch(shapes_run, stop_after, workers):
    check_exact_resume(lambda: PairLoader(shapes_run, batch_size=8, size=SIZE, seed=11, num_workers=workers),
                       stop_after, save=lambda state: json.loads(json.dumps(state)))  # a JSON checkpoint


def test_resume_with_another_batch_size_continues_at_the_next_sample(shapes_run):
    reference = [k for b in PairLoader(shapes_run, batch_size=8, size=SIZE, seed=2) for k in b["key"]]
    first = PairLoader(shapes_run, batch_size=8, size=SIZE, seed=2)
    seen = next(iter(first))["key"]
    smaller = PairLoader(shapes_run, batch_size=3, size=SIZE, seed=2, drop_last=True)
    smaller.load_state_dict(first.state_dict())
    rest = [k for b in smaller for k in b["key"]]
    assert seen + rest == reference[:8 + 30]  # drop_last: 32 left, 10 batches of 3


def test_resume_refuses_a_state_of_another_order(shapes_run, tmp_path):
    state = PairLoader(shapes_run, batch_size=8, size=SIZE, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PairLoader(shapes_run, batch_size=8, size=SIZE, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        PairLoader(shapes_run, batch_size=8, size=SIZE, seed=1, world_size=2).load_state_dict(state)
    smaller = tmp_path / "smaller"
    write_synthetic_run(smaller, 10, size=64, seed=1)
    with pytest.raises(ValueError, match="samples"):
        PairLoader(smaller, batch_size=8, size=SIZE, seed=1).load_state_dict(state)


# --- bad input ----------------------------------------------------------------------------------


def build_bad_run(out, *, corrupt_jpeg: bool) -> dict:
    """A run with every kind of bad sample; returns the skip counts expected when indexing
    ("skipped") and while decoding ("later"), and how many samples the index keeps."""
    write_synthetic_run(out, 20, size=64, seed=1, samples_per_shard=20)   # good
    write_synthetic_run(out, 6, size=64, seed=2, masks=False)             # no mask.png
    good = [s for s in iter_samples(out)]
    # A template with two classes, both in VOCABULARY, so only its own defect skips each copy.
    template = next(s for s in good if "mask.png" in s and len(json.loads(s["json"])["classes"]) == 2
                    and set(json.loads(s["json"])["classes"]) <= set(VOCABULARY))
    with ShardWriter(out, 64, prefix="manual") as writer:
        meta = json.loads(template["json"])
        files = {e: template[e] for e in ("pos.jpg", "neg.jpg", "mask.png")}
        flagged = {**meta, "masks": {"counterfactual": {"passed": False, "reason": "twin shows the class"}}}
        writer.add("flagged0", {**files, "json": json.dumps(flagged).encode()})
        writer.add("badjson0", {**files, "json": b"{not json"})
        one_class = {**meta, "classes": meta["classes"][:1]}  # the mask still has label 2
        writer.add("badmask0", {**files, "json": json.dumps(one_class).encode()})
        if corrupt_jpeg:
            writer.add("corrupt0", {**files, "pos.jpg": b"\xff\xd8 not a jpeg", "json": template["json"]})
    write_synthetic_run(out, 8, size=64, seed=3)                          # to be cut short
    cut = sorted((out / "shards").glob("synthetic-0-*.tar"))[-1]
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    metas = [json.loads(s["json"]) for s in good if "mask.png" in s]
    unknown = sum("yellow diamond" in m["classes"] for m in metas)
    return {
        "skipped": {"no_mask": 6, "flagged": 1, "bad_json": 1, "bad_shard": 8, "unknown_class": unknown},
        "later": {"bad_mask": 1, **({"decode_error": 1} if corrupt_jpeg else {})},
        "usable": 20 - unknown + 1 + (1 if corrupt_jpeg else 0),
    }


VOCABULARY = ["red circle", "green square", "blue triangle"]


def test_bad_input_is_skipped_and_counted(tmp_path, caplog):
    expected = build_bad_run(tmp_path / "run", corrupt_jpeg=True)
    loader = PairLoader(tmp_path / "run", batch_size=4, size=SIZE, seed=0, vocabulary=VOCABULARY)
    assert len(loader.index) == expected["usable"]
    assert dict(loader.skipped) == expected["skipped"]
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == expected["usable"] - 2 and not {"corrupt0", "badmask0"} & set(keys)
    assert dict(loader.skipped) == {**expected["skipped"], **expected["later"]}
    assert "skipping" in caplog.text and "bad_shard" in caplog.text
    # Without a vocabulary and keeping flagged pairs, those samples are used.
    lenient = PairLoader(tmp_path / "run", batch_size=4, size=SIZE, skip_flagged=False)
    assert "flagged" not in lenient.skipped and "unknown_class" not in lenient.skipped
    assert len(lenient.index) == expected["usable"] + expected["skipped"]["unknown_class"] + 1


def test_a_run_without_usable_samples_is_refused(tmp_path):
    write_synthetic_run(tmp_path, 4, size=64, seed=1, masks=False)
    with pytest.raises(ValueError, match="no_mask"):
        PairLoader(tmp_path, batch_size=2, size=SIZE)


def test_unlisted_shards_are_not_read(shapes_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shapes_run, run)
    shutil.copy(run / "shards" / "synthetic-0-000000.tar", run / "shards" / "synthetic-1-000000.tar")
    assert len(PairLoader(run, batch_size=8, size=SIZE).index) == 40


def test_shard_scan_reads_plain_headers_and_falls_back_to_tarfile(tmp_path):
    import io
    import tarfile

    from magicseg_engine.train.data import _scan_members

    def write(path, fmt, pax=None):
        with tarfile.open(path, "w", format=fmt) as tar:
            for key in ("a0", "b1"):
                for ext, data in (("pos.jpg", b"p" * 700), ("json", b'{"classes": ["x"]}')):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    if pax:
                        info.pax_headers = pax
                    tar.addfile(info, io.BytesIO(data))

    plain, extended = tmp_path / "plain.tar", tmp_path / "pax.tar"
    write(plain, tarfile.USTAR_FORMAT)
    write(extended, tarfile.PAX_FORMAT, {"comment": "a pax header the fast reader leaves to tarfile"})
    order, members, jsons = _scan_members(plain, ["pos.jpg", "json"])
    assert order == ["a0", "b1"] and jsons["b1"] == b'{"classes": ["x"]}'
    assert members["a0"]["pos.jpg"] == (512, 700)
    pax_order, pax_members, pax_jsons = _scan_members(extended, ["pos.jpg", "json"])
    assert (pax_order, pax_jsons) == (order, jsons)
    with open(plain, "r+b") as f:  # cut inside the last member's data
        f.truncate(512 * 5)
    with pytest.raises(tarfile.ReadError):
        _scan_members(plain, ["pos.jpg", "json"])

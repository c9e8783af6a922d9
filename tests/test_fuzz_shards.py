"""Damaged shards, damaged samples inside whole shards, manifest edge cases and foreign checkpoints,
through the reading code of pretrain (the loader's index and decoding), report, export and masks
(`iter_samples`). What each reader promises for damaged data:

- the pretraining loader skips what cannot make a training sample and counts it by reason
  (train/data.py's docstring): it never raises for bad data;
- report skips an unreadable shard whole and lists it, and an undecodable pair is listed as
  unreadable (report/gather.py, report/build.py); only a run with nothing readable is refused;
- export and masks stop at the first damaged shard or sample with one UsageError naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.data.encoding import encode_jpeg, encode_png
from magicseg_engine.data.shards import MANIFEST, SHARDS_DIR, RunState, ShardWriter, iter_samples
from magicseg_engine.errors import UsageError
from magicseg_engine.formats.source import ShardRef, iter_pairs
from magicseg_engine.report.gather import gather_run
from magicseg_engine.report.thumbnails import class_colours, pair_images
from magicseg_engine.train.data import Augment, PairDataset, build_index
from magicseg_engine.train.synthetic import write_synthetic_run

CLASSES = ("red circle", "green square", "blue triangle", "yellow diamond")


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Four 16-pixel samples in two shards of two: small enough to copy for every example."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    write_synthetic_run(run, 4, size=16, samples_per_shard=2)
    return run


def manifest_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / MANIFEST).read_text().splitlines()]


def relist(run: Path, index: int, data: bytes, keys: list[str] | None = None) -> None:
    """Make manifest line `index` match `data`, as if the damage had happened before the line was
    written: the size and sha256 checks then pass and the readers meet the damage itself."""
    lines = manifest_lines(run)
    lines[index].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    if keys is not None:
        lines[index]["keys"] = keys
    (run / MANIFEST).write_text("".join(json.dumps(x) + "\n" for x in lines))


def read_everything(run: Path) -> dict:
    """Every reader over `run`; what each ended in. Any exception but UsageError fails the test."""
    outcome = {}
    index = build_index(run)  # never raises for damaged data: skips and counts
    dataset = PairDataset(index, Augment(size=16), seed=0)
    items = [dataset[i, 0] for i in range(len(index))]
    outcome["train_usable"] = sum(isinstance(x, dict) for x in items)
    outcome["train_skipped"] = dict(index.skipped) | {
        x[1]: sum(1 for y in items if isinstance(y, tuple) and y[1] == x[1]) for x in items if isinstance(x, tuple)}
    try:
        digest = gather_run(run, 4)
        outcome["report"] = (digest.samples, [s.name for s in digest.skipped_shards])
    except UsageError as err:
        assert "\n" not in str(err)
        outcome["report"] = "refused"
    for line in manifest_lines(run):
        try:
            for pair in iter_pairs(ShardRef(run / SHARDS_DIR / line["shard"], line["sha256"], tuple(line["keys"])),
                                   CLASSES):
                pair.labels()
        except UsageError as err:
            assert "\n" not in str(err) and line["shard"] in str(err)
            outcome.setdefault("export", []).append(line["shard"])
    try:
        outcome["iter_samples"] = sum(1 for _ in iter_samples(run))
    except UsageError as err:
        assert "\n" not in str(err) and ".tar" in str(err)
        outcome["iter_samples"] = "refused"
    return outcome


MUTATIONS = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 20479), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 20479), st.just(0)),
    st.tuples(st.just("zero"), st.integers(0, 20479), st.integers(1, 1500)),
    st.tuples(st.just("junk"), st.integers(0, 20479), st.binary(min_size=1, max_size=32)),
), min_size=1, max_size=3)


@fuzz(120)
@given(MUTATIONS, st.booleans())
@pytest.mark.slow
def test_damaged_shard_bytes_are_skipped_counted_or_refused_by_every_reader(pristine, mutations, relisted):
    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            shutil.copytree(pristine, run)
            name = manifest_lines(run)[0]["shard"]
            data = bytearray((run / SHARDS_DIR / name).read_bytes())
            for kind, pos, arg in mutations:
                pos %= max(1, len(data))
                if kind == "flip" and data:
                    data[pos] ^= arg
                elif kind == "cut":
                    del data[pos:]
                elif kind == "zero":
                    data[pos:pos + arg] = bytes(len(data[pos:pos + arg]))
                elif kind == "junk":
                    data[pos:pos + len(arg)] = arg
            (run / SHARDS_DIR / name).write_bytes(bytes(data))
            if relisted:
                relist(run, 0, bytes(data))
            outcome = read_everything(run)
            # The other shard is whole: every reader still has its two samples, or stopped at the
            # damaged one with a line naming it.
            assert outcome["train_usable"] >= 2
            assert outcome["report"] == "refused" or outcome["report"][0] >= 2
    finally:
        logging.disable(logging.NOTSET)


def sample_files(meta: dict, pos: bytes | None = None, mask: bytes | None = None) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    labels = np.zeros((16, 16), np.uint8)
    labels[4:8, 4:8] = 1
    return {"pos.jpg": pos if pos is not None else encode_jpeg(image, 90), "neg.jpg": encode_jpeg(image, 90),
            "mask.png": mask if mask is not None else encode_png(labels), "json": json.dumps(meta).encode()}


GOOD_META = {"classes": ["red circle"], "prompt": "a red circle", "negative_prompt": "nothing", "size": [16, 16],
             "masks": {"classes": [{"name": "red circle", "found": True, "area": 16, "score": 0.9}],
                       "counterfactual": {"passed": True, "quality": 0.8, "threshold": 0.1}}}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5)
IMAGE_BYTES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(["png_rgb", "png_16bit", "jpeg_cut", "png_big_label", "png_other_size"]))


def image_bytes(kind) -> bytes:
    if isinstance(kind, bytes):
        return kind
    buf = io.BytesIO()
    if kind == "png_rgb":
        Image.new("RGB", (16, 16)).save(buf, format="PNG")
    elif kind == "png_16bit":
        Image.fromarray(np.full((16, 16), 300, np.uint16)).save(buf, format="PNG")
    elif kind == "jpeg_cut":
        return encode_jpeg(np.zeros((16, 16, 3), np.uint8), 90)[:100]
    elif kind == "png_big_label":
        return encode_png(np.full((16, 16), 7, np.uint8))
    else:
        return encode_png(np.zeros((9, 5), np.uint8))
    return buf.getvalue()


@fuzz(60)
@given(st.dictionaries(st.sampled_from(["classes", "prompt", "negative_prompt", "size", "masks", "mask_source"]),
                       JSON_VALUES, max_size=4),
       st.one_of(st.none(), IMAGE_BYTES), st.one_of(st.none(), IMAGE_BYTES))
@pytest.mark.slow
def test_damaged_samples_inside_whole_shards(tmp_path, overrides, pos, mask):
    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            with ShardWriter(run, samples_per_shard=2) as writer:
                writer.add("good1", sample_files(GOOD_META))
                writer.add("bad", sample_files({**GOOD_META, **overrides},
                                               None if pos is None else image_bytes(pos),
                                               None if mask is None else image_bytes(mask)))
                writer.add("good2", sample_files(GOOD_META))
            outcome = read_everything(run)
            # The good samples always train; the bad one trains only if it is fine after all.
            assert outcome["train_usable"] >= 2
            assert outcome["report"] != "refused" and outcome["report"][0] >= 1
            digest = gather_run(run, 3)
            colours = class_colours(list(digest.classes))
            for ref in digest.chosen:
                try:  # build_report lists a pair whose images fail like this as unreadable
                    pair_images(ref, colours)
                except (ValueError, OSError):
                    pass
    finally:
        logging.disable(logging.NOTSET)


def test_a_truncated_shard_through_export_and_report_clis(pristine, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    name = manifest_lines(run)[1]["shard"]
    data = (run / SHARDS_DIR / name).read_bytes()[:3000]
    (run / SHARDS_DIR / name).write_bytes(data)
    relist(run, 1, data)
    index = build_index(run)
    assert len(index) == 2 and index.skipped == {"bad_shard": 2}
    report = invoke("report", "--data", run, "--out", tmp_path / "r.html")
    assert report.exit_code == 0, report.output
    assert name in (tmp_path / "r.html").read_text()
    # webdataset stops at the cut without an error; the keys of the manifest line tell.
    with pytest.raises(UsageError, match=f"shard .*{name} does not hold the samples its manifest.jsonl line lists"):
        list(iter_samples(run))


# --- manifest and shard edge cases -------------------------------------------------------------------

def test_a_manifest_listing_a_key_twice(pristine, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    lines = manifest_lines(run)
    lines[0]["keys"] = [lines[0]["keys"][0]] * 2
    (run / MANIFEST).write_text("".join(json.dumps(x) + "\n" for x in lines))
    # Strict readers (generate's resume, export, masks) refuse it in one line naming the line...
    with pytest.raises(UsageError, match=r"manifest.jsonl line 1 is not a shard entry \('keys' lists sample \w+ twice\)"):
        RunState.load(run, repair=False)
    # ...the loader counts the line as bad and trains on the other shard, and report lists it.
    index = build_index(run)
    assert len(index) == 2 and index.skipped == {"bad_manifest_line": 1}
    digest = gather_run(run, 4)
    assert digest.samples == 2 and "lists sample" in digest.skipped_manifest_lines[0]


def test_an_unlisted_shard_whose_keys_are_already_listed(pristine, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    first = manifest_lines(run)[0]["shard"]
    copy = first.replace("-000000.tar", "-000007.tar")
    shutil.copy(run / SHARDS_DIR / first, run / SHARDS_DIR / copy)
    # Readers read listed shards only: the copy is counted as in progress, never read twice.
    assert len(build_index(run)) == 4 and sum(1 for _ in iter_samples(run)) == 4
    assert gather_run(run, 4).samples == 4
    # A resume (a load that repairs) refuses to list it, naming it and what to do.
    with pytest.raises(UsageError, match=f"shard .*{copy} is not in manifest.jsonl and holds samples that listed "
                                         "shards already hold; delete it"):
        RunState.load(run)
    assert len(manifest_lines(run)) == 2


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_non_contiguous_members_of_one_sample(tmp_path):
    run = tmp_path / "run"
    with ShardWriter(run, samples_per_shard=1) as writer:
        writer.add("first", sample_files(GOOD_META))
    a, b = sample_files(GOOD_META), sample_files({**GOOD_META, "classes": ["green square"],
                                                  "masks": {"classes": [{"name": "green square"}]}})
    # Sample "a1" is split around "b1": its json and pos.jpg first, its neg.jpg and mask.png last.
    members = [("a1.json", a["json"]), ("a1.pos.jpg", a["pos.jpg"]),
               *((f"b1.{ext}", b[ext]) for ext in sorted(b)),
               ("a1.mask.png", a["mask.png"]), ("a1.neg.jpg", a["neg.jpg"])]
    name = "magicseg-0-000001.tar"
    data = write_tar(run / SHARDS_DIR / name, members)
    with open(run / MANIFEST, "a") as f:
        f.write(json.dumps({"shard": name, "keys": ["a1", "b1"], "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()}) + "\n")
    # Readers by offset (the loader, report) find every member where the headers say it is.
    index = build_index(run)
    assert [index.key(i) for i in range(len(index))] == ["first", "a1", "b1"] and not index.skipped
    item = PairDataset(index, Augment(size=16, enabled=False), seed=0)[1, 0]
    assert isinstance(item, dict) and item["classes"] == ["red circle"]
    assert gather_run(run, 4).samples == 3
    # Stream readers (export, masks) would see two half samples: one line naming the shard.
    with pytest.raises(UsageError, match=f"shard .*{name}: the files of sample a1 are not together"):
        list(iter_samples(run))
    line = manifest_lines(run)[1]
    with pytest.raises(UsageError, match=f"{name}"):
        list(iter_pairs(ShardRef(run / SHARDS_DIR / name, line["sha256"], tuple(line["keys"])), CLASSES))
    # And a resume refuses to recover such a shard when it is not listed.
    (run / MANIFEST).write_text((run / MANIFEST).read_text().splitlines()[0] + "\n")
    with pytest.raises(UsageError, match="members of sample a1 are not contiguous"):
        RunState.load(run)


# --- checkpoints -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    write_synthetic_run(base / "data", 8, size=32, seed=1, samples_per_shard=8)
    result = invoke("pretrain", "--data", base / "data", "--out", base / "out", "--steps", 1, "--checkpoint-every", 1,
                    "--batch-size", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return base


def tampered(trained: Path, tmp_path: Path, change) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained / "out", out)
    path = next((out / "checkpoints").iterdir())
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    return out


def _shrink_first(state):
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name][..., :1].clone()


def _drop_loader_key(state):
    del state["loader"]["consumed"]


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (_shrink_first, "holds weights of another model than its configuration describes (Error(s) in loading"),
    (lambda s: s["model"].pop(next(iter(s["model"]))), "holds weights of another model"),
    (lambda s: s["model"].update({"extra.weight": torch.zeros(2)}), "holds weights of another model"),
    (lambda s: s.update(model=[1, 2]), "is damaged (no model weights)"),
    (lambda s: s.update(step="7"), "is damaged (no step number)"),
    (lambda s: s["config"].pop("model"), "is damaged (no model configuration)"),
    (lambda s: s.update(optimizer=None), "is damaged (its optimizer state is not a dict)"),
    (_drop_loader_key, "cannot be resumed (KeyError"),
])
def test_foreign_or_damaged_checkpoints_are_one_line(trained, tmp_path, change, message):
    out = tampered(trained, tmp_path, change)
    result = invoke("pretrain", "--data", trained / "data", "--out", out, "--steps", 2, "--checkpoint-every", 1,
                    "--batch-size", 2, "--device", "cpu", "--resume")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in " ".join(result.stderr.split()), result.stderr
    if "resumed" not in message:
        from magicseg_engine.evaluate.run import load_segmenter

        with pytest.raises(UsageError, match="checkpoint .*step-"):
            load_segmenter(out)

"""`magicseg-engine export`: COCO, mmsegmentation and Hugging Face exports read back by the real
libraries (pycocotools, this project's mmseg reader, datasets) and compared with the shards."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.data.shards import iter_samples
from magicseg_engine.formats.mmseg import split_of
from magicseg_engine.prompts.records import PromptRecord
from magicseg_engine.vocab import load_vocabulary

VOC = load_vocabulary("voc").classes


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Seven pairs in four shards of a VOC run, masks from attention."""
    out = tmp_path_factory.mktemp("export") / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 7, "--samples-per-shard", 2, "--no-sam",
                    "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def shards(run):
    return {s["__key__"]: s for s in iter_samples(run)}


def labels_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def global_labels(sample) -> np.ndarray:
    """The shard's per-sample label map renumbered to VOC ids (index + 1): what the exports hold."""
    meta = json.loads(sample["json"])
    lut = np.full(256, 255, dtype=np.uint8)
    lut[0] = 0
    for i, name in enumerate(meta["classes"]):
        lut[i + 1] = VOC.index(name) + 1
    return lut[labels_of(sample["mask.png"])]


def export(run, out, fmt, *extra):
    result = invoke("export", "--data", run, "--format", fmt, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return out


def test_coco_export_loads_in_pycocotools_and_decodes_to_the_shards(run, shards, tmp_path):
    from pycocotools.coco import COCO

    out = export(run, tmp_path / "coco", "coco")
    coco = COCO(str(out / "annotations" / "instances.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(VOC)  # ids are the vocabulary's order
    positives = [i for i in coco.imgs.values() if not i["counterfactual"]]
    assert sorted(i["magicseg_key"] for i in positives) == sorted(shards)
    annotated = 0
    for image in positives:
        sample = shards[image["magicseg_key"]]
        assert (out / "images" / image["file_name"]).read_bytes() == sample["pos.jpg"]
        rebuilt = np.zeros((image["height"], image["width"]), dtype=np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            mask = coco.annToMask(ann).astype(bool)
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
            x, y, w, h = ann["bbox"]
            rows, cols = np.nonzero(mask)
            assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert not rebuilt[mask].any()  # one class per pixel
            rebuilt[mask] = ann["category_id"]
            annotated += 1
        expected = global_labels(sample)
        np.testing.assert_array_equal(rebuilt, np.where(expected == 255, 0, expected))
        # The negative: an image without annotations, paired with its positive.
        negative = coco.imgs[image["counterfactual_image_id"]]
        meta = json.loads(sample["json"])
        assert negative["counterfactual"] and negative["counterfactual_of"] == image["id"]
        assert negative["removed_category_ids"] == sorted(VOC.index(c) + 1 for c in meta["classes"])
        assert coco.getAnnIds(imgIds=negative["id"]) == []
        assert (out / "images" / negative["file_name"]).read_bytes() == sample["neg.jpg"]
        assert image["counterfactual_passed"] == meta["masks"]["counterfactual"]["passed"]
    assert annotated > 0
    done = json.loads((out / "export.json").read_text())
    assert done["pairs"] == len(shards) and done["annotations"] == annotated and done["complete_run"]


def test_mmseg_export_reads_back_through_the_evaluate_reader(run, shards, tmp_path):
    from magicseg_engine.evaluate.datasets import load_dataset

    out = export(run, tmp_path / "mmseg", "mmseg", "--val-fraction", 0.5)
    assert (out / "classes.txt").read_text().splitlines() == ["background", *VOC]
    seen = {}
    for split in ("train", "val"):
        dataset = load_dataset("mmseg", out, split)
        assert dataset.class_names == VOC and dataset.background
        for sample in dataset.samples:
            assert split_of(sample.id, 0.5) == split
            assert sample.image.read_bytes() == shards[sample.id]["pos.jpg"]
            np.testing.assert_array_equal(dataset.read_labels(sample), global_labels(shards[sample.id]))
            seen[sample.id] = split
    assert set(seen) == set(shards) and set(seen.values()) == {"train", "val"}


def test_hf_export_loads_from_disk_and_from_parquet_equal_to_the_shards(run, shards, tmp_path):
    datasets = pytest.importorskip("datasets")

    out = export(run, tmp_path / "hf", "hf")
    saved = datasets.load_from_disk(str(out / "dataset"))
    parquet = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                                    cache_dir=str(tmp_path / "cache"))
    for table in (saved, parquet):
        assert table.features["classes"].feature.names == list(VOC)
        raw = table.cast_column("image", datasets.Image(decode=False)).cast_column(
            "negative", datasets.Image(decode=False)).cast_column("mask", datasets.Image(decode=False))
        assert sorted(raw["key"]) == sorted(shards)
        for row in raw:
            sample = shards[row["key"]]
            meta = json.loads(sample["json"])
            assert row["image"]["bytes"] == sample["pos.jpg"] and row["negative"]["bytes"] == sample["neg.jpg"]
            assert row["mask"]["bytes"] == sample["mask.png"]
            assert [VOC[i] for i in row["classes"]] == meta["classes"]
            assert row["prompt"] == meta["prompt"] and json.loads(row["meta"]) == meta
    decoded = saved[0]["mask"]  # decodes as a PIL image with the label values
    np.testing.assert_array_equal(np.asarray(decoded), labels_of(shards[saved[0]["key"]]["mask.png"]))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".magicseg-export.lock"}


@pytest.mark.parametrize("fmt", ["coco", "mmseg", "hf"])
@pytest.mark.slow
def test_a_killed_export_resumes_to_the_same_output(run, tmp_path, fmt):
    whole = export(run, tmp_path / "whole", fmt)
    resumed = tmp_path / "resumed"
    env = {**os.environ, "MAGICSEG_EXPORT_CRASH_AFTER_PAIRS": "3"}  # dies inside the second shard
    code = ("import sys; from magicseg_engine.cli import main; sys.argv = ['magicseg-engine', 'export', "
            f"'--data', {str(run)!r}, '--format', {fmt!r}, '--out', {str(resumed)!r}]; main()")
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert killed.returncode == 137, killed.stderr
    ledger = json.loads((resumed / ".magicseg-export.json").read_text())
    assert len(ledger["shards_done"]) == 1 and not (resumed / "export.json").exists()
    export(run, resumed, fmt)
    got, expected = _files(resumed), _files(whole)
    assert got.keys() == expected.keys()
    # Every file, the saved hf dataset's state.json (its fingerprint) included.
    assert [n for n in got if got[n] != expected[n]] == []


@pytest.mark.parametrize("fmt", ["coco", "hf"])
def test_what_killed_writes_leave_is_cleared_and_the_export_completes(run, tmp_path, fmt):
    """A kill between the lock file and the first ledger, and kills inside writes (atomic
    temporary files, a parquet file, the hf staging folder): the same command completes the
    export, leaving exactly what an uninterrupted one does."""
    whole = export(run, tmp_path / "whole", fmt)
    out = tmp_path / "killed"
    out.mkdir()
    (out / ".magicseg-export.lock").touch()
    (out / ".magicseg-export.json.k3x9_q.tmp").write_text("{")
    export(run, out, fmt)  # the folder held only what a killed start leaves: not refused
    (out / "export.json").unlink()  # killed while finishing: every shard is in the ledger
    planted = [out / ".export.json.a1b2c3.tmp", out / ".magicseg-export.json.zz_top.tmp"]
    if fmt == "coco":
        planted += [out / ".parts" / ".magicseg-0-000001.tar.json.q1w2e3.tmp", out / "annotations" / ".instances.json.r4t5.tmp"]
    else:
        planted += [out / "data" / ".magicseg-0-000001.tar.parquet.tmp", out / ".dataset.abc123" / "saved" / "x.arrow"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    export(run, out, fmt)
    assert not [p for p in planted if p.exists()] and not (out / ".dataset.abc123").exists()
    got, expected = _files(out), _files(whole)
    assert got.keys() == expected.keys() and [n for n in got if got[n] != expected[n]] == []


def test_export_of_an_unfinished_run_needs_partial(tmp_path):
    run = tmp_path / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 2, "--no-sam", "--out", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    prompts = run / "prompts.jsonl"
    # One more prompt than was rendered: a run stopped before its last pair.
    record = json.loads(prompts.read_text().splitlines()[0])
    record.pop("id")
    extra = PromptRecord(**{**record, "seed": 99})
    prompts.write_text(prompts.read_text() + extra.model_dump_json() + "\n")
    result = invoke("export", "--data", run, "--format", "coco", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "2 of 3 pairs are written" in result.stderr and "--partial" in result.stderr
    assert not (tmp_path / "out").exists()
    export(run, tmp_path / "out", "coco", "--partial")
    assert json.loads((tmp_path / "out" / "export.json").read_text())["complete_run"] is False


@pytest.mark.parametrize("setup, args, message", [
    (lambda d: (d / "out").mkdir() or (d / "out" / "notes.txt").write_text("x"), [], "not empty and holds no export"),
    (None, ["--format", "mmseg"], "holds another export (coco of"),
    (None, ["--classes", "coco-object"], "class(es) the run draws (e.g. "),
    (lambda d: (d / "many.txt").write_text("".join(f"class {chr(97 + i // 26)}{chr(97 + i % 26)}\n"
                                                   for i in range(300)) + "".join(f"{c}\n" for c in VOC)),
     ["--format", "mmseg", "--classes", "{tmp}/many.txt"], "at most 254 classes"),
    (None, ["--val-fraction", 1.5, "--format", "mmseg"], "give a fraction in [0, 1)"),
])
def test_bad_exports_exit_2_with_one_line_and_write_nothing(run, tmp_path, setup, args, message):
    if setup is not None:
        setup(tmp_path)
    if "holds another export" in message:
        export(run, tmp_path / "out", "coco")
    before = _files(tmp_path / "out") if (tmp_path / "out").exists() else None
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    if "--format" not in args:
        args += ["--format", "coco"]
    result = invoke("export", "--data", run, "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    after = _files(tmp_path / "out") if (tmp_path / "out").exists() else None
    assert after == before


def test_runs_without_masks_or_shards_are_refused(tmp_path, tiny_run):
    # Only read (the exports are refused before they write): the shared run of these flags
    # (conftest.py).
    run = tiny_run("--classes", "voc", "--num-pairs", 1, "--mask-source", "none")
    result = invoke("export", "--data", run, "--format", "hf", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "--mask-source none" in result.stderr and "magicseg-engine masks" in result.stderr
    # The folder above the run (it holds the run, in run/) is not a run.
    result = invoke("export", "--data", run.parent, "--format", "hf", "--out", tmp_path / "b")
    assert result.exit_code == 2 and "holds no run" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_damaged_shard_stops_the_export_at_that_shard(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    second = sorted((copy / "shards").glob("*.tar"))[1]
    data = bytearray(second.read_bytes())
    data[-2000] ^= 0xFF  # same size, other bytes: only the sha256 tells
    second.write_bytes(bytes(data))
    result = invoke("export", "--data", copy, "--format", "mmseg", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "does not match the sha256" in result.stderr
    ledger = json.loads((tmp_path / "out" / ".magicseg-export.json").read_text())
    assert len(ledger["shards_done"]) == 1 and not (tmp_path / "out" / "export.json").exists()

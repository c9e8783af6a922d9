"""A full or failing disk at every write site: one clear line, nothing finished lost, and the same
command with --resume (or again) completes to exactly what was asked.

Every site of `atomic.WRITE_SITES` is failed with ENOSPC and with EIO through the fault hook
(MAGICSEG_FAULT_AT), in process and with the real writing code: the run folder's sites under
the real pipeline (writer thread, shard writer, manifest, dropped log) fed by an instant fake
sampler, the other commands through the command line. A real tmpfs that fills up checks the same
without the hook, and the space check before a run is checked against what a tiny run writes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from magicseg_engine import atomic, disk_space
from magicseg_engine.atomic import FAULT_ENV, WRITE_SITES
from magicseg_engine.cli import app
from magicseg_engine.config import load_preset
from magicseg_engine.data.shards import finished_keys, shard_sha256
from magicseg_engine.generate.sampler import PairBatch
from magicseg_engine.masks.annotate import PairAnnotation
from magicseg_engine.pipeline import (
    STARTING,
    ExecutionOptions,
    dropped_keys,
    generate_pairs,
    keyed_records,
    open_run,
    record_summary,
    start_run,
)
from magicseg_engine.prompts import build_prompts
from magicseg_engine.prompts.records import read_records
from magicseg_engine.vocab import load_vocabulary

ERRNOS = ("ENOSPC", "EIO")
VOC = load_vocabulary("voc").classes


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def no_thread_tracebacks(monkeypatch):
    """Fails a test in which any thread died of an exception (the writer thread must hand its
    error to the main thread, not print it)."""
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    atomic.reset_faults()
    yield
    assert died == []


def fault(monkeypatch, site, name, nth=1):
    atomic.reset_faults()
    monkeypatch.setenv(FAULT_ENV, f"{site}:{name}:{nth}")


def no_temporary_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]


def assert_one_line(result, errno_name):
    """Exit 74, one error line naming the errno and saying what to do, no traceback."""
    assert result.exit_code == disk_space.EXIT_CODE, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"({errno_name})" in errors[0], result.stderr
    assert "Traceback" not in result.output and "then run the same command" in errors[0]
    return errors[0]


# --- the run folder: the real pipeline with an instant sampler ------------------------------------

class FakeSampler:
    """Random 32x32 pairs from each pair's seed, at once: what the writing code sees is real."""

    models = SimpleNamespace(model_id="fake-model")
    device = torch.device("cpu")
    dtype = torch.float32

    def __call__(self, prompts, negatives, seeds, hook=None):
        draw = [np.random.default_rng(s).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for s in seeds]
        return PairBatch(np.stack([d[0] for d in draw]), np.stack([d[1] for d in draw]))


def drop_it(seed: int) -> bool:
    return seed % 3 == 0


class FakeMasks:
    """Label maps, and a counterfactual check that fails every pair whose seed drop_it picks, so
    that a run drops some pairs (dropped.jsonl) and keeps the others."""

    def run(self, sampler, records):
        pairs = sampler([r.prompt for r in records], [r.negative_prompt for r in records], [r.seed for r in records])
        notes = [PairAnnotation(np.full((32, 32), r.seed % 2, dtype=np.uint8),
                                [{"name": c, "found": True} for c in r.classes],
                                {"passed": not drop_it(r.seed), "reason": "test"}) for r in records]
        return pairs, notes


CONFIG = load_preset("tiny", {"masks": {"drop_failed_pairs": True}})
RECORDS = build_prompts(CONFIG.prompts, vocab=load_vocabulary("voc"), num=8).records
KEYED = keyed_records(FakeSampler.models.model_id, RECORDS)
KEPT = {k for k, r in KEYED if not drop_it(r.seed)}
DROPPED = {k for k, r in KEYED if drop_it(r.seed)}


def session(out: Path, resume: bool) -> None:
    """What `generate` does with its run folder: open, start if new, render, record the session."""
    plan = open_run(out, CONFIG, RECORDS, resume, False)
    if plan.fresh:
        start_run(out, CONFIG, plan.records, VOC)
    summary = generate_pairs(out, CONFIG, plan.records, FakeSampler(),
                             ExecutionOptions(batch_size=2, samples_per_shard=2, encode_workers=1), masks=FakeMasks())
    record_summary(out, summary, {})


def assert_exact_run(out: Path) -> None:
    """The requested pairs, each once: kept ones in exactly one listed shard, dropped ones logged."""
    saved = json.loads((out / "run.json").read_text())
    assert STARTING not in saved and saved["sessions"]
    assert [r.id for r in read_records(out / "prompts.jsonl")] == [r.id for r in RECORDS]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    listed = [k for line in manifest for k in line["keys"]]
    assert sorted(listed) == sorted(KEPT)
    assert dropped_keys(out) == DROPPED
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(line["shard"] for line in manifest)
    for line in manifest:
        path = out / "shards" / line["shard"]
        assert path.stat().st_size == line["bytes"] and shard_sha256(path) == line["sha256"]
        with tarfile.open(path) as tar:
            assert [n.split(".", 1)[0] for n in tar.getnames() if n.endswith(".json")] == line["keys"]
    assert no_temporary_files(out) == []


# For each run-folder site, the write that fails in the first session (ENOSPC) and in the resumed
# one (EIO): chosen so that both fail part-way, with some pairs finished before.
RUN_FAULTS = {
    "run_file": (1, 3),       # the start marker of a new run; then the summary, after every pair
    "prompts": (1, 1),        # the start, twice (the resume completes the interrupted start)
    "shard_data": (30, 6),    # inside the second shard; then inside the first shard of the resume
    "shard_commit": (2, 1),   # the second shard's rename; then the resume's first
    "manifest": (2, 1),       # the second shard's line, torn half way; then the resume's first
    "dropped": (2, 1),        # the second dropped pair's line, torn; then the resume's first
}


@pytest.mark.parametrize("site", sorted(RUN_FAULTS))
def test_run_folder_site_fails_cleanly_and_resumes_exactly_once(site, tmp_path, monkeypatch):
    out = tmp_path / "run"
    before: set[str] = set()
    for attempt, (name, nth) in enumerate(zip(ERRNOS, RUN_FAULTS[site])):
        fault(monkeypatch, site, name, nth)
        with pytest.raises(OSError) as failed:
            session(out, resume=attempt > 0)
        err = failed.value
        assert err.errno == getattr(errno, name)
        assert err.filename and Path(err.filename).is_relative_to(out), err.filename
        assert not [t for t in threading.enumerate() if t.name == "shard-writer"]  # the writer thread ended
        assert no_temporary_files(out) == []
        now = set(finished_keys(out)) if (out / "manifest.jsonl").exists() else set()
        assert before <= now  # nothing finished is lost
        before = now
    monkeypatch.delenv(FAULT_ENV)
    session(out, resume=True)
    assert_exact_run(out)


# --- the command line: one line, exit 74, and --resume -------------------------------------------

def _generate(out, *extra):
    return invoke("generate", "--classes", "voc", "--num-pairs", 4, "--batch-size", 2, "--samples-per-shard", 1,
                  "--no-sam", "--out", out, "--device", "cpu", *extra)


@pytest.mark.slow
def test_cli_disk_full_and_io_error_say_one_line_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fault(monkeypatch, "shard_commit", "ENOSPC", 2)
    full = assert_one_line(_generate(out), "ENOSPC")
    assert str(out / "shards" / "magicseg-0-000001.tar") in full and "free on its file system" in full
    assert "needs about" in full and "with --resume" in full
    fault(monkeypatch, "manifest", "EIO", 1)
    broken = assert_one_line(_generate(out, "--resume"), "EIO")
    assert str(out / "manifest.jsonl") in broken and "check it" in broken and "run the same command again" in broken
    monkeypatch.delenv(FAULT_ENV)
    done = _generate(out, "--resume")
    assert done.exit_code == 0, done.output
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    keys = [k for line in manifest for k in line["keys"]]
    assert len(keys) == len(set(keys)) == 4 and no_temporary_files(out) == []
    # The estimate from the preset's settings against what the run wrote (masks on, no SAM).
    config = load_preset("tiny", {"masks": {"refine_with_sam": False}})
    estimate = disk_space.estimated_pair_bytes(config, 1)
    actual = disk_space.measured_pair_bytes(out)
    assert 0.8 <= estimate / actual <= 2, (estimate, actual)  # the bound disk_space's docstring states


# --- pretrain, export, report, prompts: through the command line ---------------------------------

@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """Shards of coloured shapes, for pretrain."""
    from magicseg_engine.train.synthetic import write_synthetic_run

    run = tmp_path_factory.mktemp("synthetic") / "run"
    write_synthetic_run(run, 8, size=64, seed=1, samples_per_shard=4)
    return run


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A whole run folder (run.json, prompts, shards of two pairs) of the fake sampler, for export and report."""
    out = tmp_path_factory.mktemp("fake") / "run"
    session(out, resume=False)
    return out


# In order, each failing part-way through what the one before left: the run's configuration
# (twice: nothing to resume yet), the text cache (twice: a --resume before any checkpoint starts
# again), a metrics line torn at step 2, the checkpoints of step 3 (twice), step 3's metrics line.
PRETRAIN_FAULTS = [("pretrain_config", "ENOSPC", 1), ("pretrain_config", "EIO", 1), ("text_cache", "EIO", 1),
                   ("text_cache", "ENOSPC", 1), ("metrics", "ENOSPC", 2), ("checkpoint", "EIO", 2),
                   ("checkpoint", "ENOSPC", 1), ("metrics", "EIO", 1)]


@pytest.mark.slow
def test_pretrain_sites_fail_cleanly_and_resume(synthetic_run, tmp_path, monkeypatch):
    out = tmp_path / "pre"
    base = ["pretrain", "--data", synthetic_run, "--out", out, "--steps", 3, "--checkpoint-every", 1,
            "--batch-size", 2, "--device", "cpu"]
    for site, name, nth in PRETRAIN_FAULTS:
        fault(monkeypatch, site, name, nth)
        resumable = (out / "pretrain.json").is_file()
        line = assert_one_line(invoke(*base, *(["--resume"] if resumable else [])), name)
        assert str(out) in line, line
        assert no_temporary_files(out) == [], site
        if site == "pretrain_config":  # fails before the run exists: the same command again
            assert "run the same command again" in line and not (out / "pretrain.json").exists()
        else:
            assert ("run the same command again" if resumable else "with --resume") in line
    monkeypatch.delenv(FAULT_ENV)
    done = invoke(*base, "--resume")
    assert done.exit_code == 0, done.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # each step logged once, the torn lines gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-00000003.pt"


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".magicseg-export.lock"}


# In order, on the fake run (five kept pairs in shards of two): coco writes 2 images per pair and a
# part per shard, then the ledger; at the end instances.json, then export.json. mmseg writes 2
# files per pair and classes.txt at the end.
EXPORT_FAULTS = [("coco", "export_data", "ENOSPC", 3), ("coco", "export_data", "EIO", 5),
                 ("coco", "export_ledger", "ENOSPC", 1), ("coco", "export_ledger", "EIO", 2),
                 ("coco", "export_final", "ENOSPC", 1), ("coco", "export_final", "EIO", 2),
                 ("mmseg", "export_data", "ENOSPC", 6), ("mmseg", "export_final", "EIO", 1)]


@pytest.mark.parametrize("fmt", ["coco", "mmseg"])
def test_export_sites_fail_cleanly_and_resume_to_the_same_output(fmt, fake_run, tmp_path, monkeypatch):
    out, clean = tmp_path / "export", tmp_path / "clean"
    base = ["export", "--data", fake_run, "--format", fmt]
    for _, site, name, nth in [f for f in EXPORT_FAULTS if f[0] == fmt]:
        fault(monkeypatch, site, name, nth)
        line = assert_one_line(invoke(*base, "--out", out), name)
        assert "run the same command again" in line and str(out) in line
        assert no_temporary_files(out) == [] and not (out / "export.json").exists()
    monkeypatch.delenv(FAULT_ENV)
    assert invoke(*base, "--out", out).exit_code == 0
    assert invoke(*base, "--out", clean).exit_code == 0
    assert _tree(out) == _tree(clean)  # byte for byte what an export that never failed writes


@pytest.mark.parametrize("name", ERRNOS)
def test_report_page_fails_cleanly_and_is_written_again(name, fake_run, tmp_path, monkeypatch):
    page = tmp_path / "report.html"
    fault(monkeypatch, "report", name)
    line = assert_one_line(invoke("report", "--data", fake_run, "--out", page), name)
    assert str(page) in line and "run the same command again" in line
    assert list(tmp_path.iterdir()) == []  # no page, no temporary file
    monkeypatch.delenv(FAULT_ENV)
    assert invoke("report", "--data", fake_run, "--out", page).exit_code == 0 and page.stat().st_size > 0


@pytest.mark.parametrize("site", ["prompts", "output"])
def test_prompts_command_fails_cleanly_and_is_written_again(site, tmp_path, monkeypatch):
    out = tmp_path / "p.jsonl"
    args = ["prompts", "--classes", "voc", "--num", 5, "--out", out]
    for name in ERRNOS:
        fault(monkeypatch, site, name)
        line = assert_one_line(invoke(*args), name)
        assert str(out if site == "prompts" else tmp_path / "p.config.json") in line
        assert no_temporary_files(tmp_path) == []
    monkeypatch.delenv(FAULT_ENV)
    assert invoke(*args).exit_code == 0
    assert len(read_records(out)) == 5 and (tmp_path / "p.config.json").is_file()


@pytest.mark.parametrize("name", ERRNOS)
def test_llm_cache_line_torn_by_the_disk_is_dropped_and_asked_again(name, tmp_path, monkeypatch):
    from magicseg_engine.prompts.llm import ReplyCache

    path = tmp_path / "cache.jsonl"
    cache = ReplyCache(path)
    cache.append("k1", "m", [("cat",)], "a cat")
    fault(monkeypatch, "llm_cache", name)
    with pytest.raises(OSError) as failed:
        cache.append("k2", "m", [("dog",)], "a dog")
    assert failed.value.filename == str(path) and not path.read_bytes().endswith(b"\n")  # torn half way
    monkeypatch.delenv(FAULT_ENV)
    again = ReplyCache(path)  # the next command: the torn line is dropped, its request asked again
    assert "k1" in again and "k2" not in again
    again.append("k2", "m", [("dog",)], "a dog")
    assert ReplyCache(path).replies == {"k1": "a cat", "k2": "a dog"}


def test_every_write_site_is_failed_by_a_test():
    """A site added to WRITE_SITES without a test here fails this one."""
    tested = set(RUN_FAULTS) | {s for s, _, _ in PRETRAIN_FAULTS} | {s for _, s, _, _ in EXPORT_FAULTS}
    tested |= {"report", "prompts", "output", "llm_cache"}
    assert tested == set(WRITE_SITES)
    # ...with both errnos each, in the tables of the tests that take them from a table
    for table in ([(s, n) for s, n, _ in PRETRAIN_FAULTS], [(s, n) for _, s, n, _ in EXPORT_FAULTS]):
        for site in {s for s, _ in table}:
            assert {n for s, n in table if s == site} == set(ERRNOS), site


def test_every_site_named_in_the_code_is_a_write_site():
    """A misspelt site would raise in a real run: every name the package passes is in WRITE_SITES."""
    import re

    import magicseg_engine

    roots = [Path(magicseg_engine.__file__).parent, Path(__file__).parents[1] / "engine"]
    named = set()
    for root in roots:
        for path in root.rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            named |= set(re.findall(r'site="([a-z_]+)"', text)) | set(re.findall(r'fault_point\("([a-z_]+)"', text))
    assert named and named <= set(WRITE_SITES), named - set(WRITE_SITES)
    assert named == set(WRITE_SITES) - {"output"}  # "output" is atomic_output's default


@pytest.mark.parametrize("spec", ["no_such_site:ENOSPC", "run_file:EPERM", "run_file:EIO:0"])
def test_a_malformed_fault_spec_is_refused(spec, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, spec)
    with pytest.raises(ValueError, match="SITE:ERRNO"):
        atomic.fault_point("run_file", "x")


# --- a real file system that fills up --------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs at tmp_path/fs, unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_low_disk_check_refuses_before_anything_is_written(small_tmpfs):
    out = small_tmpfs / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 50, "--out", out, "--device", "cpu")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "free" in errors[0] and "needs about" in errors[0] and "--no-space-check" in errors[0]
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file() and p.stat().st_size]


@pytest.mark.slow
def test_a_tmpfs_that_fills_up_stops_the_run_and_resume_completes_it(small_tmpfs):
    out = small_tmpfs / "run"
    args = ["generate", "--classes", "voc", "--num-pairs", 4, "--batch-size", 2, "--samples-per-shard", 1,
            "--mask-source", "none", "--out", out, "--device", "cpu"]
    full = assert_one_line(invoke(*args, "--no-space-check"), "ENOSPC")
    assert str(out) in full and "free on its file system" in full
    kept = set(finished_keys(out))
    assert 0 < len(kept) < 4
    # More room, as after freeing space: the same command with --resume completes the run.
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_tmpfs)], check=True)
    done = invoke(*args, "--resume")
    assert done.exit_code == 0, done.output
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    keys = [k for line in manifest for k in line["keys"]]
    assert len(keys) == len(set(keys)) == 4 and kept <= set(keys)
    for line in manifest:
        assert shard_sha256(out / "shards" / line["shard"]) == line["sha256"]
    assert no_temporary_files(out) == []
    # The run's own shards give the estimate of a resume: the pairs' mean size, manifest included.
    shards = sum(line["bytes"] for line in manifest) + (out / "manifest.jsonl").stat().st_size
    assert disk_space.measured_pair_bytes(out) == shards // 4 + 1

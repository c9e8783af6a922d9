import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.config import load_preset
from magicseg_engine.data.shards import finished_keys, iter_samples, sample_key
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.models import model_identity
from magicseg_engine.generate.sampler import PairedSampler, SamplingSettings, initial_noise
from magicseg_engine.pipeline import (
    RUN_CRASH_ENV,
    STARTING,
    ExecutionOptions,
    build_sampler,
    generate_pairs,
    keyed_records,
    open_run,
    record_summary,
    start_run,
)
from magicseg_engine.prompts import build_prompts
from magicseg_engine.prompts.records import read_records
from magicseg_engine.vocab import load_vocabulary

TINY = load_preset("tiny")


@pytest.fixture(scope="module")
def sampler(tiny_sampler):
    # The shared tiny sampler (conftest.py), of the tiny preset as TINY: these tests sample with
    # it, wrap its models in other samplers, and hook its UNet only inside try/finally.
    return tiny_sampler


def records(num, seed=0):
    config = TINY.prompts.model_copy(update={"seed": seed})
    return build_prompts(config, vocab=load_vocabulary("voc"), num=num).records


def run_dir_images(out):
    return {s["__key__"]: (s["pos.jpg"], s["neg.jpg"], json.loads(s["json"])) for s in iter_samples(out)}


# --- sampler -------------------------------------------------------------------------------

def test_initial_noise_is_shared_per_pair_and_reproducible_per_seed():
    pos, neg = initial_noise([5, 6], (4, 8, 8), independent=False)
    assert torch.equal(pos, neg)
    assert not torch.equal(pos[0], pos[1])
    pos_again, _ = initial_noise([6], (4, 8, 8), independent=False)
    assert torch.equal(pos_again[0], pos[1])  # a sample's noise does not depend on its batch
    ipos, ineg = initial_noise([5], (4, 8, 8), independent=True)
    assert torch.equal(ipos[0], pos[0]) and not torch.equal(ineg[0], pos[0])


def test_identical_prompts_give_identical_twins_with_shared_noise(sampler):
    batch = sampler(["a dog on a beach", "a cat"], ["a dog on a beach", "a cat"], [1, 2])
    assert batch.positives.shape == (2, 64, 64, 3) and batch.positives.dtype == np.uint8
    np.testing.assert_array_equal(batch.positives, batch.negatives)
    assert not np.array_equal(batch.positives[0], batch.positives[1])


def test_independent_noise_makes_twins_differ(sampler):
    settings = SamplingSettings(**{**sampler.settings.__dict__, "independent_noise": True})
    other = PairedSampler(sampler.models, settings, sampler.device, sampler.dtype)
    batch = other(["a dog"], ["a dog"], [1])
    assert np.abs(batch.positives.astype(int) - batch.negatives.astype(int)).mean() > 1


def test_same_seed_same_pixels_and_batch_composition_barely_matters(sampler):
    a = sampler(["a dog", "a cat", "a cow"], ["nothing", "nothing", "nothing"], [10, 11, 12])
    b = sampler(["a dog", "a cat", "a cow"], ["nothing", "nothing", "nothing"], [10, 11, 12])
    np.testing.assert_array_equal(a.positives, b.positives)
    alone = sampler(["a cat"], ["nothing"], [11])
    diff = np.abs(alone.positives[0].astype(int) - a.positives[1].astype(int))
    assert diff.max() <= 2


def test_guidance_off_uses_conditional_branch_only(sampler):
    settings = SamplingSettings(**{**sampler.settings.__dict__, "guidance": 1.0})
    plain = PairedSampler(sampler.models, settings, sampler.device, sampler.dtype)
    calls = []
    handle = sampler.models.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        plain(["a dog", "a cat"], ["nothing", "nothing"], [1, 2])
        sampler(["a dog", "a cat"], ["nothing", "nothing"], [1, 2])
    finally:
        handle.remove()
    steps = sampler.settings.steps
    assert calls == [4] * steps + [8] * steps  # 2B rows without guidance, 4B with


# --- pipeline -------------------------------------------------------------------------------

def test_run_writes_every_pair_once_with_metadata(tmp_path, sampler):
    recs = records(10)
    start_run(tmp_path, TINY, recs)
    summary = generate_pairs(tmp_path, TINY, recs, sampler, ExecutionOptions(batch_size=4, samples_per_shard=3))
    assert summary.generated == 10 and summary.already_done == 0
    samples = run_dir_images(tmp_path)
    keys = {sample_key(sampler.models.model_id, r.prompt, r.negative_prompt, r.seed): r for r in recs}
    assert set(samples) == set(keys)
    for key, (pos, neg, meta) in samples.items():
        r = keys[key]
        assert Image.open(io.BytesIO(pos)).size == (64, 64) and Image.open(io.BytesIO(neg)).format == "JPEG"
        assert meta["classes"] == list(r.classes) and meta["seed"] == r.seed
        assert meta["prompt"] == r.prompt and meta["negative_prompt"] == r.negative_prompt
        assert meta["steps"] == TINY.diffusion.steps and meta["size"] == [64, 64] and meta["shared_noise"]
    for shard in (tmp_path / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            assert len(tar.getnames()) % 3 == 0
    # A second call finds everything done and renders nothing.
    again = generate_pairs(tmp_path, TINY, recs, sampler, ExecutionOptions(batch_size=4))
    assert again.generated == 0 and again.already_done == 10


def test_same_seed_same_shard_bytes(tmp_path, sampler):
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        recs = records(4, seed=3)
        start_run(out, TINY, recs)
        generate_pairs(out, TINY, recs, sampler, ExecutionOptions(batch_size=2))
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))])
    assert digests[0] == digests[1] and digests[0]


class OutOfMemoryAbove:
    """Wraps a sampler and fails like CUDA does when a batch is larger than `limit`."""

    def __init__(self, inner, limit):
        self.inner, self.limit, self.sizes = inner, limit, []
        self.models, self.device, self.dtype = inner.models, inner.device, inner.dtype

    def __call__(self, prompts, negatives, seeds, hook=None):
        self.sizes.append(len(prompts))
        if len(prompts) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(prompts, negatives, seeds, hook)


def test_out_of_memory_halves_the_batch_and_goes_on(tmp_path, sampler, caplog):
    recs = records(12)
    start_run(tmp_path, TINY, recs)
    fake = OutOfMemoryAbove(sampler, limit=2)
    with caplog.at_level(logging.WARNING):
        summary = generate_pairs(tmp_path, TINY, recs, fake, ExecutionOptions(batch_size=8))
    assert fake.sizes[:3] == [8, 4, 2]
    assert summary.final_batch_size == 2 and summary.generated == 12
    assert len(finished_keys(tmp_path)) == 12
    assert "out of memory at batch size 8; going on with 4" in caplog.text


def test_out_of_memory_at_batch_one_is_raised(tmp_path, sampler):
    recs = records(2)
    start_run(tmp_path, TINY, recs)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        generate_pairs(tmp_path, TINY, recs, OutOfMemoryAbove(sampler, limit=0), ExecutionOptions(batch_size=2))


# --- resume after SIGKILL, in real processes ----------------------------------------------------

def _generate(out, env_extra=None):
    cmd = [str(Path(sys.executable).with_name("magicseg-engine")), "generate", "--preset", "tiny",
           "--classes", "voc", "--num-pairs", "9", "--seed", "4", "--batch-size", "2",
           "--samples-per-shard", "2", "--out", str(out), "--resume", "--device", "cpu"]
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_killed_runs_resume_to_exactly_the_requested_pairs(tmp_path):
    out = tmp_path / "run"
    # Killed inside the shard protocol at three different points, one after the other...
    for crash in ("before_rename:2", "before_manifest:1", "mid_manifest:2"):
        proc = _generate(out, {"MAGICSEG_SHARDS_CRASH_AT": crash})
        assert proc.returncode == -9, (crash, proc.stderr[-2000:])
    # ...then resumed to the end.
    proc = _generate(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = load_preset("tiny", {"seed": 4, "prompts": {"seed": 4}})
    recs = open_run(out, config, None, True, False).records
    model_id = build_sampler(config, "cpu").models.model_id
    expected = {sample_key(model_id, r.prompt, r.negative_prompt, r.seed) for r in recs}
    assert len(expected) == 9
    names = []
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
        assert sum(1 for _ in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)) >= 1
    keys = [n.split(".", 1)[0] for n in names if n.endswith(".json")]
    assert sorted(keys) == sorted(expected)  # each requested pair exactly once
    assert not list(out.rglob("*.tmp"))
    # The resumed images are the images an uninterrupted run makes (up to batch-size rounding).
    clean = tmp_path / "clean"
    assert _generate(clean).returncode == 0
    got, want = run_dir_images(out), run_dir_images(clean)
    assert set(got) == set(want)
    for key in want:
        a = np.asarray(Image.open(io.BytesIO(got[key][0])), dtype=int)
        b = np.asarray(Image.open(io.BytesIO(want[key][0])), dtype=int)
        assert np.abs(a - b).mean() < 1.0


# --- command line -----------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", 60, 64], "height: Value error, must be a multiple of 8"),
        (["--steps", 0], "diffusion.steps: Input should be greater than 0"),
        (["--preset", "sd3"], "unknown preset 'sd3'"),
        (["--num-pairs", 0], "--num-pairs must be a positive number"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--preset", "sd15", "--model", "/nonexistent/model", "--no-sam"], "/nonexistent/model"),
    ],
)
def test_bad_flags_exit_2_and_leave_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    base = ["generate", "--classes", "voc", "--num-pairs", 2, "--out", out]
    result = invoke(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not out.exists()


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    base = ["generate", "--classes", "voc", "--num-pairs", 2, "--batch-size", 2, "--out", out, "--device", "cpu"]
    assert invoke(*base).exit_code == 0
    result = invoke(*base)
    assert result.exit_code == 2 and "already holds a run" in result.stderr
    result = invoke(*base, "--resume", "--steps", 2)
    assert result.exit_code == 2 and "diffusion.steps" in result.stderr
    result = invoke(*base, "--overwrite", "--seed", 1)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 1
    assert len(finished_keys(out)) == 2


def test_generate_from_a_prompts_file_keeps_its_seeds(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    assert invoke("prompts", "--classes", "coco-object", "--num", 3, "--seed", 9, "--out", prompts).exit_code == 0
    out = tmp_path / "run"
    result = invoke("generate", "--prompts", prompts, "--out", out, "--batch-size", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    wanted = {json.loads(line)["seed"]: json.loads(line) for line in prompts.read_text().splitlines()}
    got = {meta["seed"]: meta for _, _, meta in run_dir_images(out).values()}
    assert set(got) == set(wanted) == {9 * 2**32, 9 * 2**32 + 1, 9 * 2**32 + 2}
    for seed, meta in got.items():
        assert meta["prompt"] == wanted[seed]["prompt"] and meta["prompt_id"] == wanted[seed]["id"]


def test_classes_without_a_count_is_a_usage_error(tmp_path):
    result = invoke("generate", "--classes", "voc", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "--classes needs --num-pairs" in result.stderr
    result = invoke("generate", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "say what to render" in result.stderr
    assert not (tmp_path / "run").exists()


# --- interrupted starts, overwrites and finishes -------------------------------------------------
# Each step of start_run and record_summary is killed in a forked child (MAGICSEG_RUN_CRASH_AT),
# then the directory is taken up as the CLI would with --resume, a bare --resume and --overwrite;
# each must end in exactly the intended run.

START_POINTS = ["start_marker_tmp", "start_marked", "start_clearing", "start_cleared", "start_prompts_tmp",
                "start_prompts", "start_commit_tmp", "start_done"]
FINISH_POINTS = ["finish_begin", "finish_summary_tmp"]
OLD, NEW = load_preset("tiny", {"seed": 1}), load_preset("tiny", {"seed": 2})
VOC = load_vocabulary("voc").classes


def _killed_at(point, fn, *args):
    """fn(*args) in a forked child that SIGKILLs itself at `point`; the child touches files only."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.environ[RUN_CRASH_ENV] = point
            fn(*args)
        finally:
            os._exit(3)  # reached only if the crash point was not
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)


def _session(out, sampler, config, recs, *, resume=False, overwrite=False, vocabulary=VOC):
    """What `generate` does with the run directory: open, start if fresh, render, finish."""
    plan = open_run(out, config, recs, resume, overwrite)
    if plan.fresh:
        start_run(out, config, plan.records, vocabulary)
    summary = generate_pairs(out, config, plan.records, sampler, ExecutionOptions(batch_size=2, samples_per_shard=1))
    record_summary(out, summary, {})
    return plan


def _assert_exact_run(out, config, recs, model_id):
    """run.json, prompts and shards are those of this run alone, each pair once, nothing left over."""
    saved = json.loads((out / "run.json").read_text())
    assert STARTING not in saved and saved["config"] == config.model_dump(mode="json")
    assert saved["vocabulary"] == list(VOC) and saved["sessions"]
    assert [r.id for r in read_records(out / "prompts.jsonl")] == [r.id for r in recs]
    expected = {k for k, _ in keyed_records(model_id, recs)}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    listed = [k for line in manifest for k in line["keys"]]
    assert sorted(listed) == sorted(expected)  # each pair once, none of another run
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(line["shard"] for line in manifest)
    for line in manifest:
        data = (out / "shards" / line["shard"]).read_bytes()
        assert len(data) == line["bytes"] and hashlib.sha256(data).hexdigest() == line["sha256"]
        with tarfile.open(out / "shards" / line["shard"]) as tar:
            assert [n.split(".", 1)[0] for n in tar.getnames() if n.endswith(".json")] == line["keys"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "dropped.jsonl").exists()


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, sampler):
    """A finished run of OLD's settings, copied by the tests that overwrite it."""
    out = tmp_path_factory.mktemp("old") / "run"
    _session(out, sampler, OLD, records(2, seed=1))
    return out


@pytest.mark.parametrize("over_old", [False, True], ids=["new-dir", "overwrite"])
@pytest.mark.parametrize("point", START_POINTS)
def test_a_start_killed_at_any_step_is_completed_or_replaced(tmp_path, sampler, old_run, point, over_old, caplog):
    killed = tmp_path / "killed"
    if over_old:
        shutil.copytree(old_run, killed)
    new_recs = records(2, seed=2)
    _killed_at(point, start_run, killed, NEW, new_recs, VOC)
    model_id = sampler.models.model_id
    committed = point == "start_done"
    marked = point not in ("start_marker_tmp",)  # run.json says "starting" (or, at start_done, started)

    # --overwrite with the new flags: always the new run, and one line when it replaces a start.
    out = tmp_path / "overwrite"
    shutil.copytree(killed, out)
    with caplog.at_level(logging.WARNING):
        _session(out, sampler, NEW, new_recs, overwrite=True)
    notes = [r.getMessage() for r in caplog.records if r.name == "magicseg_engine.pipeline"]
    if marked and not committed:
        assert notes == [f"{out} holds a run whose start was interrupted; replacing it"]
    elif not over_old and not marked:  # no run.json yet, only a temporary file
        assert len(notes) == 1 and "starting the run again" in notes[0], notes
    else:
        assert notes == []
    _assert_exact_run(out, NEW, new_recs, model_id)

    # --resume with the new flags: completes the start, unless the overwrite never got as far as
    # run.json, in which case the old run is intact and continues with its own flags.
    out = tmp_path / "resume"
    shutil.copytree(killed, out)
    if over_old and not marked:
        with pytest.raises(UsageError, match="the settings differ"):
            open_run(out, NEW, new_recs, True, False)
        _session(out, sampler, OLD, records(2, seed=1), resume=True)
        _assert_exact_run(out, OLD, records(2, seed=1), model_id)
    else:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _session(out, sampler, NEW, new_recs, resume=True)
        notes = [r.getMessage() for r in caplog.records if r.name == "magicseg_engine.pipeline"]
        if not committed:  # one line says what was found and what is done with it
            assert len(notes) == 1 and "interrupted" in notes[0], notes
            assert ("completing its start" if marked else "starting the run again") in notes[0]
        else:
            assert not notes
        _assert_exact_run(out, NEW, new_recs, model_id)

    # A bare --resume (no prompt flags) completes the start once the prompts are saved; before
    # that it says which flags it needs. The vocabulary saved by the first try is kept.
    out = tmp_path / "bare"
    shutil.copytree(killed, out)
    prompts_saved = point in ("start_prompts", "start_commit_tmp", "start_done")
    if over_old and not marked:
        with pytest.raises(UsageError, match="the settings differ"):
            open_run(out, NEW, None, True, False)
    elif not prompts_saved:
        with pytest.raises(UsageError, match="pass the flags that started it with --resume"):
            open_run(out, NEW, None, True, False)
    else:
        _session(out, sampler, NEW, None, resume=True, vocabulary=None)
        _assert_exact_run(out, NEW, new_recs, model_id)

    # Neither flag: refused with a message that names both.
    if not committed:
        with pytest.raises(UsageError, match="--resume|--overwrite"):
            open_run(killed, NEW, new_recs, False, False)


@pytest.mark.parametrize("point", FINISH_POINTS)
def test_a_finish_killed_at_any_step_resumes_or_is_replaced(tmp_path, sampler, point):
    killed = tmp_path / "killed"
    recs = records(2, seed=2)
    start_run(killed, NEW, recs, VOC)
    summary = generate_pairs(killed, NEW, recs, sampler, ExecutionOptions(batch_size=2, samples_per_shard=1))
    _killed_at(point, record_summary, killed, summary, {})
    assert ("finish_summary_tmp" != point) or [p for p in killed.iterdir() if p.name.endswith(".tmp")]
    for how in ("resume", "overwrite"):
        out = tmp_path / how
        shutil.copytree(killed, out)
        plan = _session(out, sampler, NEW, recs, resume=how == "resume", overwrite=how == "overwrite")
        assert plan.fresh == (how == "overwrite")
        _assert_exact_run(out, NEW, recs, sampler.models.model_id)


def test_a_directory_of_something_else_is_never_taken_for_an_interrupted_start(tmp_path):
    (tmp_path / "prompts.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    for resume, overwrite in ((True, False), (False, True)):
        with pytest.raises(UsageError, match="is not empty and holds no run"):
            open_run(tmp_path, NEW, records(2, seed=2), resume, overwrite)
    (tmp_path / "notes.txt").unlink()  # what an earlier version's interrupted start left
    plan = open_run(tmp_path, NEW, records(2, seed=2), True, False)
    assert plan.fresh


def test_an_unreadable_run_file_is_reported_and_overwritable(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(UsageError, match="run.json is not a JSON object"):
        open_run(tmp_path, NEW, records(2, seed=2), True, False)
    assert open_run(tmp_path, NEW, records(2, seed=2), False, True).fresh


# --- the same through the command line, killed and signalled in real processes -------------------

def _cli(out, *flags, env_extra=None, num=5, seed=4, wait=True):
    cmd = [str(Path(sys.executable).with_name("magicseg-engine")), "generate", "--preset", "tiny",
           "--classes", "voc", "--num-pairs", str(num), "--seed", str(seed), "--batch-size", "2",
           "--samples-per-shard", "2", "--out", str(out), "--device", "cpu", *flags]
    env = {**os.environ, **(env_extra or {})}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _cli_config(seed):
    return load_preset("tiny", {"seed": seed, "prompts": {"seed": seed}})


def _assert_exact_cli_run(out, seed, num):
    config = _cli_config(seed)
    recs = build_prompts(config.prompts, vocab=load_vocabulary("voc"), num=num).records
    _assert_exact_run(out, config, recs, model_identity(config.diffusion, "cpu", seed=config.weights_seed))


@pytest.mark.slow
def test_cli_completes_an_overwrite_killed_half_way(tmp_path):
    out = tmp_path / "run"
    assert _cli(out).returncode == 0
    proc = _cli(out, "--overwrite", seed=5, env_extra={RUN_CRASH_ENV: "start_clearing"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    refused = _cli(out, seed=5)
    assert refused.returncode == 2 and "--resume to complete its start or --overwrite" in refused.stderr
    proc = _cli(out, "--resume", seed=5)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "interrupted" in proc.stderr and "completing its start" in proc.stderr
    _assert_exact_cli_run(out, 5, 5)


@pytest.mark.slow
def test_cli_resumes_after_kills_in_the_last_shard_and_the_summary(tmp_path):
    out = tmp_path / "run"
    # 5 pairs, 2 per shard: the third shard is the one ShardWriter.close finishes.
    proc = _cli(out, "--resume", env_extra={"MAGICSEG_SHARDS_CRASH_AT": "before_manifest:3"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    proc = _cli(out, "--resume", env_extra={RUN_CRASH_ENV: "finish_summary_tmp"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p for p in out.iterdir() if p.name.endswith(".tmp")]
    proc = _cli(out, "--resume")
    assert proc.returncode == 0 and "0 pairs generated, 5 were already done" in proc.stderr, proc.stderr[-2000:]
    _assert_exact_cli_run(out, 4, 5)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_stop_cleanly_and_say_how_to_resume(tmp_path, signum, code):
    out = tmp_path / "run"
    proc = _cli(out, num=40, wait=False)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while not (manifest.exists() and manifest.stat().st_size) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name}: " in err and "run the same command with --resume" in err
    # Stopped cleanly: every batch it rendered is in a finished shard, nothing half-written is left.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    lines = manifest.read_text().splitlines()
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(json.loads(x)["shard"] for x in lines)
    kept = sum(len(json.loads(x)["keys"]) for x in lines)
    assert 0 < kept < 40 and f"{kept} pairs are finished" in err
    proc = _cli(out, "--resume", num=40)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_exact_cli_run(out, 4, 40)

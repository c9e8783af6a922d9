"""Pretraining: candidates and labels, losses, the CLI, exact resume after a kill, torchrun DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.train.loop import checkpoint_paths, load_checkpoint, load_pretrain_preset, warmup_cosine
from magicseg_engine.train.objective import (
    BACKGROUND,
    IGNORE,
    LossWeights,
    pretraining_losses,
    remap_labels,
    sample_candidates,
    upsample_pixels,
)
from magicseg_engine.train.synthetic import write_synthetic_run


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    run = tmp_path_factory.mktemp("shapes") / "train"
    write_synthetic_run(run, 48, size=64, seed=1, samples_per_shard=16)
    return run


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_candidates_hold_own_classes_first_and_never_repeat():
    vocab = {f"c{i}": i for i in range(10)}
    rng = np.random.default_rng(0)
    got = sample_candidates([["c3"], ["c7", "c1"]], vocab, 5, rng)
    assert got.shape == (2, 5)
    assert got[0, 0] == 3 and got[1, :2].tolist() == [7, 1]
    assert all(len(set(row)) == 5 for row in got.tolist())
    assert sample_candidates([["c3"]], vocab, 100, rng).shape == (1, 10)  # capped at the vocabulary


def test_labels_remap_to_candidate_positions():
    vocab = {"cat": 0, "dog": 1, "car": 2}
    mask = torch.tensor([[[0, 1], [2, 255]]])
    candidates = torch.tensor([[2, 1, 0]])  # car, dog, cat
    labels = remap_labels(mask, [["dog", "car"]], candidates, vocab)
    assert labels.tolist() == [[[BACKGROUND, 1], [0, IGNORE]]]


def test_upsampling_embeddings_equals_upsampling_logits():
    torch.manual_seed(0)
    pixels, classes = torch.randn(2, 16, 8), torch.randn(2, 3, 8)
    up = upsample_pixels(pixels, (4, 4), (8, 8))
    logits = torch.einsum("bpe,bke->bkp", pixels, classes).reshape(2, 3, 4, 4)
    expected = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(torch.einsum("bpe,bke->bkp", up, classes).reshape(2, 3, 8, 8), expected, atol=1e-5)


def test_losses_reward_the_right_mask_and_the_hinge_only_similar_twins():
    torch.manual_seed(0)
    e = 4
    labels = torch.full((1, 8, 8), BACKGROUND, dtype=torch.int32)
    labels[0, :4] = 0  # top half is candidate 0
    classes = torch.nn.functional.normalize(torch.randn(1, 2, e), dim=-1)
    good = torch.zeros(1, 2, 2, e)
    good[0, 0] = classes[0, 0]  # top row of the 2x2 patch grid points at candidate 0
    good[0, 1] = -classes[0, 0]
    out = {"layers": [(good.reshape(1, 4, e), classes)], "logit_scale": torch.tensor(10.0), "grid": (2, 2),
           "global_embedding": torch.tensor([[1.0, 0, 0, 0]]), "twin_global_embedding": torch.tensor([[0.0, 1, 0, 0]])}
    right = pretraining_losses(out, labels, LossWeights(), stride=4)
    wrong = pretraining_losses({**out, "layers": [(-good.reshape(1, 4, e), classes)]}, labels, LossWeights(), stride=4)
    assert right["focal"] < wrong["focal"] and right["dice"] < wrong["dice"]
    assert right["counterfactual"] == 0  # orthogonal twins: nothing to push apart
    same = pretraining_losses({**out, "twin_global_embedding": out["global_embedding"]}, labels, LossWeights(), stride=4)
    assert same["counterfactual"] == pytest.approx(1.0)


def test_schedule_warms_up_then_decays_to_the_floor():
    f = warmup_cosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


@pytest.mark.slow
def test_pretrain_cli_trains_checkpoints_and_refuses_misuse(shapes, tmp_path):
    out = tmp_path / "ckpt"
    result = invoke("pretrain", "--data", shapes, "--out", out, "--steps", 6, "--checkpoint-every", 3,
                    "--batch-size", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert [s for s, _ in checkpoint_paths(out)] == [3, 6]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert all(np.isfinite(m["loss"]) and m["counterfactual"] >= 0 for m in lines)
    saved = json.loads((out / "pretrain.json").read_text())
    assert saved["vocabulary"] == ["blue triangle", "green square", "red circle", "yellow diamond"]

    again = invoke("pretrain", "--data", shapes, "--out", out, "--steps", 6, "--device", "cpu")
    assert again.exit_code == 2 and "--resume" in again.stderr
    other = invoke("pretrain", "--data", shapes, "--out", out, "--steps", 9, "--resume", "--device", "cpu",
                   "--checkpoint-every", 3, "--batch-size", 4, "--candidates", 3)
    assert other.exit_code == 2 and "other settings (candidates differ)" in other.stderr
    empty = invoke("pretrain", "--data", tmp_path, "--out", tmp_path / "x", "--device", "cpu")
    assert empty.exit_code == 2 and "no manifest.jsonl" in empty.stderr
    missing = invoke("pretrain", "--data", shapes, "--out", tmp_path / "y", "--resume", "--device", "cpu")
    assert missing.exit_code == 2 and "holds no checkpoint" in missing.stderr
    half = invoke("pretrain", "--data", shapes, "--out", tmp_path / "z", "--precision", "fp16", "--device", "cpu")
    assert half.exit_code == 2 and "fp16" in half.stderr and not (tmp_path / "z").exists()


def test_checkpoint_of_another_model_config_is_one_line(shapes, tmp_path):
    out = tmp_path / "ckpt"
    assert invoke("pretrain", "--data", shapes, "--out", out, "--steps", 2, "--batch-size", 2,
                  "--device", "cpu").exit_code == 0
    state = load_checkpoint(checkpoint_paths(out)[-1][1])
    state["config"]["model"]["decoder_layers"] = 5
    torch.save(state, checkpoint_paths(out)[-1][1])
    result = invoke("pretrain", "--data", shapes, "--out", out, "--steps", 4, "--batch-size", 2, "--resume",
                    "--device", "cpu")
    assert result.exit_code == 2
    assert "another model config (decoder_layers differ)" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_resume_deletes_what_killed_writes_left(shapes, tmp_path):
    """A kill inside a checkpoint, metrics or config write leaves its temporary file; the resume
    deletes those (and nothing else), then writes the files again whole."""
    out = tmp_path / "run"
    args = ["pretrain", "--data", shapes, "--out", out, "--steps", 2, "--checkpoint-every", 1, "--batch-size", 2,
            "--device", "cpu"]
    assert invoke(*args).exit_code == 0
    cache = next((out / "text-cache").glob("text-*.safetensors"))
    planted = [out / "checkpoints" / ".step-00000003.pt.k2j4_x.tmp", out / ".metrics.jsonl.abc123.tmp",
               out / ".pretrain.json.q9w8e7.tmp", out / "text-cache" / f".{cache.name}.zz11aa.tmp"]
    kept = [out / "notes.tmp", out / "checkpoints" / ".step-00000003.pt"]  # not the run's temporary files
    for path in planted + kept:
        path.write_bytes(b"half")
    result = invoke(*args[:6], 3, *args[7:], "--resume")
    assert result.exit_code == 0, result.output
    assert [p for p in planted if p.exists()] == [] and all(p.exists() for p in kept)
    assert [s for s, _ in checkpoint_paths(out)][-1] == 3


def _command(data, out, steps):
    return [sys.executable, "-m", "magicseg_engine.cli", "pretrain", "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--checkpoint-every", "4", "--batch-size", "4", "--device", "cpu"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_resume_after_a_kill_ends_with_the_same_weights(shapes, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_command(shapes, straight, 12), check=True, env=_env(), capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(shapes, killed, 12), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint_paths(killed) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [s for s, _ in checkpoint_paths(killed)]
    assert done and done[-1] < 12, "the kill came after the run finished; nothing was resumed"
    subprocess.run(_command(shapes, killed, 12) + ["--resume"], check=True, env=_env(), capture_output=True)

    a = load_checkpoint(checkpoint_paths(straight)[-1][1])
    b = load_checkpoint(checkpoint_paths(killed)[-1][1])
    assert a["step"] == b["step"] == 12 and a["loader"] == b["loader"]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    metrics = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, 13))  # steps after the checkpoint were logged once, not twice


@pytest.mark.slow
def test_torchrun_two_processes_on_gloo(shapes, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "magicseg_engine.cli", "pretrain", "--data", str(shapes), "--out", str(out), "--steps", "4",
           "--checkpoint-every", "2", "--batch-size", "2", "--grad-accum", "2", "--device", "cpu"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(checkpoint_paths(out)[-1][1])
    assert state["step"] == 4 and state["world_size"] == 2
    # Each rank read 4 steps x 2 micro-batches x 2 images of its own half.
    assert state["loader"]["consumed"] + state["loader"]["epoch"] * 24 == 16
    assert json.loads((out / "pretrain.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_tiny_model_learns_coloured_shapes(shapes_model, tmp_path):
    """No real weights needed: 400 CPU steps on synthetic shapes reach a held-out mIoU far above
    chance (an untrained model scores about 0.1), and the counterfactual hinge falls."""
    from magicseg_engine.train.data import PairLoader
    from magicseg_engine.train.model import MagicSegModel, TextEmbeddingBank
    from magicseg_engine.train.segment import mean_iou

    write_synthetic_run(tmp_path / "held", 64, size=64, seed=2)
    found = checkpoint_paths(shapes_model)
    assert found[-1][0] == 400

    config = load_pretrain_preset("tiny")
    state = load_checkpoint(found[-1][1])
    model = MagicSegModel(config.model)
    model.load_state_dict(state["model"])
    vocab = state["vocabulary"]
    text = TextEmbeddingBank(model, cache_dir=shapes_model / "text-cache").lookup(vocab)
    held = PairLoader(tmp_path / "held", 16, 64, augment=False, shuffle=False)
    result = mean_iou(model, held, text, vocab)
    assert result["miou"] > 0.5, result
    assert min(result["iou"].values()) > 0.3, result  # every shape, not just the background

    hinge = [json.loads(x)["counterfactual"] for x in (shapes_model / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(hinge[-50:]) < 0.8 * np.mean(hinge[:20])


def test_pretrain_reads_what_generate_wrote(tmp_path):
    run = tmp_path / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 4, "--out", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = invoke("pretrain", "--data", run, "--out", tmp_path / "ckpt", "--steps", 2, "--batch-size", 2,
                    "--vocab", "voc", "--device", "cpu")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "ckpt" / "pretrain.json").read_text())
    assert len(saved["vocabulary"]) == 20  # the whole VOC list, not only the classes drawn
    assert [s for s, _ in checkpoint_paths(tmp_path / "ckpt")] == [2]


def test_a_run_without_masks_is_refused_by_pretrain_evaluate_and_export(tmp_path, tiny_run):
    """A --mask-source none run has nothing to learn from or score against: each command says so
    in one line with the command that adds masks, exits 2 and creates no output."""
    # Only read (every command is refused before it writes): the shared run of these flags
    # (conftest.py).
    run = tiny_run("--classes", "voc", "--num-pairs", 1, "--mask-source", "none")
    fix = f"magicseg-engine masks --data {run} --out {run}-masks --mask-source detector"
    attempts = {
        "pretrain": ("pretrain", "--data", run, "--out", tmp_path / "out", "--device", "cpu"),
        "pretrain-dali": ("pretrain", "--data", run, "--out", tmp_path / "out", "--loader", "dali", "--device", "cpu"),
        "evaluate": ("evaluate", "--checkpoint", tmp_path / "out", "--dataset", "mmseg", "--root", run,
                     "--json", tmp_path / "out" / "eval.json", "--device", "cpu"),
        "export": ("export", "--data", run, "--format", "mmseg", "--out", tmp_path / "out"),
    }
    for name, args in attempts.items():
        result = invoke(*args)
        assert result.exit_code == 2, (name, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "--mask-source none" in lines[0] and fix in lines[0], (name, result.stderr)
        assert not (tmp_path / "out").exists(), name


def test_samples_without_masks_are_one_line_too(tmp_path):
    """A run without run.json (written by write_synthetic_run) whose samples have no masks."""
    write_synthetic_run(tmp_path / "bare", 4, size=64, seed=1, masks=False)
    result = invoke("pretrain", "--data", tmp_path / "bare", "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "0 usable samples" in result.stderr and "no_mask" in result.stderr and "magicseg-engine masks" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from magicseg_engine.bench.generate import bench_generate, pair_flops, reference_image
from magicseg_engine.cli import app
from magicseg_engine.config import load_preset
from magicseg_engine.pipeline import build_sampler


@pytest.fixture(scope="module")
def sampler():
    return build_sampler(load_preset("tiny"), "cpu")


def test_reference_loop_draws_the_engines_positive(sampler):
    # The baseline does the same work: same noise, same prompt, batch 1 → the same image.
    ref = reference_image(sampler, "a dog on a beach", seed=7)[0]
    ours = sampler(["a dog on a beach"], ["nothing on a beach"], [7]).positives[0]
    assert np.abs(ref.astype(int) - ours.astype(int)).max() <= 2


def test_pair_flops_add_up(sampler):
    f = pair_flops(sampler)
    assert f["unet_call_4_rows"] > 0 and f["vae_decode_1_image"] > 0 and f["text_encoder_1_prompt"] > 0
    steps = sampler.settings.steps
    assert f["pair"] == steps * f["unet_call_4_rows"] + 2 * f["vae_decode_1_image"] + 3 * f["text_encoder_1_prompt"]


def test_bench_result_is_consistent(sampler):
    r = bench_generate(sampler, ["a dog", "a cat", "a cow"], ["nothing"] * 3, [1, 2, 3], batch_size=2, warmup=0, reps=2)
    assert r["engine"]["reps"] == 2 and r["reference"]["reps"] == 2
    assert r["engine"]["pairs_per_s"] == pytest.approx(3 / r["engine"]["median_s"])
    assert r["speedup"] == pytest.approx(r["engine"]["pairs_per_s"] / r["reference"]["pairs_per_s"])
    assert r["engine"]["unet_rows_per_step"] == 8 and r["reference"]["unet_rows_per_step"] == 2
    assert r["fraction_of_ceiling"] is None and r["dense_peak_tflops"] is None  # no known peak for a CPU
    assert r["settings"]["steps"] == sampler.settings.steps and r["machine"]["device"] == "cpu"


def test_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "generate", "--preset", "tiny", "--pairs", "2", "--batch-size", "2",
                                      "--reps", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["benchmark"] == "generate" and data["settings"]["preset"] == "tiny"
    assert "reference" in result.stderr and "pairs/s" in result.stderr


def test_cli_rejects_bad_numbers():
    result = CliRunner().invoke(app, ["bench", "generate", "--pairs", "0"])
    assert result.exit_code == 2 and "--pairs" in result.stderr


def test_masks_benchmark_reports_capture_overhead_and_sam_speedup(tmp_path):
    out = tmp_path / "masks.json"
    result = CliRunner().invoke(app, ["bench", "masks", "--pairs", "2", "--reps", "1", "--warmup", "0",
                                      "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    capture, sam = data["capture"], data["sam"]
    assert capture["layers"] > 0 and capture["kernel"] == "torch reference"
    assert capture["overhead"] == pytest.approx(
        capture["with_capture"]["median_s"] / capture["without_capture"]["median_s"] - 1)
    assert sam["images"] == 2 and sam["speedup"] == pytest.approx(
        sam["one_by_one"]["median_s"] / sam["batched"]["median_s"])


def test_bench_pretrain_times_loaders_and_steps(tmp_path):
    out = tmp_path / "pretrain.json"
    result = CliRunner().invoke(app, ["bench", "pretrain", "--samples", "16", "--reps", "1", "--warmup", "0",
                                      "--workers", "0", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["loaders"]["torch"]["images"] == 16
    assert data["step"]["eager"]["images_per_s"] == pytest.approx(
        data["step"]["eager"]["batch_size"] / data["step"]["eager"]["median_s"])
    assert "skipped" in data["step"]["fused"]  # no GPU here
    if "images_per_s" in data["loaders"]["dali"]:
        assert data["loaders"]["dali"]["images"] == 16
        assert data["loaders"]["dali_speedup"] == pytest.approx(
            data["loaders"]["dali"]["images_per_s"] / data["loaders"]["torch"]["images_per_s"])

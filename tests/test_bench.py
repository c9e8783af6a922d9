import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from magicseg_engine.bench.generate import bench_generate, pair_flops, reference_image
from magicseg_engine.cli import app
from magicseg_engine.config import load_preset
from magicseg_engine.errors import UsageError
from magicseg_engine.pipeline import build_sampler


@pytest.fixture(scope="module")
def sampler(tiny_sampler):
    # The shared tiny sampler (conftest.py): the benchmarks only sample with it, count its FLOPs
    # and time its calls; a mask stage's capture is installed only for the length of each batch.
    return tiny_sampler


@pytest.mark.slow
def test_reference_loop_draws_the_engines_positive(sampler):
    # The baseline does the same work: same noise, same prompt, batch 1 → the same image.
    ref = reference_image(sampler, "a dog on a beach", seed=7)[0]
    ours = sampler(["a dog on a beach"], ["nothing on a beach"], [7]).positives[0]
    assert np.abs(ref.astype(int) - ours.astype(int)).max() <= 2


@pytest.mark.slow
def test_pair_flops_add_up(sampler):
    f = pair_flops(sampler)
    assert f["unet_call_4_rows"] > 0 and f["vae_decode_1_image"] > 0 and f["text_encoder_1_prompt"] > 0
    steps = sampler.settings.steps
    assert f["pair"] == steps * f["unet_call_4_rows"] + 2 * f["vae_decode_1_image"] + 3 * f["text_encoder_1_prompt"]


@pytest.mark.slow
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
    assert capture["layers"] > 0 and capture["kernel"].startswith("torch")
    assert capture["overhead"] == pytest.approx(
        capture["with_capture"]["median_s"] / capture["without_capture"]["median_s"] - 1)
    assert capture["overhead_positives_only"] == pytest.approx(
        capture["positives_only"]["median_s"] / capture["without_capture"]["median_s"] - 1)
    assert capture["cpu_seconds"]["with_capture"]["reps"] == 1 and capture["threads"] >= 1
    assert sam["images"] == 2 and sam["speedup"] == pytest.approx(
        sam["one_by_one"]["median_s"] / sam["batched"]["median_s"])


def test_masks_benchmark_at_another_size_without_sam(tmp_path):
    out = tmp_path / "masks.json"
    result = CliRunner().invoke(app, ["bench", "masks", "--pairs", "1", "--reps", "1", "--warmup", "0", "--size", "32",
                                      "--steps", "2", "--no-sam", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert "sam" not in data and data["capture"]["size"] == [32, 32] and data["capture"]["steps"] == 2
    result = CliRunner().invoke(app, ["bench", "masks", "--size", "0", "--device", "cpu"])
    assert result.exit_code == 2 and "--size" in result.output


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


def test_unet_flops_are_linear_in_rows_and_the_baseline_is_two_rows(sampler):
    from magicseg_engine.bench.generate import pair_flops
    from magicseg_engine.bench.unet import bench_unet, unet_flops_per_row

    assert 4 * unet_flops_per_row(sampler) == pair_flops(sampler)["unet_call_4_rows"]
    r = bench_unet(sampler, (1, 2), warmup=0, reps=1)
    assert [row["rows"] for row in r["rows"]] == [2, 4, 8]
    assert r["baseline"]["rows"] == 2 and r["best"] in r["rows"][1:]
    for row in r["rows"]:
        assert row["tflops_per_s"] == pytest.approx(row["rows"] * r["flops_per_row"] / row["median_s"] / 1e12)
    assert r["speedup"] == pytest.approx(r["best"]["rows_per_s"] / r["baseline"]["rows_per_s"])


def test_flops_counted_on_the_meta_device_are_the_real_modules_counts(sampler):
    from magicseg_engine.bench.flops import count_pair_flops

    real = pair_flops(sampler)
    meta = count_pair_flops("tiny")
    assert meta["pair_tflops"] * 1e12 == pytest.approx(real["pair"], rel=1e-12)
    assert meta["unet_tflops_per_row"] * 4e12 == pytest.approx(real["unet_call_4_rows"], rel=1e-12)
    assert meta["parameters"]["unet"] == sum(p.numel() for p in sampler.models.unet.parameters())


@pytest.mark.slow
def test_flops_benchmark_counts_every_family_against_sd15(tmp_path):
    from magicseg_engine.bench.common import DENSE_PEAK_TFLOPS
    from magicseg_engine.bench.unet import unet_flops_per_row

    out = tmp_path / "flops.json"
    result = CliRunner().invoke(app, ["bench", "flops", "--steps", "10", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = {r["preset"]: r for r in data["rows"]}
    assert list(rows) == ["sd15-random", "sd21-random", "sdxl-random"] and data["baseline"] == "sd15-random"
    assert [(r["family"], r["height"], r["steps"]) for r in rows.values()] == [("sd1", 512, 10), ("sd2", 768, 10),
                                                                              ("sdxl", 1024, 10)]
    assert rows["sd15-random"]["vs_first"] == 1.0
    # Bigger UNets at more pixels: each family costs several times the one before.
    assert 2 < rows["sd21-random"]["vs_first"] < rows["sdxl-random"]["vs_first"] / 2
    assert rows["sdxl-random"]["parameters"]["unet"] == 2_567_463_684  # SDXL base as published
    for r in rows.values():
        assert r["ceiling_pairs_per_s"]["H100 SXM"] == pytest.approx(DENSE_PEAK_TFLOPS["H100 SXM"] / r["pair_tflops"])
        assert 0.5 < r["unet_share"] < 1
    # The SDXL UNet's count includes its added conditions (bench unet counts through the same path).
    sampler_xl = build_sampler(load_preset("sdxl-random", {"diffusion": {"dtype": "float32"}}), "meta")
    assert unet_flops_per_row(sampler_xl) == pytest.approx(rows["sdxl-random"]["unet_tflops_per_row"] * 1e12, rel=1e-12)
    result = CliRunner().invoke(app, ["bench", "flops", "--presets", "sd15"])
    assert result.exit_code == 2 and "random preset" in result.stderr
    page = _summarize(tmp_path)
    assert "| sdxl-random (sdxl, 1024x1024, 10 steps): FLOPs per guided pair vs sd15-random |" in page
    assert f"H100 SXM {rows['sdxl-random']['ceiling_pairs_per_s']['H100 SXM']:.3g}" in page


def test_losses_benchmark_times_the_references_and_says_why_not_the_kernels():
    import torch

    from magicseg_engine.bench.losses import bench_losses

    r = bench_losses("tiny", torch.device("cpu"), warmup=0, reps=1)
    assert r["shapes"]["pixels"] == (64 // 4) ** 2 and r["shapes"]["candidates"] == 100
    for name in ("segmentation", "counterfactual"):
        assert r[name]["eager"]["median_s"] > 0
        assert "GPU" in r[name]["fused"]["skipped"] and r[name]["speedup"] is None


def _summarize(results: Path) -> str:
    """benchmarks/summarize.py run over the JSON files in `results`; returns the page it wrote."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "summarize", Path(__file__).parent.parent / "benchmarks" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    summarize.RESULTS = results
    summarize.main()
    return (results / "README.md").read_text()


@pytest.mark.slow
def test_bench_all_runs_every_benchmark_and_summarises_ratios(tmp_path):
    out = tmp_path / "all.json"
    result = CliRunner().invoke(app, ["bench", "all", "--preset", "tiny", "--device", "cpu", "--reps", "1",
                                      "--warmup", "0", "--pairs", "2", "--batch-size", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    names = ["generate", "unet", "pipeline", "masks", "sam", "losses", "loader", "train"]
    assert list(data["results"]) == names and [r["bench"] for r in data["summary"]] == names
    summary = {r["bench"]: r for r in data["summary"]}
    gen = data["results"]["generate"]
    assert summary["generate"]["ratio"] == pytest.approx(gen["engine"]["pairs_per_s"] / gen["reference"]["pairs_per_s"])
    assert summary["sam"]["ratio"] == pytest.approx(data["results"]["sam"]["speedup"])
    for name in ("generate", "unet", "pipeline", "masks", "sam", "loader"):
        assert summary[name]["ratio"] > 0, summary[name]
    for name in ("losses", "train"):  # no GPU: measured without the fused kernels, and said so
        assert summary[name]["ratio"] is None and "GPU" in summary[name]["note"]
    assert "bench all" in result.output and "ratio" in result.output

    # The results page and chart are made from such files.
    page = _summarize(tmp_path)
    assert "| generate: paired sampler vs batch-1 loop |" in page and "![all](all.png)" in page
    assert (tmp_path / "all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_pipeline_writes_each_pair_with_one_merged_mask(sampler, tiny_sam, tmp_path):
    import tarfile

    from PIL import Image

    from magicseg_engine.bench.pipeline import reference_pipeline
    from magicseg_engine.masks.detector import build_detector
    from magicseg_engine.masks.sam import SamRefiner
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    config = load_preset("tiny")
    records = build_prompts(config.prompts, vocab=load_vocabulary("voc"), num=2).records
    # The preset's SAM without a checkpoint, on the CPU, from seed 0: the shared tiny SAM
    # (conftest.py).
    assert (config.sam.model_type, config.sam.checkpoint) == ("tiny", None)
    refiner = SamRefiner(tiny_sam)
    reference_pipeline(sampler, build_detector("tiny"), refiner, records, tmp_path / "ref.tar")
    with tarfile.open(tmp_path / "ref.tar") as tar:
        names = tar.getnames()
        assert names == [f"{i:06d}.{m}" for i in range(2) for m in ("pos.jpg", "neg.jpg", "mask.png")]
        mask = np.asarray(Image.open(tar.extractfile("000000.mask.png")))
    assert mask.shape == (sampler.settings.height, sampler.settings.width) and set(np.unique(mask)) <= {0, 1}


@pytest.mark.slow
def test_pipeline_benchmark_sweeps_batch_and_encoders_against_the_reference(sampler):
    from magicseg_engine.bench.pipeline import bench_pipeline
    from magicseg_engine.pipeline import build_mask_stage
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import load_vocabulary

    config = load_preset("tiny")
    records = build_prompts(config.prompts, vocab=load_vocabulary("voc"), num=3).records
    r = bench_pipeline(config, sampler, build_mask_stage(config, sampler), records, batch_sizes=(1, 4), encode_workers=(1, 2), warmup=0, reps=1)
    assert [(x["batch_size"], x["encode_workers"]) for x in r["engine_by_batch"]] == [(1, 4), (3, 4)]  # 4 > 3 pairs
    best_batch = max(r["engine_by_batch"], key=lambda x: x["pairs_per_s"])["batch_size"]
    assert [(x["batch_size"], x["encode_workers"]) for x in r["engine_by_encode_workers"]] == [(best_batch, 1), (best_batch, 2)]
    for row in r["engine_by_batch"] + r["engine_by_encode_workers"] + [r["reference"]]:
        assert row["pairs_per_s"] == pytest.approx(3 / row["median_s"])
    assert r["speedup"] == pytest.approx(r["best"]["pairs_per_s"] / r["reference"]["pairs_per_s"])


@pytest.mark.slow
def test_tune_sweeps_variants_and_batch_sizes_against_the_reference(tmp_path, monkeypatch):
    import magicseg_engine.pipeline as pipeline

    built = []
    real_build = pipeline.build_sampler

    def recording_build(config, device, backend="torch", engines=None, channels_last=None, attention="auto"):
        built.append((backend, config.diffusion.dtype, channels_last, attention))
        return real_build(config, device, backend, engines, channels_last, attention)

    monkeypatch.setattr(pipeline, "build_sampler", recording_build)
    out = tmp_path / "tune.json"
    # The CPU has no memory-efficient attention kernel: that variant fails, is recorded, and the
    # sweep goes on, which also shows that the attention choice reaches the UNet.
    variants = "torch:float32:nchw:math,torch:float32:nchw:efficient,torch:float32:nhwc"
    result = CliRunner().invoke(app, ["bench", "tune", "--preset", "tiny", "--device", "cpu", "--variants", variants,
                                      "--batch-sizes", "1,2", "--pairs", "2", "--reference-pairs", "1", "--reps", "1",
                                      "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    # The reference first (eager, NCHW, the preset's precision), then each variant as asked.
    assert built == [("torch", "float32", False, "auto"), ("torch", "float32", False, "math"),
                     ("torch", "float32", False, "efficient"), ("torch", "float32", True, "auto")]
    data = json.loads(out.read_text())
    assert [v["variant"] for v in data["variants"]] == variants.split(",")
    failed = data["variants"].pop(1)
    assert failed["attention"] == "efficient" and "pipeline" not in failed
    assert failed["error"].startswith("UsageError: --attention efficient: torch has no efficient attention kernel")
    assert [v["attention"] for v in data["variants"]] == ["math", "auto"]
    ref = data["reference"]
    assert ref["pairs"] == 1 and ref["pairs_per_s"] == pytest.approx(1 / ref["median_s"])
    for v in data["variants"]:
        assert [r["batch_size"] for r in v["pipeline"]] == [1, 2]
        assert all(r["pairs_per_s"] == pytest.approx(2 / r["median_s"]) for r in v["pipeline"])
        assert v["best"] == max(v["pipeline"], key=lambda r: r["pairs_per_s"])
        unet = v["unet"]
        assert unet["rows"] == 8 and unet["tflops_per_s"] == pytest.approx(
            8 * v["flops_per_row"] / unet["median_s"] / 1e12)
        assert unet["fraction_of_peak"] is None  # no known ceiling for a CPU
    best = max(data["variants"], key=lambda v: v["best"]["pairs_per_s"])
    assert data["best"]["variant"] == best["variant"] and data["best"]["pairs_per_s"] == best["best"]["pairs_per_s"]
    flags = {"torch:float32:nchw:math": "--backend torch --dtype float32 --no-channels-last --attention math",
             "torch:float32:nhwc": "--backend torch --dtype float32 --channels-last --attention auto"}
    assert data["best"]["generate_flags"] == f"{flags[best['variant']]} --batch-size {best['best']['batch_size']}"
    assert data["best"]["generate_flags"] in " ".join(result.stderr.split())
    assert data["speedup"] == pytest.approx(data["best"]["pairs_per_s"] / ref["pairs_per_s"])
    aims = data["aims"]
    assert aims["end_to_end_speedup"]["target"] == 8.0
    assert aims["end_to_end_speedup"]["met"] == (data["speedup"] >= 8.0)
    assert aims["unet_fraction_of_peak"] == {"target": 0.5, "measured": None, "met": None}
    assert set(data["sdpa"]) == {"flash", "mem_efficient", "cudnn", "math"} and "tune" in result.stderr

    page = _summarize(tmp_path)
    assert "| torch:float32:nhwc, prompts to shards vs reference pipeline |" in page
    assert "| torch:float32:nchw:efficient, prompts to shards vs reference pipeline | failed |" in page
    assert "no FLOP ceiling known for this device" in page and "![tune](tune.png)" in page
    assert (tmp_path / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("variants, message", [
    ("tensorrt:float32", "backend must be one of torch, compile, onnxruntime"),
    ("onnxruntime:float32:nhwc", "write onnxruntime:dtype[@threads]"),
    ("onnxruntime:float16", "exported in half precision runs only on a GPU"),
    ("torch:float32@0", "@threads must be a positive whole number"),
    ("torch:float32@two", "@threads must be a positive whole number"),
    ("torch:float16", "float16 runs only on a GPU"),
    ("torch:float64", "dtype must be one of"),
    ("torch:float32:nhwd", "layout must be nhwc or nchw"),
    ("torch", "write backend:dtype[:layout[:attention]]"),
    ("torch:float32:nchw:fast", "attention must be one of auto, flash, efficient, cudnn, math"),
    (",", "--variants is empty"),
])
def test_tune_refuses_bad_variants_before_any_work(tmp_path, variants, message):
    out = tmp_path / "tune.json"
    result = CliRunner().invoke(app, ["bench", "tune", "--device", "cpu", "--variants", variants, "--json", str(out)])
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_tune_default_layout_follows_the_device():
    import torch

    from magicseg_engine.bench.tune import default_variants, parse_variants

    assert parse_variants("torch:float32", torch.device("cpu"))[0].channels_last is False
    assert parse_variants("torch:float32", torch.device("cpu"))[0].attention == "auto"
    assert parse_variants("torch:float32:nhwc:flash", torch.device("cpu"))[0].name == "torch:float32:nhwc:flash"
    assert parse_variants("torch:float16", torch.device("cuda"))[0].channels_last is True
    assert [v.name for v in parse_variants("compile:bfloat16:nchw, compile:bfloat16:nchw", torch.device("cuda"))] == [
        "compile:bfloat16:nchw"]
    gpu = default_variants(torch.device("cuda"))
    assert {v.backend for v in gpu} == {"torch", "compile"} and {v.dtype for v in gpu} == {"float16", "bfloat16"}
    assert {v.channels_last for v in gpu} == {True, False} and {v.attention for v in gpu} == {"auto", "math"}
    assert all(v.threads is None for v in gpu)
    assert parse_variants("torch:float32:nhwc@3", torch.device("cpu"))[0].threads == 3
    assert parse_variants("onnxruntime:float32@2", torch.device("cuda"))[0].name == "onnxruntime:float32@2"


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw {extra}
vmx flags\t: vnmi preemption_timer {vmx}
bugs\t\t: spectre_v1
"""


@pytest.mark.parametrize("extra, vmx, supported", [
    ("amx_bf16 amx_tile", "", True),          # Sapphire Rapids and later
    ("avx512_bf16", "", True),                # Cooper Lake, Zen 4
    ("avx512_vnni", "", False),               # AVX512 without bfloat16 instructions
    ("", "amx_bf16", False),                  # only the flags line counts
])
def test_cpu_supports_bf16_reads_the_cpuinfo_flags(extra, vmx, supported):
    from magicseg_engine.generate.models import cpu_supports_bf16

    assert cpu_supports_bf16(CPUINFO.format(extra=extra, vmx=vmx)) is supported
    assert cpu_supports_bf16("") is False  # no flags line at all (not Linux on x86)


def test_cpu_sweep_crosses_thread_counts_and_adds_onnxruntime(monkeypatch):
    import torch

    import magicseg_engine.generate.models as models
    from magicseg_engine.bench import tune

    cpu = torch.device("cpu")
    assert [tune.cpu_thread_counts(n) for n in (16, 8, 4, 2, 1)] == [[16, 8], [8, 4], [4, 2, 1], [2, 1], [1]]
    monkeypatch.setattr(tune, "physical_cores", lambda: 8)
    monkeypatch.setattr(tune, "cpu_supports_bf16", lambda cpuinfo=None: False)
    names = [v.name for v in tune.default_variants(cpu)]
    assert names == [f"{base}@{n}" for n in (8, 4) for base in (
        "torch:float32:nchw", "torch:float32:nhwc", "torch:float32:nchw:math", "onnxruntime:float32")]
    skipped = tune.skipped_variants(cpu)
    assert [s["variant"] for s in skipped] == ["torch:bfloat16:nchw@8", "torch:bfloat16:nhwc@8",
                                               "torch:bfloat16:nchw@4", "torch:bfloat16:nhwc@4"]
    assert all("amx_bf16" in s["reason"] and "avx512_bf16" in s["reason"] for s in skipped)
    with pytest.raises(UsageError, match="neither amx_bf16 nor avx512_bf16"):
        tune.parse_variants("torch:bfloat16:nhwc", cpu)
    # With the instructions, bfloat16 is swept only where generate would run it as bfloat16.
    monkeypatch.setattr(tune, "cpu_supports_bf16", lambda cpuinfo=None: True)
    monkeypatch.setattr(models, "resolve_dtype", lambda requested, device: torch.float32)
    assert all(v.dtype == "float32" for v in tune.default_variants(cpu))
    assert {s["reason"] for s in tune.skipped_variants(cpu)} == {"generate runs bfloat16 as float32 on the CPU"}
    monkeypatch.setattr(models, "resolve_dtype", lambda requested, device: getattr(torch, requested))
    variants = tune.default_variants(cpu)
    assert [v.name for v in variants if v.dtype == "bfloat16"] == [
        "torch:bfloat16:nchw@8", "torch:bfloat16:nhwc@8", "torch:bfloat16:nchw@4", "torch:bfloat16:nhwc@4"]
    assert tune.skipped_variants(cpu) == [] and tune.parse_variants("torch:bfloat16", cpu)[0].dtype == "bfloat16"
    # What the advice says for each kind of variant.
    ort = tune.parse_variants("onnxruntime:float32@2", cpu)[0]
    assert ort.generate_flags(8) == "--backend onnxruntime --engines ENGINES --dtype float32 --threads 2 --batch-size 8"
    assert ort.build_engines_command("tiny", cpu, None) == (
        "magicseg-engine build-engines --preset tiny --precision fp32 --device cpu --out ENGINES")
    assert variants[0].generate_flags(4) == (
        "--backend torch --dtype float32 --no-channels-last --attention auto --threads 8 --batch-size 4")
    assert variants[0].build_engines_command("tiny", cpu, None) is None


@pytest.mark.slow
def test_tune_on_the_cpu_sets_threads_and_runs_onnxruntime_from_one_export(tmp_path, monkeypatch):
    import torch

    import magicseg_engine.engine.build as build
    import magicseg_engine.pipeline as pipeline

    built, exports = [], []
    real_build, real_export = pipeline.build_sampler, build.build_engines

    def recording_build(config, device, backend="torch", engines=None, channels_last=None, attention="auto"):
        built.append((backend, engines is not None, torch.get_num_threads()))
        return real_build(config, device, backend, engines, channels_last, attention)

    def recording_export(config, out, **kwargs):
        exports.append(kwargs)
        return real_export(config, out, **kwargs)

    monkeypatch.setattr(pipeline, "build_sampler", recording_build)
    monkeypatch.setattr(build, "build_engines", recording_export)
    threads_before = torch.get_num_threads()
    out = tmp_path / "tune.json"
    variants = "torch:float32:nchw@1,onnxruntime:float32@1,onnxruntime:float32@2"
    result = CliRunner().invoke(app, ["bench", "tune", "--preset", "tiny", "--device", "cpu", "--variants", variants,
                                      "--batch-sizes", "2", "--pairs", "2", "--reference-pairs", "1", "--reps", "1",
                                      "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads_before  # each variant's count is undone after it
    # The reference at torch's own count, then each variant at its own; one export for both
    # onnxruntime variants, with the components a run with masks and SAM reads.
    assert built == [("torch", False, threads_before), ("torch", False, 1), ("onnxruntime", True, 1),
                     ("onnxruntime", True, 2)]
    assert len(exports) == 1 and exports[0]["fmt"] == "onnx" and exports[0]["precision"] == "fp32"
    assert set(exports[0]["components"]) == {"text-encoder", "unet", "vae-decoder", "unet-capture",
                                             "sam-image-encoder", "sam-mask-decoder"}
    data = json.loads(out.read_text())
    assert [v["variant"] for v in data["variants"]] == variants.split(",")
    assert data["reference"]["threads"] == threads_before and data["exports"]["fp32"]["seconds"] > 0
    assert data["cpu"]["thread_counts"][0] == data["cpu"]["physical_cores"] and data["skipped"] == []
    for v in data["variants"]:
        assert "error" in v or v["threads"] == int(v["variant"].split("@")[1])
    ort = [v for v in data["variants"] if v["backend"] == "onnxruntime"]
    assert all(v["channels_last"] is False and v["attention"] == "auto" for v in ort)
    # A variant that cannot run is recorded with its error; one that ran has its rows.
    assert all("error" in v or [r["batch_size"] for r in v["pipeline"]] == [2] for v in ort)
    best = data["best"]
    said = " ".join(result.stderr.split())
    assert f"fastest here: magicseg-engine generate --preset tiny {best['generate_flags']}" in said
    threads = best["variant"].split("@")[1]
    assert f"--threads {threads} --batch-size {best['batch_size']}" in best["generate_flags"]
    if best["variant"].startswith("onnxruntime"):
        assert "--backend onnxruntime --engines ENGINES" in best["generate_flags"]
        assert f"export first: {best['build_engines']}" in said and "--precision fp32" in best["build_engines"]
    else:
        assert best["build_engines"] is None and "export first" not in said


@pytest.mark.slow
def test_generate_threads_sets_torchs_count_before_models_load(tmp_path, monkeypatch):
    import importlib.util

    import torch

    import magicseg_engine.pipeline as pipeline

    seen = []

    def stop_at_models(config, device, *args, **kwargs):
        seen.append(torch.get_num_threads())
        raise UsageError("stopped before the models")

    monkeypatch.setattr(pipeline, "build_sampler", stop_at_models)
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    try:
        result = CliRunner().invoke(app, ["generate", "--out", str(tmp_path / "run"), "--classes", "voc",
                                          "--num-pairs", "1", "--device", "cpu", "--threads", str(wanted)])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 2 and "stopped before the models" in result.stderr
    assert seen == [wanted] and not (tmp_path / "run").exists()
    refusals = [(["--threads", "0", "--device", "cpu"], "--threads must be a positive number")]
    if importlib.util.find_spec("ray") is not None:  # without Ray, --ray is refused for that first
        refusals.append((["--threads", "2", "--ray"], "Ray workers run --cpus-per-worker threads"))
    for flags, message in refusals:
        result = CliRunner().invoke(app, ["generate", "--out", str(tmp_path / "run"), "--classes", "voc",
                                          "--num-pairs", "1", *flags])
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert seen == [wanted] and torch.get_num_threads() == before

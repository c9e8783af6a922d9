"""Fast mode (generate/fast.py): deep UNet features reused between full steps, on the tiny preset."""

import dataclasses
import json
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from families import SDXL_UNET, TEXT_2

from magicseg_engine.bench.fast import fast_mode_agreement
from magicseg_engine.bench.quality import StepwiseCapture
from magicseg_engine.config import load_preset
from magicseg_engine.engine.backends import torch_runners
from magicseg_engine.generate.attention import AttentionCapture
from magicseg_engine.generate.fast import FAST_LEVELS, FeatureCache, make_feature_cache
from magicseg_engine.generate.models import load_diffusion
from magicseg_engine.generate.sampler import PairedSampler, SamplingSettings

TINY = load_preset("tiny").diffusion
STEPS, SIZE, GUIDANCE = 4, 64, 7.5  # 8x8 latents
PROMPTS = ["a dog on a beach", "two people near traffic lights"]
NEGATIVES = ["nothing on a beach", "nothing near nothing"]
CLASSES = [("dog",), ("person", "traffic light")]
SEEDS = [1, 2]


@pytest.fixture(scope="module")
def models():
    return load_diffusion(TINY)


def make_sampler(models, runners=None, fast=0):
    settings = SamplingSettings(height=SIZE, width=SIZE, steps=STEPS, guidance=GUIDANCE, scheduler="ddim", fast=fast)
    return PairedSampler(models, settings, torch.device("cpu"), torch.float32, runners=runners)


def unet_inputs(rows, hw=(8, 8), context_dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, 4, *hw, generator=gen)
    return sample, torch.tensor(701), torch.randn(rows, 77, context_dim, generator=gen)


def count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


@torch.inference_mode()
def test_full_step_is_the_unet_and_the_cached_path_repeats_it_op_for_op(models):
    unet = models.unet
    for hw in [(8, 8), (7, 9)]:  # 7x9: forward passes interpolation sizes to the up blocks
        x, t, ctx = unet_inputs(4, hw)
        expected = unet(x, t, encoder_hidden_states=ctx).sample
        cache = FeatureCache(unet, interval=2)
        assert torch.equal(cache.predict(x, t, ctx, None, step_index=0), expected)
        # Fed the deep feature of this very step, the shallow path is the full UNet exactly.
        assert torch.equal(cache.predict(x, t, ctx, None, step_index=1), expected)
        assert (cache.full_steps, cache.cached_steps) == (1, 1)


@pytest.mark.parametrize("shallow_blocks", [1, 2])
@torch.inference_mode()
def test_sdxl_added_conditions_reach_the_cached_path(shallow_blocks):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SDXL_UNET).eval()
    x, t, ctx = unet_inputs(4, (6, 10), SDXL_UNET["cross_attention_dim"])
    added = {"text_embeds": torch.randn(4, TEXT_2["projection_dim"]),
             "time_ids": torch.tensor([[48.0, 80, 0, 0, 48, 80]]).expand(4, -1)}
    expected = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    cache = FeatureCache(unet, interval=2, shallow_blocks=shallow_blocks)
    assert torch.equal(cache.predict(x, t, ctx, added, step_index=0), expected)
    assert torch.equal(cache.predict(x, t, ctx, added, step_index=1), expected)
    # Other size conditions give another prediction on the cached path too: they are read there.
    other = {**added, "time_ids": torch.tensor([[96.0, 96, 0, 0, 96, 96]]).expand(4, -1)}
    assert not torch.equal(cache.predict(x, t, ctx, other, step_index=1), expected)


@torch.inference_mode()
def test_deep_blocks_run_only_on_full_steps_every_interval(models):
    unet = models.unet
    cache = FeatureCache(unet, interval=3)
    mid_calls, mid = count_calls(unet.mid_block)
    first_calls, first = count_calls(unet.down_blocks[0])
    try:
        outputs = []
        for i in range(7):
            x, t, ctx = unet_inputs(4, seed=i)
            full_before = len(mid_calls)
            outputs.append(cache.predict(x, t, ctx, None, step_index=i))
            ran_full = len(mid_calls) > full_before
            assert ran_full == (i % 3 == 0)
            if not ran_full:  # a stale deep feature: close to the UNet's answer, not equal to it
                assert not torch.equal(outputs[-1], unet(x, t, encoder_hidden_states=ctx).sample)
                mid_calls.pop()
    finally:
        mid.remove()
        first.remove()
    assert (cache.full_steps, cache.cached_steps) == (3, 4)
    assert len(first_calls) == 7 + 4  # the shallow block runs every step (and in the checks above)


@torch.inference_mode()
def test_a_batch_of_another_shape_is_refused_until_reset(models):
    cache = FeatureCache(models.unet, interval=2)
    x, t, ctx = unet_inputs(4)
    cache.predict(x, t, ctx, None, step_index=0)
    x2, _, ctx2 = unet_inputs(8)
    with pytest.raises(ValueError, match="reset"):
        cache.predict(x2, t, ctx2, None, step_index=1)
    cache.reset()
    assert (cache.full_steps, cache.cached_steps) == (0, 0)
    # After a reset nothing is cached: any step runs the full UNet.
    assert torch.equal(cache.predict(x2, t, ctx2, None, step_index=1),
                       models.unet(x2, t, encoder_hidden_states=ctx2).sample)


def test_levels_and_refusals(models):
    assert FAST_LEVELS[0] is None
    assert [FAST_LEVELS[k].interval for k in (1, 2)] == [2, 3]
    assert make_feature_cache(models.unet, 0) is None
    assert make_feature_cache(models.unet, 2).interval == 3
    with pytest.raises(ValueError, match="unknown fast level"):
        make_feature_cache(models.unet, 9)
    exported = dataclasses.replace(torch_runners(models), backend="onnxruntime")
    with pytest.raises(ValueError, match="backend onnxruntime"):
        make_feature_cache(models.unet, 1, exported)
    with pytest.raises(ValueError, match="shallow_blocks"):
        FeatureCache(models.unet, 2, shallow_blocks=2)  # the tiny UNet has two up blocks: one must stay deep
    with pytest.raises(ValueError, match="interval"):
        FeatureCache(models.unet, 0)
    with pytest.raises(TypeError):
        FeatureCache(torch.nn.Linear(2, 2), 2)


@torch.inference_mode()
def test_full_steps_go_through_the_runners_and_must_run_this_unet(models):
    runners = torch_runners(models)
    seen = []

    def predict(*args):
        seen.append(1)
        return runners.predict_noise(*args)

    cache = make_feature_cache(models.unet, 1, dataclasses.replace(runners, predict_noise=predict))
    x, t, ctx = unet_inputs(4)
    cache.predict(x, t, ctx, None, step_index=0)
    cache.predict(x, t, ctx, None, step_index=1)
    assert len(seen) == 1
    # A full step that does not run the module (as an exported UNet would not) cannot fill the cache.
    blind = FeatureCache(models.unet, 2, full_step=lambda x, t, ctx, added: torch.zeros_like(x))
    with pytest.raises(RuntimeError, match="torch backend"):
        blind.predict(x, t, ctx, None, step_index=0)


def cached_run(models, level, capture):
    sampler = make_sampler(models, fast=level)
    capture.set_prompts(PROMPTS, CLASSES)
    with capture.installed():
        latents = sampler.denoise(PROMPTS, NEGATIVES, SEEDS, hook=capture)
    return latents, sampler.feature_cache


def test_capture_through_the_sampler_with_cached_steps(models):
    """Every layer at every step (StepwiseCapture): on cached steps the deep layers (factor 2)
    record nothing, the latent-resolution ones (factor 1, the shallow blocks) record as always,
    and the maps and their self-attention refinement come out whole."""
    capture = StepwiseCapture(models.unet, models.tokenizer)
    latents, cache = cached_run(models, 1, capture)
    assert (cache.full_steps, cache.cached_steps) == (2, 2)
    deep = [calls[2] for calls in capture.layer_calls]
    shallow = [calls[1] for calls in capture.layer_calls]
    assert deep[1] == deep[3] == 0 and deep[0] == deep[2] > 0
    assert len(set(shallow)) == 1 and shallow[0] > 0
    for factors in ([1], [2], [1, 2]):
        maps = capture.refine(capture.compose((0.0, 1.0), factors), (0.0, 1.0), 2)
        assert maps.shape == (2, 2, 2, 8, 8) and torch.isfinite(maps).all() and maps.abs().sum() > 0

    full = make_sampler(models).denoise(PROMPTS, NEGATIVES, SEEDS)
    assert latents.shape == full.shape and not torch.equal(latents, full)


def test_fast_mode_is_deterministic_for_a_seed(models):
    runs = []
    for _ in range(2):
        capture = AttentionCapture(models.unet, models.tokenizer)
        latents, _ = cached_run(models, 1, capture)
        runs.append((latents, capture.maps()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1]) and runs[0][1].any()


def test_a_capture_range_of_cached_steps_only_records_nothing_and_says_so(models, caplog):
    # Step 1 of 4 is a cached step at level 1; the default layers (factor 2) do not run there.
    capture = AttentionCapture(models.unet, models.tokenizer, steps=(0.25, 0.5))
    with caplog.at_level(logging.WARNING):
        cached_run(models, 1, capture)
    maps = capture.maps()
    assert "recorded nothing" in caplog.text
    assert maps.shape == (2, 2, 2, 8, 8) and not maps.any()


def test_each_batch_starts_from_a_full_step(models):
    """The sampler resets the cache per batch: a batch never reuses another's deep features."""
    sampler = make_sampler(models, fast=1)
    first = sampler.denoise(PROMPTS, NEGATIVES, SEEDS)
    sampler.denoise(PROMPTS[:1], NEGATIVES[:1], [9])  # another batch shape in between
    again = sampler.denoise(PROMPTS, NEGATIVES, SEEDS)
    assert torch.equal(first, again)
    assert (sampler.feature_cache.full_steps, sampler.feature_cache.cached_steps) == (2, 2)


def test_fast_mode_refuses_other_backends_and_levels(models):
    runners = dataclasses.replace(torch_runners(models), backend="onnxruntime")
    with pytest.raises(ValueError, match="--backend torch"):
        make_sampler(models, runners, fast=1)
    with pytest.raises(ValueError, match="unknown fast level"):
        make_sampler(models, fast=7)


def test_agreement_benchmark_compares_the_same_pairs(models):
    result = fast_mode_agreement(make_sampler(models), PROMPTS, NEGATIVES, SEEDS, CLASSES, levels=(1,),
                                 capture_options={"factors": (1,)}, warmup=1, reps=1)
    assert result["full"]["pairs_per_s"] > 0
    (row,) = result["levels"]
    assert (row["level"], row["interval"], row["full_steps"], row["cached_steps"]) == (1, 2, 2, 2)
    assert row["pairs_per_s"] > 0 and row["speedup"] > 0
    assert 0.0 < row["map_cosine"] <= 1.0 + 1e-6
    assert 0.0 <= row["mask_iou"] <= 1.0 and row["masks_scored"] > 0
    assert 0.0 <= row["label_agreement"] <= 1.0
    assert row["image_psnr"] > 0
    with pytest.raises(ValueError, match="not fast levels"):
        fast_mode_agreement(make_sampler(models), PROMPTS, NEGATIVES, SEEDS, CLASSES, levels=(0,))


@pytest.mark.slow
def test_generate_fast_through_the_cli(tmp_path):
    """--fast 1 renders other images than full mode from the same seeds, records its level in
    run.json, refuses a resume at another level, and refuses levels and backends it lacks
    before anything is written."""
    from typer.testing import CliRunner

    from magicseg_engine.cli import app
    from magicseg_engine.data.shards import iter_samples

    def generate(out, *extra):
        return CliRunner().invoke(app, ["generate", "--preset", "tiny", "--classes", "voc", "--num-pairs", "2",
                                        "--out", str(out), *map(str, extra)])

    images = {}
    for level in (0, 1):
        result = generate(tmp_path / f"fast{level}", "--fast", level)
        assert result.exit_code == 0, result.output
        saved = json.loads((tmp_path / f"fast{level}" / "run.json").read_text())
        assert saved["config"]["diffusion"]["fast"] == level
        images[level] = [s["pos.jpg"] for s in iter_samples(tmp_path / f"fast{level}")]
    assert len(images[0]) == len(images[1]) == 2 and images[0] != images[1]

    result = generate(tmp_path / "fast1", "--fast", 2, "--resume")
    assert result.exit_code == 2 and "settings differ" in result.output
    for extra, message in ((("--fast", 5), "not a fast level"), (("--fast", 1, "--backend", "onnxruntime"), "--backend torch")):
        result = generate(tmp_path / "refused", *extra)
        assert result.exit_code == 2 and message in result.output
        assert not (tmp_path / "refused").exists()


def test_bench_fast_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from magicseg_engine.cli import app

    out = tmp_path / "fast.json"
    result = CliRunner().invoke(app, ["bench", "fast", "--preset", "tiny", "--levels", "1", "--pairs", "2", "--reps", "1",
                                      "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    (row,) = saved["levels"]
    assert row["level"] == 1 and (row["full_steps"], row["cached_steps"]) == (2, 2)
    assert row["speedup"] == pytest.approx(row["pairs_per_s"] / saved["full"]["pairs_per_s"])
    for levels in ("0", "3", "a"):
        result = CliRunner().invoke(app, ["bench", "fast", "--levels", levels, "--device", "cpu"])
        assert result.exit_code == 2 and "--levels" in result.output

"""SD 1.x, SD 2.x and SDXL: detected from their folders, sampled, captured and written alike.

The folders are small random models in the real layouts (tests/families.py); the full-size
architectures are checked by parameter count on the meta device.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from families import TEXT_1, TEXT_2, write_family
from PIL import Image
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.config import DiffusionConfig, load_preset
from magicseg_engine.data.shards import iter_samples
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.models import detect_family, load_diffusion, model_identity
from magicseg_engine.generate.sampler import PairedSampler, SamplingSettings

SETTINGS = SamplingSettings(height=64, width=64, steps=3, guidance=4.0, scheduler="euler")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("families")
    return {family: write_family(base / family, family, seed=i) for i, family in enumerate(("sd1", "sd2", "sdxl"))}


def _config(folder, **extra) -> DiffusionConfig:
    return DiffusionConfig(architecture="sd15", weights="pretrained", model=str(folder), dtype="float32", **extra)


def _sampler(folder, settings=SETTINGS) -> PairedSampler:
    return PairedSampler(load_diffusion(_config(folder)), settings, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.slow
def test_family_is_read_from_the_folder_not_its_name(folders, tmp_path, family):
    renamed = tmp_path / {"sd1": "sdxl-base", "sd2": "stable-diffusion-v1-5", "sdxl": "sd21"}[family]
    shutil.copytree(folders[family], renamed)
    models = load_diffusion(_config(renamed))
    assert detect_family(renamed).family == models.family == family
    assert (models.text_encoder_2 is not None) == (family == "sdxl") == models.added_conditions
    width = TEXT_1["hidden_size"] + TEXT_2["hidden_size"] if family == "sdxl" else 64
    assert models.cross_attention_dim == width
    assert model_identity(_config(renamed)) == models.model_id


def test_sdxl_random_has_the_published_architectures():
    config = load_preset("sdxl-random", {"diffusion": {"dtype": "float32"}}).diffusion
    assert (config.height, config.width) == (1024, 1024)
    models = load_diffusion(config, device="meta")
    counts = {name: sum(p.numel() for p in getattr(models, name).parameters())
              for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    # SDXL base 1.0 as published: UNet 2567.46M, its VAE, CLIP ViT-L and OpenCLIP bigG (with projection).
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    assert models.family == "sdxl" and models.zero_unconditional
    assert models.cross_attention_dim == 2048
    assert models.tokenizer.pad_id == 49407 and models.tokenizer_2.pad_id == 0
    assert models.unet.config.sample_size * models.vae_scale_factor == 1024
    assert models.vae.config.scaling_factor == pytest.approx(0.13025)
    ids = {model_identity(load_preset(p).diffusion, "meta") for p in ("sd15-random", "sd21-random", "sdxl-random")}
    assert len(ids) == 3


@pytest.mark.slow
def test_sdxl_context_is_both_encoders_penultimate_layers(folders):
    models = load_diffusion(_config(folders["sdxl"]))
    sampler = PairedSampler(models, SETTINGS, torch.device("cpu"), torch.float32)
    context, pooled = sampler.encode_text(["a dog on the grass"])
    ids = models.tokenize(["a dog on the grass"])
    assert ids.shape == (1, 2, 77)
    # The second tokenizer pads with "!" (id 0), the first with end-of-text.
    assert ids[0, 0, -1] == 49407 and ids[0, 1, -1] == 0
    with torch.no_grad():
        first = models.text_encoder(ids[:, 0], output_hidden_states=True)
        second = models.text_encoder_2(ids[:, 1], output_hidden_states=True)
    torch.testing.assert_close(context[..., :TEXT_1["hidden_size"]], first.hidden_states[-2])
    torch.testing.assert_close(context[..., TEXT_1["hidden_size"]:], second.hidden_states[-2])
    assert not torch.allclose(context[..., :TEXT_1["hidden_size"]], first.last_hidden_state)
    torch.testing.assert_close(pooled, second.text_embeds)


def test_sdxl_added_conditions_reach_the_unet(folders):
    sampler = _sampler(folders["sdxl"], SamplingSettings(height=64, width=48, steps=2, guidance=4.0, scheduler="ddim"))
    seen = []
    unet = sampler.models.unet
    hooks = [unet.add_time_proj.register_forward_hook(lambda m, args, out: seen.append(("time", args[0].clone()))),
             unet.add_embedding.register_forward_hook(lambda m, args, out: seen.append(("add", args[0].clone())))]
    try:
        sampler(["a red dog"], ["nothing"], [3])
    finally:
        for h in hooks:
            h.remove()
    times = [t for kind, t in seen if kind == "time"]
    assert len(times) == 2  # one per step
    # 4 rows (unconditional pos/neg, positive, negative), six size numbers each: (64, 48) both times.
    assert times[0].tolist() == [64, 48, 0, 0, 64, 48] * 4
    added = [a for kind, a in seen if kind == "add"][0]
    _, pooled = sampler.encode_text(["a red dog"])
    # The add embedding's input starts with the pooled text embedding: zeros for the unguided rows.
    dim = TEXT_2["projection_dim"]
    assert added[:2, :dim].abs().max() == 0
    torch.testing.assert_close(added[2:3, :dim], pooled)


@pytest.mark.slow
def test_sdxl_guides_against_zeros_unless_its_folder_says_otherwise(folders, tmp_path):
    zeros = _sampler(folders["sdxl"]).unconditional()
    assert all(t.abs().max() == 0 for t in zeros)
    plain = tmp_path / "plain"
    write_family(plain, "sdxl", seed=2, force_zeros_for_empty_prompt=False)
    context, pooled = _sampler(plain).unconditional()
    assert context.abs().max() > 0 and pooled.abs().max() > 0
    # Guiding against zeros and against the empty prompt are different models of the same weights.
    assert load_diffusion(_config(plain)).model_id != load_diffusion(_config(folders["sdxl"])).model_id


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_twins_share_noise_in_every_family(folders, family):
    sampler = _sampler(folders[family])
    batch = sampler(["a cat", "a cat"], ["a cat", "nothing"], [5, 5])
    # Same prompt and noise: identical twins; the pair rendered beside another is unchanged.
    assert np.array_equal(batch.positives[0], batch.negatives[0])
    assert np.array_equal(batch.positives[0], batch.positives[1])
    assert not np.array_equal(batch.negatives[0], batch.negatives[1])


def test_sdxl_vae_decodes_in_float32_when_asked_for_float16(folders):
    models = load_diffusion(_config(folders["sdxl"]), dtype=torch.float16)
    assert next(models.vae.parameters()).dtype is torch.float32
    assert next(models.unet.parameters()).dtype is torch.float16
    # A VAE that does not overflow stays in the dtype asked for.
    assert next(load_diffusion(_config(folders["sd1"]), dtype=torch.float16).vae.parameters()).dtype is torch.float16


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_generate_writes_masked_pairs_from_a_family_folder(folders, tmp_path, family):
    out = tmp_path / "run"
    result = invoke("generate", "--preset", "sd15", "--model", folders[family], "--size", 64, 64, "--steps", 3,
                    "--dtype", "float32", "--classes", "voc", "--num-pairs", 3, "--no-sam", "--device", "cpu",
                    "--out", out)
    assert result.exit_code == 0, result.output
    samples = list(iter_samples(out))
    assert len(samples) == 3
    for sample in samples:
        meta = json.loads(sample["json"])
        labels = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
        assert labels.shape == (64, 64)
        assert meta["mask_source"] == "attention" and set(np.unique(labels)) <= {0, 1, 2, 255}
        assert "counterfactual" in meta["masks"] and len(meta["masks"]["classes"]) == len(meta["classes"])
    # `masks` annotates the run again from its stored maps, whatever the family drew it.
    again = tmp_path / "again"
    result = invoke("masks", "--data", out, "--out", again, "--no-sam", "--device", "cpu")
    assert result.exit_code == 0, result.output
    redone = {s["__key__"]: s for s in iter_samples(again)}
    assert redone.keys() == {s["__key__"] for s in samples}
    for sample in samples:
        a, b = (np.asarray(Image.open(io.BytesIO(s["mask.png"]))) for s in (sample, redone[sample["__key__"]]))
        # The same maps, stored in float16: the same masks but for pixels at the threshold (random
        # weights give flat maps, so a few percent of them).
        assert a.any() and (a == b).mean() > 0.9, (a == b).mean()


def _sd3_like(root):
    write_family(root, "sd1")
    shutil.rmtree(root / "unet")
    (root / "transformer").mkdir()
    index = json.loads((root / "model_index.json").read_text())
    index.update({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]})
    (root / "model_index.json").write_text(json.dumps(index))


def _refiner(root):
    write_family(root, "sdxl", requires_aesthetics_score=True, _class_name="StableDiffusionXLImg2ImgPipeline")
    shutil.rmtree(root / "text_encoder")


def _inpainting(root):
    write_family(root, "sd1", _class_name="StableDiffusionInpaintPipeline")
    config = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))


@pytest.mark.parametrize(("make", "message"), [
    (_sd3_like, "holds StableDiffusion3Pipeline, a transformer-based model .*supported: UNet2DConditionModel"),
    (_refiner, "holds an SDXL refiner .*give an SDXL base model"),
    (_inpainting, "unet takes 9 input channels .*StableDiffusionInpaintPipeline.*supported"),
], ids=["sd3", "sdxl-refiner", "inpainting"])
@pytest.mark.slow
def test_unsupported_pipelines_are_refused_in_one_line_with_nothing_written(tmp_path, make, message):
    root = tmp_path / "model"
    make(root)
    with pytest.raises(UsageError, match=message):
        detect_family(root)
    out = tmp_path / "run"
    result = invoke("generate", "--preset", "sdxl", "--model", root, "--size", 64, 64, "--steps", 2,
                    "--classes", "voc", "--num-pairs", 2, "--no-sam", "--device", "cpu", "--out", out)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_size_the_unet_cannot_take_is_refused(folders, tmp_path):
    out = tmp_path / "run"
    # The tiny SDXL's VAE makes 8-pixel latents and its UNet halves them twice: 32 pixels at least.
    result = invoke("generate", "--preset", "sdxl", "--model", folders["sdxl"], "--size", 24, 64, "--steps", 2,
                    "--classes", "voc", "--num-pairs", 2, "--no-sam", "--device", "cpu", "--out", out)
    assert result.exit_code == 2, result.output
    assert "--height 24" in result.output and "at least 32" in result.output
    assert not out.exists()


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.slow
def test_benchmarks_run_on_every_family(folders, family):
    """bench generate and bench unet drive the family's UNet with its added conditions (SDXL)."""
    from magicseg_engine.bench.generate import bench_generate, pair_flops
    from magicseg_engine.bench.unet import bench_unet, unet_flops_per_row

    sampler = _sampler(folders[family], SamplingSettings(height=64, width=64, steps=2, guidance=4.0, scheduler="euler"))
    generated = bench_generate(sampler, ["a dog", "a cat"], ["a cat", "a dog"], [1, 2], batch_size=2, warmup=0, reps=1)
    assert generated["engine"]["pairs_per_s"] > 0 and generated["reference"]["pairs_per_s"] > 0
    unet = bench_unet(sampler, (1,), warmup=0, reps=1)
    assert [r["rows"] for r in unet["rows"]] == [2, 4]
    assert 4 * unet_flops_per_row(sampler) == pair_flops(sampler)["unet_call_4_rows"] == 4 * unet["flops_per_row"]

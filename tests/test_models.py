"""Diffusion models: tiny and SD 1.5 builds, loading diffusers folders, CLIP tokenisation, schedulers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from families import write_tokenizer

from magicseg_engine.config import DiffusionConfig
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.models import (
    SD15_SCHEDULER,
    TINY_VAE,
    DiffusionModels,
    load_diffusion,
    model_identity,
    make_scheduler,
    resolve_dtype,
)
from magicseg_engine.generate.tokenizer import ClipTokenizer, clip_token_id, clip_vocabulary

TINY = DiffusionConfig(architecture="tiny", weights="random", dtype="float32", height=64, width=64)
SOT, EOT = 49406, 49407

PROMPTS = [
    "a photo of a dog",
    "A Hair Drier next to two potted plants on a kitchen table.",
    "the cat's toy, 3 apples & 12 oranges!",
    "an  elephant   in the snow -- photorealistic, 4k, highly detailed",
    "a person riding a skateboard near a fire hydrant",
    "Tennis racket; baseball bat; wine glass (close-up)",
    "zebra " * 60,  # past the context length
    "",
]


def _pretrained(folder: Path) -> DiffusionConfig:
    return DiffusionConfig(architecture="sd15", weights="pretrained", model=str(folder), dtype="float32")


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tiny() -> DiffusionModels:
    return load_diffusion(TINY, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, DiffusionModels]:
    """A tiny model written in the diffusers folder layout, with SD 2.x-style padding."""
    from diffusers import PNDMScheduler

    root = tmp_path_factory.mktemp("sd") / "model"
    models = load_diffusion(TINY, seed=3)
    models.unet.save_pretrained(root / "unet")
    models.vae.save_pretrained(root / "vae")
    models.text_encoder.save_pretrained(root / "text_encoder")
    PNDMScheduler.from_config({**SD15_SCHEDULER, "beta_end": 0.02}).save_pretrained(root / "scheduler")
    write_tokenizer(root / "tokenizer", pad_token="!")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return root, models


# --- tiny --------------------------------------------------------------------------------


def test_tiny_weights_depend_on_the_seed_alone(tiny):
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    again = load_diffusion(TINY, seed=0)
    # Building does not consume the caller's random stream.
    assert torch.equal(torch.rand(3), expected_next)
    for name in ("unet", "vae", "text_encoder"):
        assert _states_equal(getattr(tiny, name), getattr(again, name)), name
    assert again.model_id == tiny.model_id

    other = load_diffusion(TINY, seed=1)
    for name in ("unet", "vae", "text_encoder"):
        assert not _states_equal(getattr(tiny, name), getattr(other, name)), name
    assert other.model_id != tiny.model_id


def test_tiny_shapes_and_properties(tiny):
    assert tiny.vae_scale_factor == 8
    assert tiny.latent_channels == 4 == tiny.unet.config.in_channels
    assert tiny.context_length == 77 == tiny.tokenizer.context_length
    assert tiny.cross_attention_dim == tiny.text_encoder.config.hidden_size
    assert tiny.text_encoder.config.vocab_size == 49408
    assert tiny.tokenizer.pad_id == EOT
    assert tiny.dtype == torch.float32 and tiny.device.type == "cpu"

    ids = tiny.tokenizer(["a hair drier", "two potted plants"])
    with torch.no_grad():
        context = tiny.text_encoder(ids)[0]
        assert context.shape == (2, 77, tiny.cross_attention_dim)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        eps = tiny.unet(latents, torch.tensor([999, 10]), encoder_hidden_states=context).sample
        assert eps.shape == latents.shape and torch.isfinite(eps).all()
        image = tiny.vae.decode(latents / tiny.vae.config.scaling_factor).sample
        assert image.shape == (2, 3, 64, 64)
        assert tiny.vae.encode(image).latent_dist.mean.shape == (2, 4, 8, 8)


def test_tiny_is_frozen_with_cross_attention_and_sdpa(tiny):
    from diffusers.models.attention_processor import AttnProcessor2_0

    for module in (tiny.unet, tiny.vae, tiny.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    kinds = {type(b).__name__ for b in (*tiny.unet.down_blocks, *tiny.unet.up_blocks)}
    assert {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D"} <= kinds
    cross = [name for name in tiny.unet.attn_processors if "attn2" in name]
    assert cross, "the UNet has no cross-attention layers"
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny.unet.attn_processors.values())


def _conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]


def test_channels_last_is_a_layout_not_a_model(tiny):
    """NHWC weights (the GPU default, off on the CPU unless asked) hold the same numbers and
    give the same noise prediction up to summation order."""
    nhwc = load_diffusion(TINY, seed=0, channels_last=True)
    for module in ("unet", "vae"):
        default, other = _conv_weights(getattr(tiny, module)), _conv_weights(getattr(nhwc, module))
        assert default and all(w.is_contiguous() for w in default)
        assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in other)
        assert all(torch.equal(a, b) for a, b in zip(default, other))
    assert nhwc.model_id == tiny.model_id
    latents = torch.randn(2, tiny.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, tiny.context_length, tiny.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a = tiny.unet(latents, 500, encoder_hidden_states=context).sample
        b = nhwc.unet(latents, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_properties_follow_the_loaded_models(tiny):
    from diffusers import AutoencoderKL

    three_blocks = {**TINY_VAE, "down_block_types": ["DownEncoderBlock2D"] * 3,
                    "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [16, 32, 32],
                    "latent_channels": 8}
    other = dataclasses.replace(tiny, vae=AutoencoderKL.from_config(three_blocks))
    assert other.vae_scale_factor == 4
    assert other.latent_channels == 8


def test_resolve_dtype(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="magicseg_engine.generate.models"):
        assert resolve_dtype("float16", "cpu") == torch.float32
    assert "float32" in caplog.text
    import magicseg_engine.generate.models as models

    # bfloat16 on the CPU only where it has the instructions for it.
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda cpuinfo=None: False)
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda cpuinfo=None: True)
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float32
    assert resolve_dtype("float32", "cuda") == torch.float32
    assert resolve_dtype("float16", "cuda:0") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("bfloat16", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("bfloat16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64", "cpu")


def test_half_precision_request_runs_in_float32_on_the_cpu():
    models = load_diffusion(TINY.model_copy(update={"dtype": "float16"}))
    assert {p.dtype for m in (models.unet, models.vae, models.text_encoder) for p in m.parameters()} == {torch.float32}


# --- SD 1.5 architectures ------------------------------------------------------------------


def test_sd15_random_has_the_published_parameter_counts():
    config = DiffusionConfig(architecture="sd15", weights="random", dtype="float32")
    models = load_diffusion(config, device="meta")
    counts = {name: sum(p.numel() for p in getattr(models, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    # SD v1.5 as published: UNet 859.52M, VAE 83.65M, CLIP ViT-L/14 text tower 123.06M.
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert all(p.is_meta for m in (models.unet, models.vae, models.text_encoder) for p in m.parameters())
    assert models.vae_scale_factor == 8
    assert models.latent_channels == 4
    assert models.context_length == 77
    assert models.cross_attention_dim == 768 == models.text_encoder.config.hidden_size
    assert models.text_encoder.config.hidden_act == "quick_gelu"
    assert models.vae.config.scaling_factor == pytest.approx(0.18215)
    assert models.tokenizer.pad_id == EOT
    assert models.model_id.startswith("sd15-random:seed=0:")


def test_sd21_random_has_the_published_parameter_counts_and_samples_by_v_prediction():
    from magicseg_engine.config import load_preset

    config = load_preset("sd21-random", {"diffusion": {"dtype": "float32"}}).diffusion
    assert (config.height, config.width) == (768, 768)
    models = load_diffusion(config, device="meta")
    counts = {name: sum(p.numel() for p in getattr(models, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    # SD 2.1 as published: UNet 865.91M, the SD VAE, OpenCLIP ViT-H/14's text tower less its last layer.
    assert counts == {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}
    assert models.cross_attention_dim == 1024 == models.text_encoder.config.hidden_size
    assert models.text_encoder.config.hidden_act == "gelu"
    assert models.unet.config.sample_size * models.vae_scale_factor == 768
    assert models.scheduler_config["prediction_type"] == "v_prediction"
    assert make_scheduler("ddim", models.scheduler_config).config.prediction_type == "v_prediction"
    assert models.tokenizer.pad_id == 0  # "!", as SD 2.x's tokenizer pads
    assert models.model_id.startswith("sd21-random:seed=0:")
    assert model_identity(config, "meta") == models.model_id != model_identity(load_preset("sd15-random").diffusion, "meta")


# --- pretrained folders --------------------------------------------------------------------


@pytest.mark.slow
def test_an_sd2_style_folder_samples_by_its_own_v_prediction(saved, tmp_path):
    from magicseg_engine.generate.sampler import PairedSampler, SamplingSettings

    root, _ = saved
    sd2 = tmp_path / "sd2"
    shutil.copytree(root, sd2)
    config_path = sd2 / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    eps, v = load_diffusion(_pretrained(root)), load_diffusion(_pretrained(sd2))
    assert v.scheduler_config["prediction_type"] == "v_prediction" and v.tokenizer.pad_id == 0
    assert v.model_id != eps.model_id  # the schedule is part of the weights' identity
    # The same weights and noise give other images when the output is read as v instead of epsilon.
    settings = SamplingSettings(height=64, width=64, steps=3, guidance=2.0, scheduler="ddim")
    images = [PairedSampler(m, settings, torch.device("cpu"), torch.float32)(["a dog"], ["nothing"], [0]).positives
              for m in (eps, v)]
    assert images[0].shape == images[1].shape and not np.array_equal(*images)


def test_loads_a_diffusers_folder(saved):
    root, original = saved
    loaded = load_diffusion(_pretrained(root))
    for name in ("unet", "vae", "text_encoder"):
        assert _states_equal(getattr(original, name), getattr(loaded, name)), name
        assert not getattr(loaded, name).training
    # The pad token and noise schedule come from the folder, not from SD 1.5's defaults.
    assert loaded.tokenizer.pad_id == 0
    assert loaded.scheduler_config["beta_end"] == pytest.approx(0.02)
    assert loaded.model_id.startswith(str(root.resolve()) + "@")

    ids = loaded.tokenizer(["a photo of a dog"])
    assert ids[0, 6] == EOT and ids[0, 7:].eq(0).all()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    # Loaded tensors sit at other memory alignments, which can change the CPU kernels' summation
    # order: equal weights, outputs equal to float32 rounding.
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ctx_a, ctx_b = original.text_encoder(ids)[0], loaded.text_encoder(ids)[0]
        torch.testing.assert_close(ctx_a, ctx_b, **close)
        torch.testing.assert_close(original.unet(latents, 500, encoder_hidden_states=ctx_a).sample,
                                   loaded.unet(latents, 500, encoder_hidden_states=ctx_a).sample, **close)
        torch.testing.assert_close(original.vae.decode(latents).sample, loaded.vae.decode(latents).sample, **close)


def test_model_id_changes_when_weights_change(saved, tmp_path):
    root, _ = saved
    copy = tmp_path / "model"
    shutil.copytree(root, copy)
    first = load_diffusion(_pretrained(copy)).model_id
    assert load_diffusion(_pretrained(copy)).model_id == first
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load_diffusion(_pretrained(copy)).model_id != first


def test_folder_without_scheduler_or_tokenizer_gets_sd1_defaults(saved, tmp_path, caplog):
    root, original = saved
    copy = tmp_path / "model"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("scheduler", "tokenizer"))
    with caplog.at_level(logging.WARNING, logger="magicseg_engine.generate.models"):
        loaded = load_diffusion(_pretrained(copy))
    assert "scheduler_config.json" in caplog.text
    assert loaded.tokenizer.pad_id == EOT
    assert loaded.scheduler_config == SD15_SCHEDULER
    assert _states_equal(original.unet, loaded.unet)


def test_half_precision_variant_files_load(saved, tmp_path):
    root, original = saved
    copy = tmp_path / "model"
    shutil.copytree(root, copy)
    unet_dir = copy / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").rename(unet_dir / "diffusion_pytorch_model.fp16.safetensors")
    loaded = load_diffusion(_pretrained(copy))
    assert _states_equal(original.unet, loaded.unet)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"not a safetensors file" * 10)


def _drop_a_weight(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    state.pop("conv_in.weight")
    save_file(state, path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: shutil.rmtree(root), "does not exist"),
        (lambda root: shutil.rmtree(root / "unet"), "has no unet/ subfolder"),
        (lambda root: (root / "vae" / "config.json").unlink(), "vae has no config.json"),
        (lambda root: (root / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "unet has no weights"),
        (lambda root: _corrupt(root / "unet" / "diffusion_pytorch_model.safetensors"), "could not load .*unet"),
        (lambda root: _corrupt(root / "text_encoder" / "model.safetensors"), "could not load .*text_encoder"),
        (lambda root: _drop_a_weight(root / "unet" / "diffusion_pytorch_model.safetensors"),
         "unet does not match its config.json: 1 weights missing"),
        (lambda root: (root / "text_encoder_2").mkdir(), "text_encoder_2 has no config.json"),
        (lambda root: (root / "tokenizer" / "vocab.json").write_text('{"a": 0}'), "not CLIP's BPE vocabulary"),
    ],
    ids=["missing-folder", "no-unet", "no-vae-config", "no-weights", "corrupt-unet", "corrupt-text-encoder",
         "missing-weight", "empty-second-encoder", "foreign-vocab"],
)
def test_broken_folders_are_usage_errors(saved, tmp_path, damage, message):
    root, _ = saved
    copy = tmp_path / "model"
    shutil.copytree(root, copy)
    damage(copy)
    with pytest.raises(UsageError, match=message) as err:
        load_diffusion(_pretrained(copy))
    assert "\n" not in str(err.value)


def test_a_file_is_not_a_model_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(UsageError, match="is a file"):
        load_diffusion(_pretrained(path))


def test_hub_id_offline_says_to_pass_a_local_folder(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="could not be fetched .*pass its path with --model") as err:
        load_diffusion(_pretrained(Path("magicseg-nowhere/no-such-model")))
    assert "\n" not in str(err.value)


# --- tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    """transformers' CLIPTokenizer, as diffusers loads it from an SD folder, for both paddings."""
    from transformers import CLIPTokenizer

    out = {}
    for pad_token, pad_id in (("<|endoftext|>", EOT), ("!", 0)):
        folder = tmp_path_factory.mktemp("tokenizer")
        write_tokenizer(folder, pad_token)
        out[pad_id] = CLIPTokenizer.from_pretrained(str(folder))
    return out


@pytest.mark.parametrize("pad_id", [EOT, 0])
def test_matches_transformers_clip_tokenizer(hf_tokenizers, pad_id):
    reference = hf_tokenizers[pad_id]
    assert reference.pad_token_id == pad_id
    prompts = PROMPTS
    if pad_id == 0:
        # Where "!" is the pad token (SD 2.x), transformers also turns every "!" in a prompt into
        # the pad id; the text encoders were trained on open_clip's tokenisation, which does not.
        prompts = [p for p in PROMPTS if "!" not in p]
        assert reference(["wow!"]).input_ids[0][2] == 0 != ClipTokenizer(77, 0)(["wow!"])[0, 2]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ours = ClipTokenizer(77, pad_id)(prompts)
    assert ours.dtype == torch.long and ours.shape == (len(prompts), 77)
    assert torch.equal(ours, expected)


def test_layout_start_end_padding_and_truncation():
    tok = ClipTokenizer(77, EOT)
    ids = tok(["a photo of a dog", "zebra " * 100])
    assert ids[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 1929, EOT]
    assert ids[0, 7:].eq(EOT).all()
    assert len(tok.encode("zebra " * 100)) == 100
    assert ids[1, 0] == SOT and ids[1, -1] == EOT and ids[1, 1:-1].ne(EOT).all()

    padded_with_zero = ClipTokenizer(16, 0)(["a photo of a dog"])
    assert padded_with_zero.shape == (1, 16)
    assert padded_with_zero[0, 6] == EOT and padded_with_zero[0, 7:].eq(0).all()
    assert clip_token_id("<|endoftext|>") == EOT == clip_token_id("<end_of_text>")
    assert clip_token_id("!") == 0
    with pytest.raises(ValueError):
        ClipTokenizer(77, 49408)


def test_token_spans_find_whole_multi_token_phrases():
    tok = ClipTokenizer(77, EOT)
    text = "A Hair Drier beside potted plants, and another hair drier near a fire hydrant"
    ids = tok([text])[0]
    drier = tok.token_spans(text, "hair drier")
    assert len(drier) == 2 and all(len(span) == 2 for span in drier)
    assert drier[0][0] == 2  # position 0 is the start token, "a" is 1
    hydrant = tok.token_spans(text, "Fire Hydrant")
    assert len(hydrant) == 1 and len(hydrant[0]) == len(tok.encode("fire hydrant"))
    for phrase in ("hair drier", "potted plants", "fire hydrant"):
        spans = tok.token_spans(text, phrase)
        assert spans, phrase
        for span in spans:
            assert span == list(range(span[0], span[-1] + 1))
            assert ids[span].tolist() == tok.encode(phrase)

    # A word that BPE splits into several tokens is one span covering all of them.
    word = "zucchinis"
    assert len(tok.encode(word)) > 1
    assert tok.token_spans(f"a bowl of {word}", word) == [list(range(4, 4 + len(tok.encode(word))))]

    assert tok.token_spans(text, "dog") == []
    assert tok.token_spans(text, "plant") == []  # only whole words
    assert tok.token_spans(text, "drier beside") == [[3, 4]]
    assert tok.token_spans(text, "") == []


def test_token_spans_leave_out_truncated_occurrences():
    tok = ClipTokenizer(8, EOT)
    assert tok.token_spans("a cat and a dog", "cat") == [[2]]
    # Positions 1..6 hold text and 7 the end token; here "hair drier" would need 6 and 7.
    assert tok.token_spans("one two three four five hair drier", "hair drier") == []
    assert tok.token_spans("one two three four hair drier", "hair drier") == [[5, 6]]


# --- schedulers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("ddim", "DDIMScheduler"), ("dpm-solver++", "DPMSolverMultistepScheduler"), ("euler", "EulerDiscreteScheduler"),
     ("unipc", "UniPCMultistepScheduler")],
)
def test_schedulers_build_and_are_deterministic(name, cls):
    scheduler = make_scheduler(name, SD15_SCHEDULER)
    assert type(scheduler).__name__ == cls
    if name == "dpm-solver++":
        assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.solver_order == 2
    if name == "unipc":
        assert scheduler.config.solver_order == 2 and scheduler.config.predict_x0
    scheduler.set_timesteps(20)
    assert len(scheduler.timesteps) == 20
    assert scheduler.config.beta_end == pytest.approx(0.012)

    def run(rng_seed: int) -> torch.Tensor:
        torch.manual_seed(rng_seed)
        s = make_scheduler(name, SD15_SCHEDULER)
        s.set_timesteps(5)
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(1, 4, 8, 8, generator=g) * s.init_noise_sigma
        for t in s.timesteps:
            model_in = s.scale_model_input(sample, t)
            sample = s.step(0.1 * model_in, t, sample).prev_sample
        return sample

    # The global RNG differs between the runs: a scheduler that adds fresh noise would differ too.
    assert torch.equal(run(1), run(2))


def test_scheduler_reads_the_noise_schedule():
    a = make_scheduler("ddim", SD15_SCHEDULER)
    b = make_scheduler("ddim", {**SD15_SCHEDULER, "beta_end": 0.02})
    assert not torch.allclose(a.alphas_cumprod, b.alphas_cumprod)


def test_unknown_scheduler():
    with pytest.raises(ValueError, match="unknown scheduler 'pndm'"):
        make_scheduler("pndm", SD15_SCHEDULER)

"""The paired sampler against diffusers' own StableDiffusionPipeline, and the sampling flags
through the command line.

`bench.generate.reference_image` shares the sampler's helpers (noise, scheduler, decoding), so
agreeing with it only shows that batching pairs changes nothing. Here the outside reference is
diffusers' StableDiffusionPipeline built from the tiny preset's own modules (safety checker
off), with its scheduler loaded and swapped the way diffusers documents (`Class.from_config`
of the model folder's scheduler), given the engine's text embeddings and initial latents. It
runs every scheduler `--scheduler` offers, guided and unguided, and must give the engine's
final latents and 8-bit images.

The command-line half checks that `--scheduler`, `--guidance`, `--dtype` and
`--independent-noise` each reach the sampler: recorded in run.json and the samples' JSON, and
the written JPEGs are exactly those of the sampler asked directly for that setting.
"""

from __future__ import annotations

import json
import typing

import numpy as np
import pytest
import torch
from families import write_tokenizer
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.config import DiffusionConfig, load_preset
from magicseg_engine.data.encoding import encode_jpeg
from magicseg_engine.data.shards import iter_samples
from magicseg_engine.generate.attention import AttentionCapture
from magicseg_engine.generate.models import SCHEDULERS, cpu_supports_bf16, make_scheduler
from magicseg_engine.generate.sampler import PairedSampler, SamplingSettings, initial_noise
from magicseg_engine.pipeline import PROMPTS_FILE, RUN_FILE, ExecutionOptions, build_sampler
from magicseg_engine.prompts.records import read_records

TINY = load_preset("tiny")
STEPS = TINY.diffusion.steps  # the preset's own 4 steps: every solver's multistep history is used

# Two pairs, so the engine's batch holds several prompts; a class word, punctuation and a
# negative that drops words, as the counterfactual rewrite makes them.
PROMPTS = ("a photo of a dog on the grass, at dusk", "a cat sitting beside a red bus")
NEGATIVES = ("a photo of nothing on the grass, at dusk", "a red bus")
SEEDS = (3, 11)

# 7.5: guided (the preset's default). 1.0 and 0.5: both pipelines treat guidance <= 1 as off,
# the conditional prediction alone, and never evaluate the unconditional rows.
GUIDANCES = (7.5, 1.0, 0.5)

# Final latents: both sides run the same float32 operations on the same batch layout (the
# engine's rows are [unconditional x 2B, positives, negatives], diffusers' [negative embeds,
# prompt embeds] with the same contents), so they agree bit for bit here. The tolerance, 1e-5
# relative (plus 1e-5 absolute near zero), is a few float32 ulps: room for a differently ordered
# reduction, should a kernel change, and no more. The random weights drive the latents to tens
# (up to about 60); a guidance of 7.49 instead of 7.5 already moves them by about 7e-3, one
# scheduler's timesteps spaced otherwise by over 1e-2, and test_tolerance_tells_settings_apart
# checks the gaps between the compared settings. Images: one 8-bit level, the most a latent
# difference that small can move a rounding, and on at most 1% of the values, since only values
# within a hair of a rounding boundary can flip (a floor for a round would move half of them).
LATENT_TOL = 1e-5
IMAGE_TOL = 1
IMAGE_FLIPS = 0.01


# The tiny models' matrices are a few KB: one torch thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sampler(tiny_sampler):
    # The shared tiny sampler (conftest.py), of the tiny preset as TINY. Diffusers' pipeline below
    # holds its modules without changing them, and the capture's processors are on only inside
    # `installed()`; test_attention_capture_leaves_the_images_as_diffusers_draws_them checks
    # that the UNet's own processors are in place.
    return tiny_sampler


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, sampler):
    """The tokenizer and scheduler parts of a diffusers folder of the tiny model: a tokenizer/
    as Stable Diffusion 1.5 ships it and a scheduler/ holding the preset's noise schedule under
    SD 1.5's scheduler class (PNDM)."""
    root = tmp_path_factory.mktemp("tiny-folder")
    write_tokenizer(root / "tokenizer", "<|endoftext|>", sampler.models.context_length)
    (root / "scheduler").mkdir()
    config = {"_class_name": "PNDMScheduler", **sampler.models.scheduler_config}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


def diffusers_scheduler(name: str, folder):
    """The scheduler a diffusers user gets for `name`: the folder's scheduler loaded, then
    swapped with `Class.from_config(pipe.scheduler.config)` as diffusers' documentation does."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    classes = {"ddim": DDIMScheduler, "dpm-solver++": DPMSolverMultistepScheduler,
               "euler": EulerDiscreteScheduler, "unipc": UniPCMultistepScheduler}
    loaded = PNDMScheduler.from_pretrained(folder / "scheduler")
    return classes[name].from_config(loaded.config)


@pytest.fixture(scope="module")
def pipeline(sampler, model_folder):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    m = sampler.models
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=CLIPTokenizer.from_pretrained(model_folder / "tokenizer"),
        unet=m.unet, scheduler=diffusers_scheduler("ddim", model_folder),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Timesteps:
    """A step hook that records the timesteps the engine ran."""

    def __init__(self):
        self.seen: list[float] = []

    def start(self, layout, num_steps):
        self.seen = []

    def before_step(self, index, timestep):
        self.seen.append(float(timestep))

    def finish(self):
        pass


class Renders:
    """Each (scheduler, guidance) rendered once by the engine and once by diffusers, kept for
    every test of the module."""

    def __init__(self, sampler: PairedSampler, pipe, folder):
        self.sampler, self.pipe, self.folder = sampler, pipe, folder
        self._engine: dict = {}
        self._diffusers: dict = {}

    def settings(self, scheduler: str, guidance: float) -> SamplingSettings:
        d = TINY.diffusion
        return SamplingSettings(height=d.height, width=d.width, steps=STEPS, guidance=guidance, scheduler=scheduler)

    def engine(self, scheduler: str, guidance: float, hook=None):
        """(timesteps, final latents [2B, C, h, w], uint8 images [2B, H, W, 3]) of the engine.
        With a `hook` of the caller's the render is not kept and its timesteps are None."""
        key = (scheduler, guidance)
        if hook is None and key in self._engine:
            return self._engine[key]
        s = self.sampler
        engine = PairedSampler(s.models, self.settings(scheduler, guidance), s.device, s.dtype, runners=s.runners)
        recorder = _Timesteps() if hook is None else None
        latents = engine.denoise(PROMPTS, NEGATIVES, SEEDS, hook=hook or recorder)
        out = (recorder and recorder.seen, latents, engine.decode(latents))
        if hook is None:
            self._engine[key] = out
        return out

    def diffusers(self, scheduler: str, guidance: float):
        """The same of diffusers' pipeline, fed the engine's embeddings and initial latents."""
        key = (scheduler, guidance)
        if key in self._diffusers:
            return self._diffusers[key]
        s, pipe = self.sampler, self.pipe
        cond, _ = s.encode_text(list(PROMPTS) + list(NEGATIVES))
        uncond, _ = s.unconditional()
        pos, neg = initial_noise(SEEDS, s.latent_shape, independent=False)
        pipe.scheduler = diffusers_scheduler(scheduler, self.folder)
        seen, final = [], {}

        def on_step_end(pipe, index, timestep, tensors):
            seen.append(float(timestep))
            final["latents"] = tensors["latents"]
            return tensors

        with torch.inference_mode():
            images = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(len(cond), -1, -1),
                          latents=torch.cat([pos, neg]), num_inference_steps=STEPS, guidance_scale=guidance,
                          height=TINY.diffusion.height, width=TINY.diffusion.width, output_type="pil",
                          callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"]).images
        out = (seen, final["latents"], np.stack([np.asarray(im) for im in images]))
        self._diffusers[key] = out
        return out


@pytest.fixture(scope="module")
def renders(sampler, pipeline, model_folder):
    return Renders(sampler, pipeline, model_folder)


def assert_images_match(images: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert images.shape == ref.shape and images.dtype == ref.dtype == np.uint8
    diff = np.abs(images.astype(int) - ref.astype(int))
    assert diff.max() <= IMAGE_TOL, f"{what}: images differ by up to {diff.max()} levels"
    assert (diff > 0).mean() <= IMAGE_FLIPS, f"{what}: {(diff > 0).mean():.1%} of the values differ"


def test_every_cli_scheduler_has_a_diffusers_reference():
    # The CLI's --scheduler values are the config's; each must be compared below.
    offered = typing.get_args(DiffusionConfig.model_fields["scheduler"].annotation)
    assert set(offered) == set(SCHEDULERS) == {"ddim", "dpm-solver++", "euler", "unipc"}


def test_diffusers_encodes_the_prompts_as_the_engine(sampler, pipeline):
    # What the image comparison feeds diffusers is the engine's text conditioning; here diffusers
    # encodes the strings itself with Stable Diffusion's tokenizer (the empty prompt as its
    # unconditional), including a prompt longer than the 77-token context it truncates.
    long_prompt = "a dog, " * 60 + "at the end"
    texts = [*PROMPTS, *NEGATIVES, long_prompt]
    with torch.inference_mode():
        cond, uncond = pipeline.encode_prompt(texts, sampler.device, 1, True, [""] * len(texts))
    engine_cond, _ = sampler.encode_text(texts)
    engine_uncond, _ = sampler.unconditional()
    torch.testing.assert_close(engine_cond, cond, rtol=LATENT_TOL, atol=LATENT_TOL)
    torch.testing.assert_close(engine_uncond.expand_as(uncond), uncond, rtol=LATENT_TOL, atol=LATENT_TOL)


@pytest.mark.parametrize("guidance", GUIDANCES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_engine_matches_diffusers_pipeline(renders, scheduler, guidance):
    timesteps, latents, images = renders.engine(scheduler, guidance)
    ref_timesteps, ref_latents, ref_images = renders.diffusers(scheduler, guidance)
    assert timesteps == ref_timesteps and len(timesteps) == STEPS
    assert latents.shape == ref_latents.shape == (2 * len(PROMPTS), *renders.sampler.latent_shape)
    torch.testing.assert_close(latents, ref_latents, rtol=LATENT_TOL, atol=LATENT_TOL)
    assert_images_match(images, ref_images, f"{scheduler} at guidance {guidance}")


def test_tolerance_tells_settings_apart(renders):
    # The comparison above is only worth something if a wrong setting fails it: against every
    # other scheduler, and guidance on vs off, each engine render is at least 100 times farther
    # from diffusers' than the tolerance allows. Guidance 1 and 0.5 are the same setting (off).
    settings = [(scheduler, guidance) for scheduler in SCHEDULERS for guidance in (7.5, 1.0)]
    for ours in settings:
        _, latents, _ = renders.engine(*ours)
        for theirs in settings:
            if theirs != ours:
                ref = renders.diffusers(*theirs)[1]
                excess = ((latents - ref).abs() / (LATENT_TOL + LATENT_TOL * ref.abs())).max().item()
                assert excess > 100, (ours, theirs, excess)
    for scheduler in SCHEDULERS:
        torch.testing.assert_close(renders.diffusers(scheduler, 0.5)[1], renders.diffusers(scheduler, 1.0)[1],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("self_attention_power", [0, 1])
def test_attention_capture_leaves_the_images_as_diffusers_draws_them(renders, sampler, self_attention_power):
    # Generation with masks samples through the capture's processors (one recomputes diffusers'
    # attention op for op to keep its queries and keys, the self-attention probe runs the
    # original and reads on the side): the images must still be diffusers'.
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(type(p) is AttnProcessor2_0 for p in sampler.models.unet.attn_processors.values())
    m = TINY.masks
    capture = AttentionCapture(sampler.models.unet, sampler.models.tokenizer, steps=m.capture_steps,
                               factors=m.attention_factors, self_attention_power=self_attention_power)
    capture.set_prompts(list(PROMPTS), [("dog",), ("cat",)])
    with capture.installed():
        _, latents, images = renders.engine("ddim", 7.5, hook=capture)
    maps = capture.maps()
    assert maps.shape[:2] == (len(PROMPTS), 2) and maps.abs().sum() > 0  # it did read the layers
    _, ref_latents, ref_images = renders.diffusers("ddim", 7.5)
    torch.testing.assert_close(latents, ref_latents, rtol=LATENT_TOL, atol=LATENT_TOL)
    assert_images_match(images, ref_images, "with attention capture")


# --- the flags through the command line ------------------------------------------------------

class CliRuns:
    """One-pair tiny runs of `generate`, each made once per module and read back."""

    def __init__(self, base):
        self.base = base
        self._runs: dict = {}

    def __call__(self, *flags: str) -> dict:
        if flags not in self._runs:
            out = self.base / (("-".join(f.strip("-") for f in flags)) or "default")
            result = CliRunner().invoke(app, ["generate", "--classes", "voc", "--num-pairs", "1", "--out", str(out),
                                              "--device", "cpu", *flags])
            assert result.exit_code == 0, result.output
            (sample,) = list(iter_samples(out))
            self._runs[flags] = {
                "diffusion": json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["config"]["diffusion"],
                "meta": json.loads(sample["json"]),
                "pos": sample["pos.jpg"], "neg": sample["neg.jpg"],
                "records": read_records(out / PROMPTS_FILE),
            }
        return self._runs[flags]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    return CliRuns(tmp_path_factory.mktemp("cli"))


def direct_jpegs(sampler: PairedSampler, records, **changes) -> tuple[bytes, bytes]:
    """The run's pair rendered by `sampler` with its settings changed as given, encoded as
    generate writes it: what the CLI must have written if the flag reached the sampler."""
    settings = SamplingSettings(**{**sampler.settings.__dict__, **changes})
    engine = PairedSampler(sampler.models, settings, sampler.device, sampler.dtype, runners=sampler.runners)
    (record,) = records
    batch = engine([record.prompt], [record.negative_prompt], [record.seed])
    quality = ExecutionOptions().jpeg_quality
    return encode_jpeg(batch.positives[0], quality), encode_jpeg(batch.negatives[0], quality)


def test_cli_default_run_is_the_samplers_render(cli, sampler):
    run = cli()
    d = TINY.diffusion
    assert {k: run["diffusion"][k] for k in ("scheduler", "guidance", "dtype", "independent_noise")} == \
        {"scheduler": d.scheduler, "guidance": d.guidance, "dtype": d.dtype, "independent_noise": False}
    assert run["meta"]["shared_noise"] is True
    # The run samples with attention capture installed (masks on); the images are still exactly
    # those of the bare sampler.
    assert (run["pos"], run["neg"]) == direct_jpegs(sampler, run["records"])


def test_cli_scheduler(cli, sampler):
    default, run = cli(), cli("--scheduler", "euler")
    assert run["diffusion"]["scheduler"] == run["meta"]["scheduler"] == "euler" != default["meta"]["scheduler"]
    assert run["records"] == default["records"]
    assert run["pos"] != default["pos"] and run["neg"] != default["neg"]
    assert (run["pos"], run["neg"]) == direct_jpegs(sampler, run["records"], scheduler="euler")


def test_cli_guidance(cli, sampler):
    default, run = cli(), cli("--guidance", "1")
    assert run["diffusion"]["guidance"] == run["meta"]["guidance"] == 1.0 != default["meta"]["guidance"]
    assert run["pos"] != default["pos"] and run["neg"] != default["neg"]
    assert (run["pos"], run["neg"]) == direct_jpegs(sampler, run["records"], guidance=1.0)


def test_cli_independent_noise(cli, sampler):
    default, run = cli(), cli("--independent-noise")
    assert run["diffusion"]["independent_noise"] is True and run["meta"]["shared_noise"] is False
    # The positive keeps its seed's first draw; only the negative starts from other noise.
    assert run["pos"] == default["pos"]
    assert run["neg"] != default["neg"]
    assert (run["pos"], run["neg"]) == direct_jpegs(sampler, run["records"], independent_noise=True)


@pytest.mark.slow
def test_cli_dtype(cli):
    default, run = cli(), cli("--dtype", "bfloat16")
    assert run["diffusion"]["dtype"] == "bfloat16" and default["meta"]["dtype"] == "float32"
    bf16 = build_sampler(load_preset("tiny", {"diffusion": {"dtype": "bfloat16"}}), "cpu")
    if cpu_supports_bf16():
        # Sampled in bfloat16: its rounding shows in the images.
        assert bf16.dtype is torch.bfloat16 and bf16.models.dtype is torch.bfloat16
        assert run["meta"]["dtype"] == "bfloat16" and "dtype_requested" not in run["meta"]
        assert run["pos"] != default["pos"]
    else:
        # Emulated bfloat16 is slower than float32 on such CPUs, so the run falls back to float32,
        # and each sample records what it ran in beside what was asked.
        assert bf16.dtype is torch.float32
        assert run["meta"]["dtype"] == "float32" and run["meta"]["dtype_requested"] == "bfloat16"
        assert run["pos"] == default["pos"]
    assert (run["pos"], run["neg"]) == direct_jpegs(bf16, run["records"])
    # float16 convolutions are emulated on every CPU: float32 runs, and the samples say so.
    half = cli("--dtype", "float16")
    assert half["meta"]["dtype"] == "float32" and half["meta"]["dtype_requested"] == "float16"
    assert (half["pos"], half["neg"]) == (default["pos"], default["neg"])


def test_make_scheduler_is_the_diffusers_swap(model_folder, sampler):
    # The engine builds its schedulers from the model's noise schedule with diffusers'
    # defaults (DPM-Solver++ 2M, UniPC bh2 order 2 stated explicitly); a user swapping
    # schedulers on the folder's pipeline gets the same configuration.
    for name in SCHEDULERS:
        ours = make_scheduler(name, sampler.models.scheduler_config)
        theirs = diffusers_scheduler(name, model_folder)
        assert type(ours) is type(theirs)
        public = {k: v for k, v in theirs.config.items() if not k.startswith("_")}
        assert {k: ours.config[k] for k in public} == public, name

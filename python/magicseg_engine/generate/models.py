"""The text-to-image models: a UNet, a VAE, a CLIP text encoder, its tokenizer and a noise schedule.

Four ways to get them, matching the presets: small random models for tests and the offline
demo, the shapes world's small trained models whose weights ship with the package
(`world.model`), the full architectures of Stable Diffusion 1.5, 2.1 and SDXL with random
weights for benchmarks, and real weights from a diffusers folder.

Three families of UNet2DConditionModel pipelines are supported, told apart by what a folder
holds (`detect_family`), never by its name:

======  =====================================  =========================  =====================
family  text conditioning                      prediction                 native size
======  =====================================  =========================  =====================
sd1     CLIP ViT-L, last layer, 768 wide       epsilon                    512
sd2     OpenCLIP ViT-H, 1024 wide, "!" pads    v (768 px) or epsilon      768 (or 512)
sdxl    CLIP ViT-L and OpenCLIP bigG, both     epsilon                    1024
        penultimate layers, 2048 wide; bigG's
        pooled embedding and the image size
        as added conditions
======  =====================================  =========================  =====================

Every shape (latent channels, context width and length, VAE factor) is read from the loaded
models; the sampler and the attention capture see only `DiffusionModels`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from magicseg_engine.config import DiffusionConfig
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.tokenizer import ClipTokenizer, clip_token_id, clip_vocabulary

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

log = logging.getLogger(__name__)

# Published configs of stable-diffusion-v1-5 (unet/, vae/, text_encoder/, scheduler/).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# CLIP ViT-L/14's text tower. The odd bos/eos/pad ids are what the published config says; the
# encoder never reads them for SD (only the last hidden state is used), the tokenizer decides padding.
SD15_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# Published configs of stable-diffusion-2-1 (768 px, v-prediction). The UNet keeps SD 1.5's block
# layout with OpenCLIP ViT-H's 1024-wide context, a head count per block, linear projections in
# its transformers and attention upcast to float32 (which 2.1's fp16 weights need).
SD21_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}

SD21_VAE: dict[str, Any] = {**SD15_VAE, "sample_size": 768}

# OpenCLIP ViT-H/14's text tower as transformers' CLIPTextModel, its last layer dropped: SD 2.x
# reads the penultimate layer, and the published weights stop there.
SD21_TEXT_ENCODER: dict[str, Any] = {
    **SD15_TEXT_ENCODER,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

SD21_SCHEDULER: dict[str, Any] = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}

# Published configs of stable-diffusion-xl-base-1.0. The UNet has no attention at its first
# (full-resolution) level, 2 and 10 transformer layers per block at the next two, and adds the
# pooled text embedding and six image-size numbers (time_ids) to its timestep embedding:
# 2816 = 1280 pooled + 6 x 256.
SDXL_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# SD's VAE retrained; it overflows in float16 (force_upcast), so it decodes in float32 there.
SDXL_VAE: dict[str, Any] = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# The first encoder is SD 1.5's CLIP ViT-L; the second OpenCLIP ViT-bigG/14's text tower with
# its projection, whose pooled output is the UNet's text_embeds.
SDXL_TEXT_ENCODER: dict[str, Any] = dict(SD15_TEXT_ENCODER)
SDXL_TEXT_ENCODER_2: dict[str, Any] = {
    **SD15_TEXT_ENCODER,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

SDXL_SCHEDULER: dict[str, Any] = {**SD15_SCHEDULER, "timestep_spacing": "leading"}

# The image side each family was trained at (its presets' --size); messages name it.
NATIVE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
# The family each random architecture (DiffusionConfig.architecture) belongs to.
ARCHITECTURE_FAMILY = {"tiny": "sd1", "shapes": "sd1", "sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}

# Small enough that 64x64 images (8x8 latents) sample in milliseconds per step on a CPU, yet
# with the same block types as SD so attention capture and the sampler meet the real structure.
TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
}

# Four blocks, so three downsamplings: the same factor of 8 as SD's VAE.
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

# The full CLIP vocabulary, so the real BPE ids of any prompt are valid inputs.
TINY_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SCHEDULERS = ("ddim", "dpm-solver++", "euler", "unipc")


@dataclass(frozen=True)
class RandomFamily:
    """What a random-weights architecture is built from."""

    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    pad_token: str  # SD 1.x pads prompts with the end-of-text token, SD 2.x with "!"
    init_on_cpu: bool  # small models are drawn on the CPU, so a seed gives the same weights anywhere
    text_encoder_2: dict | None = None  # SDXL's second encoder (with projection), padded with "!"


def random_family(architecture: str) -> RandomFamily:
    """The configs `architecture` is built from with random weights."""
    if architecture == "shapes":
        from magicseg_engine.world.model import SHAPES_TEXT_ENCODER, SHAPES_UNET, SHAPES_VAE

        return RandomFamily(SHAPES_UNET, SHAPES_VAE, SHAPES_TEXT_ENCODER, SD15_SCHEDULER, "<|endoftext|>", True)
    if architecture == "tiny":
        return RandomFamily(TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER, SD15_SCHEDULER, "<|endoftext|>", True)
    if architecture == "sd21":
        return RandomFamily(SD21_UNET, SD21_VAE, SD21_TEXT_ENCODER, SD21_SCHEDULER, "!", False)
    if architecture == "sdxl":
        return RandomFamily(SDXL_UNET, SDXL_VAE, SDXL_TEXT_ENCODER, SDXL_SCHEDULER, "<|endoftext|>", False,
                            SDXL_TEXT_ENCODER_2)
    # Built where it will run: a CPU detour would cost a 4 GB float32 copy and minutes of init.
    return RandomFamily(SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER, SD15_SCHEDULER, "<|endoftext|>", False)


@dataclass
class DiffusionModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: ClipTokenizer
    scheduler_config: dict  # noise schedule settings, for make_scheduler
    model_id: str  # identifies the weights; part of every sample key
    family: str = "sd1"  # one of NATIVE_SIZE's keys
    # SDXL's second text encoder (a CLIPTextModelWithProjection) and its tokenizer; None otherwise.
    text_encoder_2: Any = None
    tokenizer_2: ClipTokenizer | None = None
    # SDXL pipelines guide against zero conditioning rather than the empty prompt's embedding.
    zero_unconditional: bool = False

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids of `texts`: [N, L], or [N, 2, L] with one row per tokenizer when there are two."""
        ids = self.tokenizer(list(texts))
        if self.tokenizer_2 is None:
            return ids
        return torch.stack([ids, self.tokenizer_2(list(texts))], dim=1)

    @property
    def added_conditions(self) -> bool:
        """Whether the UNet takes SDXL's added conditions (pooled text embedding and time_ids)."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    def time_ids(self, height: int, width: int) -> torch.Tensor:
        """SDXL's size conditioning, [1, 6]: original size, crop corner (0, 0), target size."""
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)

    @property
    def vae_overflows_in_float16(self) -> bool:
        """SDXL's VAE overflows in float16: its config says force_upcast, which diffusers' SDXL
        pipelines read and its SD 1.x/2.x ones ignore (every VAE config defaults it to true)."""
        return self.family == "sdxl" and bool(self.vae.config.get("force_upcast", True))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def context_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def cross_attention_dim(self) -> int:
        dim = self.unet.config.cross_attention_dim
        # Configs may give one width per block; loading has checked that they agree.
        return int(dim[0] if isinstance(dim, (list, tuple)) else dim)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def channels_last(self) -> bool:
        """Whether the UNet's convolution weights are stored NHWC."""
        conv = next(m for m in self.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
        return conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


def make_scheduler(name: str, scheduler_config: dict):
    """A fresh diffusers scheduler `name` with the model's noise schedule; all deterministic."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    config = dict(scheduler_config)
    if name == "ddim":
        # eta defaults to 0 in step(): no noise is added between steps.
        return DDIMScheduler.from_config(config)
    if name == "dpm-solver++":
        # The SDE variants of DPM-Solver add noise; the ODE one keeps a seed's image fixed.
        # Second order ("DPM-Solver++ 2M"), whatever a model folder's own scheduler config says.
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        # The non-ancestral Euler: step() adds noise only when asked to through s_churn > 0.
        return EulerDiscreteScheduler.from_config(config)
    if name == "unipc":
        # UniPC's multistep predictor-corrector (bh2, second order), an ODE solver like the others.
        return UniPCMultistepScheduler.from_config(config, solver_order=2, solver_type="bh2", predict_x0=True)
    raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# CPU flags of the instructions that run bfloat16 matrix work natively (AMX, AVX512-BF16).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has AMX or AVX512-BF16, by the flags in `cpuinfo` (/proc/cpuinfo's text;
    read here when None). Without them bfloat16 convolutions are emulated and slower than
    float32. torch.backends.cpu.get_cpu_capability() says AVX512 with or without these
    instructions, so it cannot tell; a machine without /proc/cpuinfo counts as without."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags.update(value.split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_dtype(requested: str, device: str | torch.device) -> torch.dtype:
    """The dtype to run in: `requested` on CUDA; on the CPU bfloat16 where it has the
    instructions for it (`cpu_supports_bf16`), float32 otherwise."""
    if requested not in _DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; choose one of: {', '.join(_DTYPES)}")
    dtype = _DTYPES[requested]
    device = torch.device(device)
    if dtype is torch.float32:
        return dtype
    if device.type != "cuda":
        if dtype is torch.bfloat16 and device.type == "cpu" and cpu_supports_bf16():
            return dtype
        # float16 convolutions on the CPU, and bfloat16 without AMX or AVX512-BF16, are
        # emulated and far slower than float32.
        log.warning("%s requested on %s; running in float32 instead", requested, device.type)
        return torch.float32
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bfloat16 support; running in float16 instead")
        return torch.float16
    return dtype


def load_diffusion(
    config: DiffusionConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    channels_last: bool | None = None,
) -> DiffusionModels:
    """The models that `config` names, on `device` in `dtype` (from `config.dtype` when None), frozen.

    `channels_last` stores the UNet's and VAE's weights NHWC; None means on a GPU only.
    """
    device = torch.device(device)
    if dtype is None:
        dtype = resolve_dtype(config.dtype, device)
    if config.weights == "pretrained":
        models = _load_pretrained(config.model or "", device, dtype)
        expected = ARCHITECTURE_FAMILY.get(config.architecture)
        if expected and expected != models.family:
            log.warning("%s holds an %s model, not %s: it samples at %dx%d as asked (its native size is %d)",
                        config.model, models.family, expected, config.height, config.width,
                        NATIVE_SIZE[models.family])
    elif config.weights == "shipped":
        models = _load_shipped(device, dtype)
    else:
        family = random_family(config.architecture)
        init_device = torch.device("cpu") if family.init_on_cpu else device
        models = _build_random(config.architecture, family, seed, init_device, device, dtype)
    _finish(models, uses_channels_last(channels_last, device))
    return models


def uses_channels_last(requested: bool | None, device: torch.device) -> bool:
    """Whether weights are stored NHWC: as `requested`, or by default on a GPU only."""
    return device.type == "cuda" if requested is None else requested


def config_family(config: DiffusionConfig) -> str:
    """The family `load_diffusion(config)` would load, read without loading any weights."""
    if config.weights == "pretrained":
        return detect_family(_resolve_folder(config.model or "")).family
    return ARCHITECTURE_FAMILY[config.architecture]


def check_image_size(models: DiffusionModels, height: int, width: int) -> None:
    """UsageError unless the VAE and the UNet can take `height` x `width` images.

    The VAE needs whole latent pixels; the UNet halves the latent once per downsampling block
    and needs at least one pixel left at its coarsest level.
    """
    factor = models.vae_scale_factor
    down = 2 ** sum(1 for b in models.unet.down_blocks if getattr(b, "downsamplers", None))
    smallest = factor * down
    for name, value in (("height", height), ("width", width)):
        if value % factor or value < smallest:
            raise UsageError(f"--{name} {value}: the {models.family} model's VAE works in {factor}-pixel latents and "
                             f"its UNet halves them {down.bit_length() - 1} times, so sizes must be multiples of "
                             f"{factor} and at least {smallest} (its native size is {NATIVE_SIZE[models.family]})")


def model_identity(config: DiffusionConfig, device: str | torch.device = "cpu", seed: int = 0) -> str:
    """The `model_id` that `load_diffusion(config, device, seed=seed)` gives, without building or
    loading weights: a coordinator that renders nothing itself still needs every sample key."""
    device = torch.device(device)
    if config.weights == "pretrained":
        root = _resolve_folder(config.model or "")
        layout = detect_family(root)
        return _pretrained_id(root, _scheduler_config(root), _pad_ids(root, layout), layout)
    if config.weights == "shipped":
        return _shipped_id()
    family = random_family(config.architecture)
    return _random_id(config.architecture, family, seed, torch.device("cpu") if family.init_on_cpu else device)


def _random_id(name: str, family: RandomFamily, seed: int, init_device: torch.device) -> str:
    # Random weights differ between RNG devices (CPU vs CUDA generators) for the same seed.
    parts = [family.unet, family.vae, family.text_encoder, family.scheduler]
    if family.pad_token != "<|endoftext|>":  # so the ids of the families that pad with it stay as they were
        parts.append({"pad_token": family.pad_token})
    if family.text_encoder_2 is not None:
        parts.append({"text_encoder_2": family.text_encoder_2})
    return f"{name}-random:seed={seed}:init={init_device.type}:{_config_digest(*parts)}"


def _config_digest(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _build_random(
    name: str,
    family: RandomFamily,
    seed: int,
    init_device: torch.device,
    device: torch.device,
    dtype: torch.dtype,
) -> DiffusionModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    builds = [
        lambda: UNet2DConditionModel.from_config(family.unet),
        lambda: AutoencoderKL.from_config(family.vae),
        lambda: CLIPTextModel(CLIPTextConfig(**family.text_encoder)),
    ]
    if family.text_encoder_2 is not None:
        builds.append(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**family.text_encoder_2)))
    modules = []
    # A private RNG stream: the weights depend on `seed` alone, and callers' random state is untouched.
    with torch.random.fork_rng(devices=_rng_devices()):
        torch.manual_seed(seed)
        # Per module, so at most one float32 copy exists next to the converted ones.
        for build in builds:
            with init_device:
                module = build()
            # torch's own cast: diffusers' override warns about float32-only modules on every
            # cast, and these freshly built models have none.
            modules.append(torch.nn.Module.to(module, device=device, dtype=dtype))
    unet, vae, text_encoder = modules[:3]
    tokenizer = ClipTokenizer(context_length=int(text_encoder.config.max_position_embeddings),
                              pad_id=clip_token_id(family.pad_token))
    model_id = _random_id(name, family, seed, init_device)
    models = DiffusionModels(unet, vae, text_encoder, tokenizer, dict(family.scheduler), model_id,
                             family=ARCHITECTURE_FAMILY[name])
    if family.text_encoder_2 is not None:
        models.text_encoder_2 = modules[3]
        # SDXL's second tokenizer pads with "!", as OpenCLIP's does.
        models.tokenizer_2 = ClipTokenizer(context_length=int(modules[3].config.max_position_embeddings),
                                           pad_id=clip_token_id("!"))
        models.zero_unconditional = True
    return models


def _shipped_id() -> str:
    from magicseg_engine.world.model import file_digest, require_weights, shipped_path

    # The file's content, not its path: an installed copy and a checkout give the same keys.
    return f"shapes@{file_digest(require_weights(shipped_path()))}"


def _load_shipped(device: torch.device, dtype: torch.dtype) -> DiffusionModels:
    """The `shapes` preset's models, from the compact copy inside the package."""
    from magicseg_engine.world.model import shipped_path, unpack

    model_id = _shipped_id()
    shipped, _ = unpack(shipped_path())
    modules = [torch.nn.Module.to(m, device=device, dtype=dtype)
               for m in (shipped.unet, shipped.vae, shipped.text_encoder)]
    unet, vae, text_encoder = modules
    tokenizer = ClipTokenizer(context_length=int(text_encoder.config.max_position_embeddings),
                              pad_id=clip_token_id("<|endoftext|>"))
    return DiffusionModels(unet, vae, text_encoder, tokenizer, dict(SD15_SCHEDULER), model_id)


def _rng_devices() -> list[int]:
    # torch.manual_seed reseeds every GPU too, wherever the weights are drawn.
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _finish(models: DiffusionModels, channels_last: bool) -> None:
    for module in (models.unet, models.vae, models.text_encoder, models.text_encoder_2):
        if module is not None:
            module.eval()
            module.requires_grad_(False)
    if models.vae_overflows_in_float16 and next(models.vae.parameters()).dtype is torch.float16:
        # diffusers' SDXL pipelines upcast the VAE for every decode; here it is kept in float32 once.
        # The decoder is a small part of a pair's time; bfloat16 has float32's range and
        # stays as asked.
        log.info("the VAE overflows in float16 (force_upcast): decoding in float32")
        models.vae.to(torch.float32)
    if channels_last:
        # cuDNN's fastest convolution kernels for half precision want NHWC.
        models.unet.to(memory_format=torch.channels_last)
        models.vae.to(memory_format=torch.channels_last)


# --- pretrained weights -------------------------------------------------------------------

# Weight files each component may hold, most preferred first, as diffusers and transformers
# write them (single file or sharded index).
_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"),
    "text_encoder": ("model.safetensors", "model.safetensors.index.json",
                     "pytorch_model.bin", "pytorch_model.bin.index.json"),
}
_WEIGHT_FILES["text_encoder_2"] = _WEIGHT_FILES["text_encoder"]
_VARIANTS = ("fp16", "bf16")

# Only what loading reads, and only safetensors: the hub folders also carry pickled .bin copies,
# full-precision EMA checkpoints and single-file .ckpt files many gigabytes large.
_HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "unet/config.json", "vae/config.json", "text_encoder/config.json",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-*-of-*.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors", "text_encoder/model.safetensors.index.json",
    "text_encoder/model-*-of-*.safetensors",
    # SDXL's second encoder and tokenizer.
    "tokenizer_2/*", "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors", "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-*-of-*.safetensors",
]

_HUB_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _resolve_folder(name: str) -> Path:
    import re

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"model {name} is a file, not a diffusers folder (one with unet/, vae/, text_encoder/)")
        return path.resolve()
    if not re.fullmatch(_HUB_ID, name):
        raise UsageError(f"model folder {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS)).resolve()
    except Exception as err:
        raise UsageError(
            f"model {name!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({_one_line(err)}); offline, copy the diffusers folder here and pass its path with --model"
        ) from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {path}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object")
    return data


def _weight_variant(folder: Path, component: str) -> str | None:
    """None for the standard weight files, else the variant ("fp16") that is there instead."""
    names = _WEIGHT_FILES[component]
    if any((folder / n).is_file() for n in names):
        return None
    for variant in _VARIANTS:
        for n in names:
            stem, _, ext = n.partition(".")
            if (folder / f"{stem}.{variant}.{ext}").is_file():
                return variant
    raise UsageError(f"{folder} has no weights: expected {names[0]} or {names[2]}")


SUPPORTED = "UNet2DConditionModel text-to-image pipelines: SD 1.x, SD 2.x and SDXL base"
# model_index.json entries that only other kinds of pipeline have.
_FOREIGN_COMPONENTS = {"transformer": "a transformer-based model (no UNet)", "prior": "a two-stage prior model",
                       "decoder": "a two-stage decoder model", "low_res_scheduler": "an upscaler",
                       "image_encoder": "an image-conditioned model"}


@dataclass(frozen=True)
class FolderLayout:
    """What a diffusers folder holds, read from its files before any weight loads."""

    family: str
    components: tuple[str, ...]  # the weight folders to load: unet, vae, text_encoder[, text_encoder_2]
    variants: dict[str, str | None]  # component -> weight variant ("fp16") or None
    zero_unconditional: bool


def detect_family(root: Path) -> FolderLayout:
    """The family of the diffusers folder `root`, from model_index.json and the components' configs.

    UsageError, naming what was found and what is supported, for anything else: transformer
    models (SD3, FLUX, PixArt), SDXL's refiner (image to image only), inpainting, depth and
    upscaling UNets, and folders missing a part.
    """
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    pipeline = str(index.get("_class_name") or "pipeline")
    for component, what in _FOREIGN_COMPONENTS.items():
        # Recent diffusers write optional components as [null, null] ("image_encoder" in every
        # SD and SDXL folder): only a declared one tells another kind of pipeline.
        declared = isinstance(index.get(component), list) and index[component][:1] != [None]
        if declared or (component == "transformer" and (root / component).is_dir()):
            raise UsageError(f"{root} holds {pipeline}, {what}; supported: {SUPPORTED}")
    two_encoders = (root / "text_encoder_2").is_dir()
    if (two_encoders and not (root / "text_encoder").is_dir()) or index.get("requires_aesthetics_score"):
        raise UsageError(f"{root} holds an SDXL refiner ({pipeline}: one text encoder, image to image only); "
                         f"give an SDXL base model; supported: {SUPPORTED}")
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if two_encoders else [])
    variants: dict[str, str | None] = {}
    for component in components:
        folder = root / component
        if not folder.is_dir():
            raise UsageError(f"{root} is not a diffusers folder: it has no {component}/ subfolder")
        if not (folder / "config.json").is_file():
            raise UsageError(f"{folder} has no config.json")
        variants[component] = _weight_variant(folder, component)
    unet = _read_json(root / "unet" / "config.json")
    vae = _read_json(root / "vae" / "config.json")
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise UsageError(f"{root / 'unet'} is a {unet['_class_name']}; supported: {SUPPORTED}")
    in_channels, latent = unet.get("in_channels", 4), vae.get("latent_channels", 4)
    if in_channels != latent:
        raise UsageError(
            f"{root}: the unet takes {in_channels} input channels but the vae makes {latent}-channel latents "
            f"(an inpainting, depth or instruction model, {pipeline}); supported: {SUPPORTED}")
    added = unet.get("addition_embed_type")
    if two_encoders != (added == "text_time"):
        raise UsageError(f"{root}: {'two text encoders but a unet without' if two_encoders else 'a unet with'} "
                         f"SDXL's added conditions ({pipeline}); supported: {SUPPORTED}")
    if unet.get("class_embed_type") or (added and added != "text_time"):
        raise UsageError(f"{root}: the unet takes extra {unet.get('class_embed_type') or added} conditioning "
                         f"({pipeline}); supported: {SUPPORTED}")
    if two_encoders:
        text_2 = _read_json(root / "text_encoder_2" / "config.json")
        time_ids = (unet.get("projection_class_embeddings_input_dim", 0) - text_2.get("projection_dim", 0)) \
            / max(1, unet.get("addition_time_embed_dim", 1))
        if time_ids != 6:
            raise UsageError(f"{root}: the unet's added conditions take {time_ids:g} size numbers, not SDXL base's 6 "
                             f"(a refiner takes 5); give an SDXL base model; supported: {SUPPORTED}")
        # StableDiffusionXLPipeline's default; the folder may say otherwise.
        zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        return FolderLayout("sdxl", tuple(components), variants, zeros)
    # SD 2.x conditions on OpenCLIP's text tower, whose activation is GELU; SD 1.x on OpenAI's
    # CLIP, with quick GELU.
    text = _read_json(root / "text_encoder" / "config.json")
    return FolderLayout("sd2" if text.get("hidden_act") == "gelu" else "sd1", tuple(components), variants, False)


def _load_component(cls: Any, root: Path, component: str, dtype: torch.dtype, variant: str | None) -> Any:
    import importlib.util

    # diffusers spells it torch_dtype, transformers 5 dtype.
    if component == "text_encoder":
        extra: dict[str, Any] = {"dtype": dtype}
    else:
        # Without accelerate diffusers falls back to a random init before loading, and says so
        # at length on every load; asking for the fallback keeps the log quiet.
        extra = {"torch_dtype": dtype, "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    try:
        module, info = cls.from_pretrained(
            str(root), subfolder=component, variant=variant, local_files_only=True,
            output_loading_info=True, **extra,
        )
    except Exception as err:
        raise UsageError(f"could not load {root / component}: {_one_line(err)}") from None
    # Both libraries fill missing weights with random ones and only warn; a half-random model
    # would make plausible-looking garbage, so refuse it.
    missing = sorted(info.get("missing_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    if missing or mismatched:
        example = missing[0] if missing else str(mismatched[0])
        raise UsageError(
            f"{root / component} does not match its config.json: {len(missing)} weights missing and "
            f"{len(mismatched)} of the wrong shape (e.g. {example})"
        )
    return module


def _pad_id(root: Path, folder: str = "tokenizer", default: str = "<|endoftext|>") -> int:
    tokdir = root / folder
    vocab_path = tokdir / "vocab.json"
    vocab = clip_vocabulary()
    if vocab_path.is_file() and _read_json(vocab_path) != vocab:
        raise UsageError(f"{vocab_path} is not CLIP's BPE vocabulary; only CLIP-tokenised models are supported")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if not (tokdir / name).is_file():
            continue
        pad = _read_json(tokdir / name).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            if pad not in vocab:
                raise UsageError(f"{tokdir / name}: pad token {pad!r} is not in the CLIP vocabulary")
            return vocab[pad]
    # Stable Diffusion 1.x folders that name no pad token pad with end-of-text; SDXL's second
    # tokenizer pads with "!".
    return clip_token_id(default)


def _folder_digest(root: Path, scheduler_config: dict, pad_id: int | tuple[int, ...],
                   components: tuple[str, ...] = ("unet", "vae", "text_encoder"), zero_unconditional: bool = False) -> str:
    # Names, sizes and modification times stand in for the weights' contents: hashing gigabytes
    # would add a minute to every start, and any rewrite of a weight file changes its mtime.
    parts: list[Any] = [scheduler_config, pad_id]
    if zero_unconditional:
        parts.append("zero-unconditional")
    for component in components:
        folder = root / component
        parts.append((folder / "config.json").read_text(encoding="utf-8"))
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.name != "config.json":
                st = f.stat()
                parts.append((component, f.name, st.st_size, st.st_mtime_ns))
    return _config_digest(*parts)


def _pad_ids(root: Path, layout: FolderLayout) -> int | tuple[int, int]:
    first = _pad_id(root)
    return (first, _pad_id(root, "tokenizer_2", "!")) if "text_encoder_2" in layout.components else first


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype) -> DiffusionModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = _resolve_folder(name)
    layout = detect_family(root)
    scheduler_config = _scheduler_config(root)
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        log.warning("%s has no scheduler/scheduler_config.json; using Stable Diffusion 1.5's noise schedule", root)
    pad_ids = _pad_ids(root, layout)
    variants = layout.variants

    unet = _load_component(UNet2DConditionModel, root, "unet", dtype, variants["unet"])
    vae = _load_component(AutoencoderKL, root, "vae", dtype, variants["vae"])
    text_encoder = _load_component(CLIPTextModel, root, "text_encoder", dtype, variants["text_encoder"])
    encoders = [text_encoder]
    if "text_encoder_2" in layout.components:
        encoders.append(_load_component(CLIPTextModelWithProjection, root, "text_encoder_2", dtype,
                                         variants["text_encoder_2"]))

    first_pad = pad_ids[0] if isinstance(pad_ids, tuple) else pad_ids
    tokenizer = ClipTokenizer(context_length=int(text_encoder.config.max_position_embeddings), pad_id=first_pad)
    for encoder in encoders:
        if encoder.config.vocab_size < tokenizer.vocab_size:
            raise UsageError(f"{root}: a text encoder has {encoder.config.vocab_size} token embeddings, "
                             f"fewer than CLIP's {tokenizer.vocab_size}")
    lengths = {int(e.config.max_position_embeddings) for e in encoders}
    if len(lengths) > 1:
        raise UsageError(f"{root}: the two text encoders read prompts of different lengths {sorted(lengths)}")
    width = sum(int(e.config.hidden_size) for e in encoders)
    cross = unet.config.cross_attention_dim
    cross_dims = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    if cross_dims != {width}:
        raise UsageError(f"{root}: the unet attends to {cross}-wide text embeddings but the text "
                         f"encoder{'s give' if len(encoders) > 1 else ' gives'} {width}")

    unet, vae, text_encoder = (m.to(device) for m in (unet, vae, text_encoder))
    models = DiffusionModels(unet, vae, text_encoder, tokenizer, scheduler_config,
                             _pretrained_id(root, scheduler_config, pad_ids, layout), family=layout.family)
    if len(encoders) > 1:
        models.text_encoder_2 = encoders[1].to(device)
        models.tokenizer_2 = ClipTokenizer(context_length=tokenizer.context_length, pad_id=pad_ids[1])
        models.zero_unconditional = layout.zero_unconditional
    return models


def _scheduler_config(root: Path) -> dict:
    path = root / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return {k: v for k, v in _read_json(path).items() if not k.startswith("_")}
    return dict(SD15_SCHEDULER)


def _pretrained_id(root: Path, scheduler_config: dict, pad_id: int | tuple[int, int], layout: FolderLayout) -> str:
    return f"{root}@{_folder_digest(root, scheduler_config, pad_id, layout.components, layout.zero_unconditional)}"

"""The text-to-image models: a UNet, a VAE, a CLIP text encoder, its tokenizer and a noise schedule.

Four ways to get them, matching the presets: small random models for tests and the offline
demo, the shapes world's small trained models whose weights ship with the package
(`world.model`), the full Stable Diffusion v1.5 architectures with random weights for
benchmarks, and real weights from a diffusers folder. Shapes are always read from the loaded models, so other
UNet2DConditionModel checkpoints (SD 2.x) load through the same path.
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


def random_family(architecture: str) -> RandomFamily:
    """The configs `architecture` is built from with random weights."""
    if architecture == "shapes":
        from magicseg_engine.world.model import SHAPES_TEXT_ENCODER, SHAPES_UNET, SHAPES_VAE

        return RandomFamily(SHAPES_UNET, SHAPES_VAE, SHAPES_TEXT_ENCODER, SD15_SCHEDULER, "<|endoftext|>", True)
    if architecture == "tiny":
        return RandomFamily(TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER, SD15_SCHEDULER, "<|endoftext|>", True)
    if architecture == "sd21":
        return RandomFamily(SD21_UNET, SD21_VAE, SD21_TEXT_ENCODER, SD21_SCHEDULER, "!", False)
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


def resolve_dtype(requested: str, device: str | torch.device) -> torch.dtype:
    """The dtype to run in: `requested` on CUDA, float32 elsewhere."""
    if requested not in _DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; choose one of: {', '.join(_DTYPES)}")
    dtype = _DTYPES[requested]
    device = torch.device(device)
    if dtype is torch.float32:
        return dtype
    if device.type != "cuda":
        # Half-precision convolutions on the CPU are either missing or far slower than float32.
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


def model_identity(config: DiffusionConfig, device: str | torch.device = "cpu", seed: int = 0) -> str:
    """The `model_id` that `load_diffusion(config, device, seed=seed)` gives, without building or
    loading weights: a coordinator that renders nothing itself still needs every sample key."""
    device = torch.device(device)
    if config.weights == "pretrained":
        root = _resolve_folder(config.model or "")
        _check_layout(root)
        return _pretrained_id(root, _scheduler_config(root), _pad_id(root))
    if config.weights == "shipped":
        return _shipped_id()
    family = random_family(config.architecture)
    return _random_id(config.architecture, family, seed, torch.device("cpu") if family.init_on_cpu else device)


def _random_id(name: str, family: RandomFamily, seed: int, init_device: torch.device) -> str:
    # Random weights differ between RNG devices (CPU vs CUDA generators) for the same seed.
    parts = [family.unet, family.vae, family.text_encoder, family.scheduler]
    if family.pad_token != "<|endoftext|>":  # so the ids of the families that pad with it stay as they were
        parts.append({"pad_token": family.pad_token})
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
    from transformers import CLIPTextConfig, CLIPTextModel

    modules = []
    # A private RNG stream: the weights depend on `seed` alone, and callers' random state is untouched.
    with torch.random.fork_rng(devices=_rng_devices()):
        torch.manual_seed(seed)
        # Per module, so at most one float32 copy exists next to the converted ones.
        for build in (
            lambda: UNet2DConditionModel.from_config(family.unet),
            lambda: AutoencoderKL.from_config(family.vae),
            lambda: CLIPTextModel(CLIPTextConfig(**family.text_encoder)),
        ):
            with init_device:
                module = build()
            # torch's own cast: diffusers' override warns about float32-only modules on every
            # cast, and these freshly built models have none.
            modules.append(torch.nn.Module.to(module, device=device, dtype=dtype))
    unet, vae, text_encoder = modules
    tokenizer = ClipTokenizer(context_length=int(text_encoder.config.max_position_embeddings),
                              pad_id=clip_token_id(family.pad_token))
    model_id = _random_id(name, family, seed, init_device)
    return DiffusionModels(unet, vae, text_encoder, tokenizer, dict(family.scheduler), model_id)


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
    for module in (models.unet, models.vae, models.text_encoder):
        module.eval()
        module.requires_grad_(False)
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


def _check_layout(root: Path) -> dict[str, str | None]:
    if (root / "text_encoder_2").is_dir():
        raise UsageError(
            f"{root} is a pipeline with two text encoders (SDXL); only single-encoder models are supported"
        )
    variants = {}
    for component in ("unet", "vae", "text_encoder"):
        folder = root / component
        if not folder.is_dir():
            raise UsageError(f"{root} is not a diffusers folder: it has no {component}/ subfolder")
        if not (folder / "config.json").is_file():
            raise UsageError(f"{folder} has no config.json")
        variants[component] = _weight_variant(folder, component)
    return variants


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


def _pad_id(root: Path) -> int:
    tokdir = root / "tokenizer"
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
    # Stable Diffusion 1.x folders that name no pad token pad with end-of-text.
    return clip_token_id("<|endoftext|>")


def _folder_digest(root: Path, scheduler_config: dict, pad_id: int) -> str:
    # Names, sizes and modification times stand in for the weights' contents: hashing gigabytes
    # would add a minute to every start, and any rewrite of a weight file changes its mtime.
    parts: list[Any] = [scheduler_config, pad_id]
    for component in ("unet", "vae", "text_encoder"):
        folder = root / component
        parts.append((folder / "config.json").read_text(encoding="utf-8"))
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.name != "config.json":
                st = f.stat()
                parts.append((component, f.name, st.st_size, st.st_mtime_ns))
    return _config_digest(*parts)


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype) -> DiffusionModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = _resolve_folder(name)
    variants = _check_layout(root)
    scheduler_config = _scheduler_config(root)
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        log.warning("%s has no scheduler/scheduler_config.json; using Stable Diffusion 1.5's noise schedule", root)
    pad_id = _pad_id(root)

    unet = _load_component(UNet2DConditionModel, root, "unet", dtype, variants["unet"])
    vae = _load_component(AutoencoderKL, root, "vae", dtype, variants["vae"])
    text_encoder = _load_component(CLIPTextModel, root, "text_encoder", dtype, variants["text_encoder"])

    tokenizer = ClipTokenizer(context_length=int(text_encoder.config.max_position_embeddings), pad_id=pad_id)
    if text_encoder.config.vocab_size < tokenizer.vocab_size:
        raise UsageError(f"{root / 'text_encoder'} has {text_encoder.config.vocab_size} token embeddings, "
                         f"fewer than CLIP's {tokenizer.vocab_size}")
    cross = unet.config.cross_attention_dim
    cross_dims = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    if cross_dims != {text_encoder.config.hidden_size}:
        raise UsageError(f"{root}: the unet attends to {cross}-wide text embeddings but the text encoder "
                         f"gives {text_encoder.config.hidden_size}")
    if unet.config.in_channels != vae.config.latent_channels:
        raise UsageError(
            f"{root}: the unet takes {unet.config.in_channels} input channels but the vae makes "
            f"{vae.config.latent_channels}-channel latents (inpainting and depth models are not supported)"
        )

    unet, vae, text_encoder = (m.to(device) for m in (unet, vae, text_encoder))
    return DiffusionModels(unet, vae, text_encoder, tokenizer, scheduler_config,
                           _pretrained_id(root, scheduler_config, pad_id))


def _scheduler_config(root: Path) -> dict:
    path = root / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return {k: v for k, v in _read_json(path).items() if not k.startswith("_")}
    return dict(SD15_SCHEDULER)


def _pretrained_id(root: Path, scheduler_config: dict, pad_id: int) -> str:
    return f"{root}@{_folder_digest(root, scheduler_config, pad_id)}"

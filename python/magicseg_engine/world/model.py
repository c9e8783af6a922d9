"""The `shapes` text-to-image model: its architectures, and the compact copy of its weights that ships.

The three models are ordinary diffusers and transformers classes, in the block layout of Stable
Diffusion v1 at a few thousandths of its width: a 4x VAE (32x32 images, 8x8 latents), a UNet
with cross-attention at the 8x8 and 4x4 levels and in its mid block, and a two-layer CLIP
text encoder over the real CLIP BPE vocabulary. 32x32 images keep every shape several latent
pixels wide while keeping the UNet's steps cheap enough for about ten minutes of training on
two CPU cores.

The shipped copy (`weights/shapes.safetensors`) is one float16 file with every tensor of the
three models, except that the token embedding keeps only the rows of the tokens the world's
captions use: the other 49 000 rows are never trained, and storing them would triple the file.
`unpack` puts zeros back in their place, which is what any prompt outside the world's language
meets anyway: an untrained embedding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from magicseg_engine.errors import UsageError

SHAPES_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
}

# Three blocks, two downsamplings: 32x32 images become 8x8 latents.
SHAPES_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    # Narrow at full resolution, where a VAE spends most of its time: more images per minute
    # of training, and in our runs better reconstructions than [32, 64, 64] in the same time.
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    # No attention in the mid block: it slows every VAE step, and the shapes reconstruct without it.
    "mid_block_add_attention": False,
    # Replaced after VAE training by 1 / std of the training latents, as SD's was chosen.
    "scaling_factor": 1.0,
}

SHAPES_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    # Captions are at most a dozen tokens; 24 leaves room for start, end and longer floors.
    "max_position_embeddings": 24,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SHIPPED_NAME = "shapes.safetensors"


def shipped_path() -> Path:
    """The shipped weights of the `shapes` preset (which may be missing in a broken install)."""
    return Path(str(resources.files("magicseg_engine.world") / "weights" / SHIPPED_NAME))


@dataclass
class ShapesModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module


def build_shapes_models(seed: int = 0, vae_config: dict | None = None) -> ShapesModels:
    """The three `shapes` architectures with random weights drawn from `seed`, float32 on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(SHAPES_UNET)
        vae = AutoencoderKL.from_config(vae_config or SHAPES_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SHAPES_TEXT_ENCODER))
    return ShapesModels(unet, vae, text_encoder)


def pack(models: ShapesModels, token_ids: list[int], out: Path, metadata: dict[str, Any]) -> str:
    """Write the compact float16 copy of `models` to `out`; return its content hash.

    `token_ids` are the embedding rows kept; `metadata` (the training command, seed, losses)
    is stored in the file's header next to the VAE's scaling factor.
    """
    from safetensors.torch import save

    from magicseg_engine.atomic import atomic_output

    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("unet", models.unet), ("vae", models.vae), ("text_encoder", models.text_encoder)):
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().to(torch.float16).contiguous()
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64)
    key = _embedding_key(tensors)
    tensors[key] = tensors[key][ids].contiguous()
    tensors["token_ids"] = ids
    header = {"scaling_factor": str(float(models.vae.config.scaling_factor)), "world": json.dumps(metadata)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, "wb") as f:
        f.write(save(tensors, metadata=header))
    return file_digest(out)


def _embedding_key(tensors: dict[str, torch.Tensor]) -> str | None:
    # transformers 5 dropped the "text_model." level of CLIPTextModel's names; match either.
    return next((k for k in tensors if k.startswith("text_encoder.") and k.endswith("token_embedding.weight")), None)


def require_weights(path: Path) -> Path:
    """`path`, or UsageError saying how to get the shapes weights back."""
    if not path.is_file():
        raise UsageError(f"the shapes weights {path} are missing; reinstall magicseg-engine, or train "
                         "them with `magicseg-engine train-world --out DIR` and pass --model DIR")
    return path


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def unpack(path: Path) -> tuple[ShapesModels, dict[str, Any]]:
    """The float32 models stored by `pack` at `path`, and the metadata stored with them.

    UsageError when the file is missing, unreadable, or does not fit the architectures.
    """
    from safetensors import safe_open

    require_weights(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        scaling = float(header["scaling_factor"])
        metadata = json.loads(header.get("world", "{}"))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise UsageError(f"the shapes weights {path} cannot be read ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); reinstall magicseg-engine "
                         "or retrain them with `magicseg-engine train-world`") from None
    models = build_shapes_models(0, {**SHAPES_VAE, "scaling_factor": scaling})
    ids = tensors.pop("token_ids", None)
    key = _embedding_key(tensors)
    rows = tensors.get(key) if key else None
    if ids is None or rows is None or rows.shape[0] != ids.shape[0]:
        raise UsageError(f"the shapes weights {path} have no token table; retrain them with `magicseg-engine train-world`")
    full = torch.zeros(SHAPES_TEXT_ENCODER["vocab_size"], rows.shape[1], dtype=rows.dtype)
    full[ids] = rows
    tensors[key] = full
    for prefix, module in (("unet", models.unet), ("vae", models.vae), ("text_encoder", models.text_encoder)):
        own = {k[len(prefix) + 1:]: v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}
        expected = module.state_dict()
        # Buffers such as position_ids may or may not be saved by a transformers version.
        missing = [k for k in expected if k not in own and not k.endswith("position_ids")]
        wrong = [k for k, v in own.items() if k in expected and v.shape != expected[k].shape]
        if missing or wrong:
            raise UsageError(f"the shapes weights {path} do not fit the shapes architecture "
                             f"({len(missing)} missing, {len(wrong)} of the wrong shape); retrain them "
                             "with `magicseg-engine train-world`")
        module.load_state_dict({k: v for k, v in own.items() if k in expected}, strict=False)
    return models, metadata

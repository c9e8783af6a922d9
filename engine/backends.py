"""Interchangeable ways to run the diffusion models: eager torch, torch.compile, ONNX Runtime.

The sampler only ever calls three functions — encode token ids, predict noise, decode latents —
so a backend is those three callables. Attention capture hooks into torch attention
processors, so it needs a backend that runs the torch modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "compile")
# Backends that run the torch attention processors, where attention capture hooks in.
CAPTURING_BACKENDS = ("torch", "compile")


@dataclass
class DiffusionRunners:
    backend: str
    encode_text: Callable[[torch.Tensor], torch.Tensor]  # ids [N, L] → hidden states [N, L, D]
    predict_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # latents, t, context → eps
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents already divided by the VAE scale → images in [-1, 1]
    supports_attention_capture: bool


def torch_runners(models) -> DiffusionRunners:
    return DiffusionRunners(
        backend="torch",
        encode_text=lambda ids: models.text_encoder(ids)[0],
        predict_noise=lambda x, t, ctx: models.unet(x, t, encoder_hidden_states=ctx).sample,
        decode=lambda z: models.vae.decode(z.to(models.vae.dtype)).sample,
        supports_attention_capture=True,
    )


def compile_runners(models) -> DiffusionRunners:
    """torch.compile of each module; on a GPU with CUDA graphs ("reduce-overhead"), since a
    denoising step is many small kernels whose launch cost CUDA graphs remove."""
    cuda = next(models.unet.parameters()).is_cuda
    mode = "reduce-overhead" if cuda else "default"
    unet = torch.compile(models.unet, mode=mode, dynamic=False)
    text = torch.compile(models.text_encoder, mode=mode, dynamic=False)
    decode = torch.compile(models.vae.decode, mode=mode, dynamic=False)
    return DiffusionRunners(
        backend="compile",
        encode_text=lambda ids: text(ids)[0],
        predict_noise=lambda x, t, ctx: unet(x, t, encoder_hidden_states=ctx).sample,
        decode=lambda z: decode(z.to(models.vae.dtype)).sample,
        # Capture swaps attention processors: compiled graphs then break at the capture
        # kernels and run those parts eagerly, which still gives the same maps.
        supports_attention_capture=True,
    )


def make_runners(backend: str, models) -> DiffusionRunners:
    """The runners of `backend` for `models` (already on their device and dtype)."""
    if backend == "torch":
        return torch_runners(models)
    if backend == "compile":
        return compile_runners(models)
    from magicseg_engine.errors import UsageError

    raise UsageError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")

"""Interchangeable ways to run the diffusion models: eager torch, torch.compile, ONNX Runtime.

The sampler only ever calls three functions — encode token ids, predict noise, decode latents —
so a backend is those three callables. Attention capture hooks into torch attention
processors, so it needs a backend that runs the torch modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

BACKENDS = ("torch", "compile", "onnxruntime")
# Backends that run the torch attention processors, where attention capture hooks in.
CAPTURING_BACKENDS = ("torch", "compile")


@dataclass
class DiffusionRunners:
    backend: str
    encode_text: Callable[[torch.Tensor], torch.Tensor]  # ids [N, L] → hidden states [N, L, D]
    predict_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # latents, t, context → eps
    decode: Callable[[torch.Tensor], torch.Tensor]  # final latents → images in [-1, 1]
    supports_attention_capture: bool


def require_onnx() -> None:
    """Raise a UsageError naming the extra to install when onnx or onnxruntime is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        from magicseg_engine.errors import UsageError

        raise UsageError(f"ONNX export and onnxruntime need {err.name}: pip install 'magicseg-engine[onnx]'") from None


def torch_runners(models) -> DiffusionRunners:
    return DiffusionRunners(
        backend="torch",
        encode_text=lambda ids: models.text_encoder(ids)[0],
        predict_noise=lambda x, t, ctx: models.unet(x, t, encoder_hidden_states=ctx).sample,
        decode=lambda z: models.vae.decode((z / models.vae.config.scaling_factor).to(models.vae.dtype)).sample,
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
        decode=lambda z: decode((z / models.vae.config.scaling_factor).to(models.vae.dtype)).sample,
        # Capture swaps attention processors: compiled graphs then break at the capture
        # kernels and run those parts eagerly, which still gives the same maps.
        supports_attention_capture=True,
    )


def onnxruntime_runners(models, engines: Path, latent_shape) -> DiffusionRunners:
    """Sessions over the exports in `engines` (from build-engines), checked against `models`.

    Inputs and outputs cross as numpy arrays: on a GPU that is a copy each way per call, which
    an IO-binding runner would avoid.
    """
    require_onnx()
    from magicseg_engine.engine.build import check_latent_size, load_components, to_numpy_inputs
    from magicseg_engine.engine.export import DIFFUSION_COMPONENTS, onnxruntime_session

    exported = load_components(Path(engines), models.model_id, DIFFUSION_COMPONENTS)
    check_latent_size(exported["unet"], latent_shape)
    sessions = {c: onnxruntime_session(e) for c, e in exported.items()}
    device = next(models.unet.parameters()).device

    def run(component: str, **inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sessions[component].run(None, to_numpy_inputs(inputs))[0]).to(device)

    return DiffusionRunners(
        backend="onnxruntime",
        encode_text=lambda ids: run("text-encoder", input_ids=ids.long()),
        predict_noise=lambda x, t, ctx: run("unet", sample=x.float(), timestep=t.float().expand(x.shape[0]),
                                            encoder_hidden_states=ctx.float()),
        # The exported decoder divides by the VAE scale itself.
        decode=lambda z: run("vae-decoder", latents=z.float()),
        supports_attention_capture=False,
    )


def make_runners(backend: str, models, engines: Path | None = None, latent_shape=None) -> DiffusionRunners:
    """The runners of `backend` for `models` (already on their device and dtype)."""
    if backend == "torch":
        return torch_runners(models)
    if backend == "compile":
        return compile_runners(models)
    if backend == "onnxruntime":
        if engines is None:
            from magicseg_engine.errors import UsageError

            raise UsageError("--backend onnxruntime needs --engines DIR, written by magicseg-engine build-engines")
        return onnxruntime_runners(models, engines, latent_shape)
    from magicseg_engine.errors import UsageError

    raise UsageError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")

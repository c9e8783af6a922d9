"""Interchangeable ways to run the diffusion models: eager torch, torch.compile, ONNX Runtime, TensorRT.

The sampler only ever calls three functions — encode token ids, predict noise, decode latents —
so a backend is those three callables. SDXL's extras ride along: `encode_text` gives the pooled
embedding beside the context (None for SD 1.x/2.x), and `predict_noise` takes the UNet's added
conditions (`text_embeds`, `time_ids`) as a dict, None where the UNet has none. Attention capture hooks into torch attention
processors on the torch backends; the exported backends (ONNX Runtime, TensorRT) run the
unet-capture export on the steps the capture reads, which computes the same maps in its graph.
`attach_capture` connects a capture to whichever of the two a backend uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from magicseg_engine.engine.export import (
    CAPTURE_COMPONENT,
    DIFFUSION_COMPONENTS,
    SAM_COMPONENTS,
    to_numpy,
)
from magicseg_engine.errors import UsageError

BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")
# Backends that run files written by build-engines, from --engines DIR.
EXPORTED_BACKENDS = ("onnxruntime", "tensorrt")
# The kernels scaled_dot_product_attention may be held to in the UNet; "auto" lets it choose.
ATTENTION_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")


@dataclass
class DiffusionRunners:
    backend: str
    # ids [N, L] (or [N, 2, L] for two tokenizers) → (context [N, L, D], pooled [N, P] or None)
    encode_text: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    # latents, t, context, added conditions (dict of tensors, or None) → eps
    predict_noise: Callable[..., torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]  # final latents → images in [-1, 1]
    # Called once with the run's AttentionCapture before sampling; raises UsageError when this
    # backend cannot feed it.
    attach_capture: Callable[[object], None]


def _capture_installs_itself(capture) -> None:
    """On torch backends the capture's own processors record the maps; nothing to connect."""


def require_onnx() -> None:
    """Raise a UsageError naming the extra to install when onnx or onnxruntime is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UsageError(f"ONNX export and onnxruntime need {err.name}: pip install 'magicseg-engine[onnx]'") from None


def text_conditioning(text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module | None,
                      ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context [N, L, D], pooled [N, P] or None) of token ids from `DiffusionModels.tokenize`.

    One encoder (SD 1.x/2.x): its last hidden state, as their pipelines read it. Two (SDXL):
    both encoders' penultimate hidden states side by side, and the second one's projected
    pooled embedding, as StableDiffusionXLPipeline reads them.
    """
    if text_encoder_2 is None:
        return text_encoder(ids)[0], None
    first = text_encoder(ids[:, 0], output_hidden_states=True).hidden_states[-2]
    second = text_encoder_2(ids[:, 1], output_hidden_states=True)
    return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds


def torch_runners(models) -> DiffusionRunners:
    return DiffusionRunners(
        backend="torch",
        encode_text=lambda ids: text_conditioning(models.text_encoder, models.text_encoder_2, ids),
        predict_noise=lambda x, t, ctx, added=None: models.unet(x, t, encoder_hidden_states=ctx,
                                                                added_cond_kwargs=added).sample,
        decode=lambda z: models.vae.decode((z / models.vae.config.scaling_factor).to(models.vae.dtype)).sample,
        attach_capture=_capture_installs_itself,
    )


def _owned(tensor: torch.Tensor, graphed: bool) -> torch.Tensor:
    """A CUDA-graphed call's output lives in a memory pool that the next graphed call may reuse;
    callers keep outputs across calls (the empty prompt's embedding, the VAE's chunks), so those
    are copied out. Without CUDA graphs the output is already the caller's."""
    return tensor.clone() if graphed else tensor


def compile_runners(models) -> DiffusionRunners:
    """torch.compile of each module; on a GPU with CUDA graphs ("reduce-overhead"), since a
    denoising step is many small kernels whose launch cost CUDA graphs remove."""
    graphed = next(models.unet.parameters()).is_cuda
    mode = "reduce-overhead" if graphed else "default"
    unet = torch.compile(models.unet, mode=mode, dynamic=False)
    text = torch.compile(models.text_encoder, mode=mode, dynamic=False)
    text_2 = torch.compile(models.text_encoder_2, mode=mode, dynamic=False) if models.text_encoder_2 else None
    decode = torch.compile(models.vae.decode, mode=mode, dynamic=False)

    def encode_text(ids):
        context, pooled = text_conditioning(text, text_2, ids)
        return _owned(context, graphed), None if pooled is None else _owned(pooled, graphed)

    return DiffusionRunners(
        backend="compile",
        encode_text=encode_text,
        predict_noise=lambda x, t, ctx, added=None: _owned(
            unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample, graphed),
        decode=lambda z: _owned(decode((z / models.vae.config.scaling_factor).to(models.vae.dtype)).sample, graphed),
        # Capture swaps attention processors: compiled graphs then break at the capture
        # kernels and run those parts eagerly, which still gives the same maps.
        attach_capture=_capture_installs_itself,
    )


class OnnxRuntimeComponent:
    """One exported component in an ONNX Runtime session: `component(**tensors) -> {output: tensor}`.

    Inputs are cast to the types the file declares; outputs come back on `device`. They cross
    as numpy arrays: on a GPU that is a copy each way per call, which IO binding would avoid.
    """

    def __init__(self, exported, device: torch.device):
        from magicseg_engine.engine.export import onnxruntime_session

        self.exported = exported
        self.session = onnxruntime_session(exported)
        self.device = device
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {k: to_numpy(v, self.exported.dtypes[k]) for k, v in inputs.items()}
        outputs = self.session.run(None, feeds)
        return {n: torch.from_numpy(o).to(self.device) for n, o in zip(self.output_names, outputs)}


class TensorRTComponent:
    """One component's TensorRT engine on torch CUDA tensors, inputs cast to the engine's types."""

    def __init__(self, engine_path: Path, *, cuda_graph: bool):
        from magicseg_engine.engine.tensorrt import TensorRTRunner

        self.runner = TensorRTRunner(engine_path, cuda_graph=cuda_graph)

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self.runner
        return r(**{k: v.to(r.device, r.dtypes[k]) for k, v in inputs.items()})


class ExportedUNet:
    """predict_noise over an exported UNet; with a capture attached, its maps come from unet-capture.

    The capture says per call whether the step is read (AttentionCapture.external_inputs); the
    plain UNet runs the other steps, so steps that are not read cost nothing extra.
    """

    def __init__(self, plain, capturing=None, capture_layers: dict[str, int] | None = None, where: str = ""):
        self.plain = plain
        self.capturing = capturing
        self.capture_layers = dict(capture_layers or {})
        self.where = where
        self.capture = None

    def attach(self, capture) -> None:
        if self.capturing is None:
            raise UsageError(f"{self.where} has no unet-capture, which masks from an exported UNet need; "
                             "run build-engines again with unet-capture among --components, or use --mask-source none")
        if dict(capture.layers) != self.capture_layers:
            raise UsageError(f"the unet-capture in {self.where} reads other attention layers than this run "
                             f"({sorted(self.capture_layers)} vs {sorted(capture.layers)}); run build-engines again")
        self.capture = capture

    def __call__(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                 added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        feeds = {"sample": x, "timestep": t.expand(x.shape[0]), "encoder_hidden_states": ctx, **(added or {})}
        extra = self.capture.external_inputs(x) if self.capture is not None else None
        if extra is None:
            return self.plain(**feeds)["noise_pred"].to(x.dtype)
        out = self.capturing(**feeds, **extra)
        factors = sorted(set(self.capture_layers.values()))
        self.capture.add_external_maps({f: out[f"maps_f{f}"] for f in factors})
        return out["noise_pred"].to(x.dtype)


def exported_runners(backend: str, components: dict, capture_layers: dict[str, int], where: str) -> DiffusionRunners:
    """Runners over exported components (name -> callable of named tensors), for onnxruntime and tensorrt."""
    unet = ExportedUNet(components["unet"], components.get(CAPTURE_COMPONENT), capture_layers, where)

    def encode_text(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = components["text-encoder"](input_ids=ids.long())
        if "text_embeds" in out:  # SDXL's two encoders, exported as one graph
            return out["encoder_hidden_states"], out["text_embeds"]
        return out["last_hidden_state"], None

    return DiffusionRunners(
        backend=backend,
        encode_text=encode_text,
        predict_noise=unet,
        # The exported decoder divides by the VAE scale itself.
        decode=lambda z: components["vae-decoder"](latents=z)["image"],
        attach_capture=unet.attach,
    )


def onnxruntime_runners(models, engines: Path, latent_shape, capture: bool = False) -> DiffusionRunners:
    """Sessions over the exports in `engines` (from build-engines), checked against `models`.

    With `capture`, unet-capture is loaded too, for the steps whose attention masks read.
    """
    require_onnx()
    from magicseg_engine.engine.build import check_latent_size, load_components

    needed = DIFFUSION_COMPONENTS + ((CAPTURE_COMPONENT,) if capture else ())
    exported = load_components(Path(engines), models.model_id, needed)
    check_latent_size(exported["unet"], latent_shape)
    device = next(models.unet.parameters()).device
    sessions = {c: OnnxRuntimeComponent(e, device) for c, e in exported.items()}
    layers = exported[CAPTURE_COMPONENT].capture_layers if capture else {}
    return exported_runners("onnxruntime", sessions, layers, str(engines))


def tensorrt_runners(models, engines: Path, latent_shape, capture: bool = False) -> DiffusionRunners:
    """TensorRT engines listed in `engines`/manifest.json (build-engines --format tensorrt).

    The UNet engines replay CUDA graphs: a denoising step has hundreds of kernels, whose
    launch cost the graph removes; the graph is re-captured when the batch shape changes.
    """
    from magicseg_engine.engine.build import check_latent_size, load_engines
    from magicseg_engine.engine.tensorrt import require_tensorrt

    require_tensorrt()
    needed = DIFFUSION_COMPONENTS + ((CAPTURE_COMPONENT,) if capture else ())
    exported, engine_paths = load_engines(Path(engines), models.model_id, needed)
    check_latent_size(exported["unet"], latent_shape)
    runners = {c: TensorRTComponent(p, cuda_graph=c in ("unet", CAPTURE_COMPONENT)) for c, p in engine_paths.items()}
    layers = exported[CAPTURE_COMPONENT].capture_layers if capture else {}
    return exported_runners("tensorrt", runners, layers, str(engines))


# --- SAM --------------------------------------------------------------------------------------

@dataclass
class SamRunners:
    """The two calls SamRefiner makes; the prompt encoder (a few small ops) stays in torch."""

    backend: str
    encode_images: Callable[[torch.Tensor], torch.Tensor]  # preprocessed [N, 3, S, S] → embeddings [N, C, h, w] float32
    # embedding [1, C, h, w], sparse [P, T, C], dense [P, C, h, w] → multimask logits [P, 3, 4h, 4w], IoU [P, 3]
    decode_masks: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sam_torch_runners(sam, compiled: bool = False) -> SamRunners:
    encoder = sam.image_encoder
    graphed = compiled and next(encoder.parameters()).is_cuda
    if compiled:
        encoder = torch.compile(encoder, mode="reduce-overhead" if graphed else "default", dynamic=False)
    dtype = next(sam.image_encoder.parameters()).dtype

    def decode_masks(embedding, sparse, dense):
        return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=True)

    return SamRunners("compile" if compiled else "torch", lambda x: _owned(encoder(x.to(dtype)), graphed).float(),
                      decode_masks)


def _exported_sam_runners(backend: str, components: dict) -> SamRunners:
    def decode_masks(embedding, sparse, dense):
        out = components["sam-mask-decoder"](image_embeddings=embedding, sparse_prompt_embeddings=sparse,
                                             dense_prompt_embeddings=dense)
        return out["masks"].float(), out["iou_predictions"].float()

    return SamRunners(backend, lambda x: components["sam-image-encoder"](images=x)["image_embeddings"].float(),
                      decode_masks)


def make_sam_runners(backend: str, sam, sam_id: str, engines: Path | None = None) -> SamRunners:
    """SamRefiner's runners on `backend`; exported ones must come from the same SAM (`sam_id`)."""
    if backend in ("torch", "compile"):
        return sam_torch_runners(sam, compiled=backend == "compile")
    if backend not in EXPORTED_BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if engines is None:
        raise UsageError(f"--backend {backend} needs --engines DIR, written by magicseg-engine build-engines")
    from magicseg_engine.engine.build import load_components, load_engines

    device = next(sam.parameters()).device
    if backend == "onnxruntime":
        require_onnx()
        exported = load_components(Path(engines), None, SAM_COMPONENTS, sam_id=sam_id)
        return _exported_sam_runners(backend, {c: OnnxRuntimeComponent(e, device) for c, e in exported.items()})
    from magicseg_engine.engine.tensorrt import require_tensorrt

    require_tensorrt()
    _, paths = load_engines(Path(engines), None, SAM_COMPONENTS, sam_id=sam_id)
    return _exported_sam_runners(backend, {c: TensorRTComponent(p, cuda_graph=False) for c, p in paths.items()})


def make_runners(backend: str, models, engines: Path | None = None, latent_shape=None,
                 capture: bool = False) -> DiffusionRunners:
    """The runners of `backend` for `models` (already on their device and dtype).

    `capture`: the run reads attention maps, so an exported backend loads unet-capture too.
    """
    if backend == "torch":
        return torch_runners(models)
    if backend == "compile":
        return compile_runners(models)
    if backend in EXPORTED_BACKENDS:
        if engines is None:
            raise UsageError(f"--backend {backend} needs --engines DIR, written by magicseg-engine build-engines"
                             + (" --format tensorrt" if backend == "tensorrt" else ""))
        if backend == "onnxruntime":
            return onnxruntime_runners(models, engines, latent_shape, capture)
        return tensorrt_runners(models, engines, latent_shape, capture)
    raise UsageError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def attention_kernels(choice: str):
    """A context in which scaled_dot_product_attention uses only the `choice` kernel."""
    if choice == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[choice])


def _attention_shapes(unet) -> set[tuple[int, int]]:
    """(heads, head size) of every attention layer of the UNet."""
    from diffusers.models.attention_processor import Attention

    return {(m.heads, m.inner_dim // m.heads) for m in unet.modules() if isinstance(m, Attention)}


def with_attention_kernel(runners: DiffusionRunners, models, choice: str) -> DiffusionRunners:
    """`runners` whose UNet calls use only the `choice` attention kernel; only the UNet, since the
    VAE's single wide head (512 in SD 1.x) is beyond what the fused kernels take.

    The kernel is tried first on every head shape of the UNet in its dtype and device, so a
    choice the machine lacks is a usage error before any work, not a failure mid-run.
    """
    if choice not in ATTENTION_KERNELS:
        raise UsageError(f"unknown attention kernel {choice!r}; choose one of: {', '.join(ATTENTION_KERNELS)}")
    if choice == "auto":
        return runners
    if runners.backend not in ("torch", "compile"):
        raise UsageError(f"--attention {choice} holds torch's attention to one kernel, and --backend "
                         f"{runners.backend} does not run torch's attention; use --attention auto")
    param = next(models.unet.parameters())
    for heads, size in sorted(_attention_shapes(models.unet)):
        q = torch.zeros(1, heads, 64, size, device=param.device, dtype=param.dtype)
        try:
            with attention_kernels(choice):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
        except RuntimeError:
            raise UsageError(f"--attention {choice}: torch has no {choice} attention kernel for {size}-wide heads "
                             f"in {param.dtype} on {param.device}; use --attention auto") from None
    predict = runners.predict_noise

    def predict_noise(x, t, ctx, added=None):
        with attention_kernels(choice):
            return predict(x, t, ctx, added)

    return dataclasses.replace(runners, predict_noise=predict_noise)

"""ONNX exports of the five networks, for ONNX Runtime and TensorRT.

One file per component, each with a dynamic batch dimension (for the mask decoder: the
number of prompts):

==================  ==================================================  ===================================
component           inputs                                              outputs
==================  ==================================================  ===================================
text-encoder        input_ids [batch, L] int64                          last_hidden_state [batch, L, D]
unet                sample [batch, 4, h, w],                            noise_pred [batch, 4, h, w]
                    timestep [batch] float32,
                    encoder_hidden_states [batch, L, D]
vae-decoder         latents [batch, 4, h, w] (as the sampler ends)      image [batch, 3, 8h, 8w] in [-1, 1]
sam-image-encoder   images [batch, 3, S, S] (after Sam.preprocess)      image_embeddings [batch, C, e, e]
sam-mask-decoder    image_embeddings [images, C, e, e],                 masks [prompts, 3, 4e, 4e],
                    sparse_prompt_embeddings [prompts, tokens, C],      iou_predictions [prompts, 3]
                    dense_prompt_embeddings [prompts, C, e, e]
==================  ==================================================  ===================================

Choices, and why:

* Exporter: the TorchScript-based one (``torch.onnx.export(..., dynamo=False)``). The
  torch.export-based exporter, torch's default since 2.9, needs the ``onnxscript`` package,
  which is no dependency of this project; the TorchScript one traces all five networks
  here (diffusers' UNet and VAE, transformers' CLIP, SAM's ViT and two-way transformer) with
  ORT matching torch to float32 rounding at every batch size. It is deprecated upstream;
  moving to the dynamo exporter means adding onnxscript and re-running the parity tests.
  Tracing fixes everything but the declared dynamic axes, so spatial sizes are static (a
  UNet exported for 64x64 latents runs 64x64 latents only); pass ``latent_size`` for others.
* Timesteps are one float32 per row whatever the precision, as diffusers computes the
  sinusoidal embedding in float32 before casting to the model's dtype.
* The VAE decoder includes the division by ``vae.config.scaling_factor``: it replaces
  ``vae.decode(latents / scaling_factor).sample`` whole, and the factor travels in the file
  instead of in every caller. Its output is the VAE's own, in [-1, 1], not yet uint8.
* The SAM mask decoder is SAM's ``MaskDecoder.predict_masks`` with its three multimask
  outputs (what ``SamRefiner`` uses), the dense positional encoding baked in, and the image
  embedding broadcast instead of repeated: ``images`` is 1 (one image shared by every
  prompt) or ``prompts`` (one image row per prompt, so prompts of several images decode in
  one call). Prompts of one call must have the same number of ``tokens``. Its TensorRT engine
  serves the calls ``SamRefiner`` makes, one image per call, with ``prompts`` and ``tokens``
  ranged (``engine.build.sam_decoder_dims``); onnxruntime runs either form.
* Graph clean-up uses onnx's own library plus a small pass written here: the exporter's
  constant folding, then Identity removal, folding of the remaining all-constant nodes
  (evaluated with ``onnx.reference``, only where the result is small, so weights are never
  duplicated), folding of Shape nodes (and Gather/Slice on them) that read static dimensions,
  Constant nodes as initializers, dead-node and unused-initializer removal, and
  finally ``onnx.shape_inference`` (strict, with data propagation) to annotate every tensor.
  ONNX Runtime's offline optimisation was rejected: the file it writes is tied to the
  provider that made it (on the CPU provider it wraps half-precision nodes in float32 Casts,
  and it declares Microsoft-only opset domains), which is wrong for a file meant
  for the CUDA and TensorRT providers.
* Precision: fp16 and bf16 exports trace the network cast to that dtype on a CUDA device;
  without one they are refused (ORT's CPU provider has no half-precision convolutions to
  check them with) rather than written as float32 under a half-precision name. TensorRT
  can still build an fp16 engine from the fp32 file (``--fp16``).
* Files: ``{component}.onnx``, plus ``{component}.onnx.data`` holding the weights when they
  pass 2 GB (protobuf's limit; SD 1.5's UNet in fp32 is 3.4 GB), written under a temporary
  name and renamed into place. The file records its component and precision as metadata,
  so ``load_exported`` gives back the same ``ExportedModel``.

Attention capture: ``export_component("unet", models, out_dir, capture_layers=capture.layers)``
(the name -> factor dict of an ``AttentionCapture``) writes ``unet-capture.onnx``, the UNet
with the capture's class-attention maps as extra outputs, next to the plain ``unet.onnx``:

==================  ==================================================  ===================================
component           inputs                                              outputs
==================  ==================================================  ===================================
unet-capture        the unet's three inputs, plus                       noise_pred [batch, 4, h, w],
                    query_rows [rows] int64,                            maps_f{factor} [rows, classes, N]
                    key_rows [rows] int64,                              float32, one per captured factor
                    token_index [rows, classes, tokens] int64           (ascending), N = (h/f)*(w/f)
==================  ==================================================  ===================================

Map row r reads the queries of batch row ``query_rows[r]`` against the keys of batch row
``key_rows[r]`` (AttentionCapture's positive rows read positive queries and keys, its
negative rows negative queries and the positive keys); ``token_index[r, c]`` lists class
c's token positions, -1 padding. ``maps_f{factor}`` is, for this one UNet call, the sum over
the captured layers at that factor of the head-averaged class attention, the same quantity
as ``class_attention_reference``; accumulating over steps and upsampling is the caller's.
The noise prediction is the plain UNet's. The file records its layers as metadata
(``magicseg.capture_layers``, JSON name -> factor).

SDXL (a UNet whose ``addition_embed_type`` is ``text_time``, two text encoders) changes two
files; the others are as above:

==================  ==================================================  ===================================
component           inputs                                              outputs
==================  ==================================================  ===================================
text-encoder        input_ids [batch, 2, L] int64 (one row per          encoder_hidden_states [batch, L, D1+D2],
                    tokenizer, as DiffusionModels.tokenize gives)       text_embeds [batch, P]
unet, unet-capture  as above, plus text_embeds [batch, P] and           as above
                    time_ids [batch, 6] (the sampler's dtype)
==================  ==================================================  ===================================

The SDXL text encoder is both encoders in one graph, computing what ``text_conditioning``
computes (both penultimate hidden states side by side, the second encoder's projected pooled
embedding), so a runtime makes one call per prompt batch as it does for SD 1.x/2.x. Its
outputs are named for the UNet inputs they feed. SDXL's VAE overflows in float16
(``force_upcast``), so build-engines exports and builds its decoder in fp32 whatever the
precision asked for (``component_precision``).

Not exported: the SAM prompt encoder (points and boxes are embedded in torch; it is a few
small ops).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from magicseg_engine.atomic import fsync_dir, check_writable_dir
from magicseg_engine.errors import UsageError
from magicseg_engine.safe_files import sha256_files

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from magicseg_engine.generate.models import DiffusionModels

COMPONENTS = ("text-encoder", "unet", "vae-decoder", "sam-image-encoder", "sam-mask-decoder")
DIFFUSION_COMPONENTS = COMPONENTS[:3]
SAM_COMPONENTS = COMPONENTS[3:]
# The UNet with attention-capture outputs: a variant of "unet" (export_component("unet", ...,
# capture_layers=...)), named apart in its file and metadata.
CAPTURE_COMPONENT = "unet-capture"
CAPTURE_INPUTS = ("query_rows", "key_rows", "token_index")
PRECISIONS = ("fp32", "fp16", "bf16")
# The TorchScript exporter writes opsets up to 20; 17 is the first with LayerNormalization.
MIN_OPSET, MAX_OPSET = 17, 20

# protobuf cannot serialise a message of 2 GiB or more; the graph itself needs some room too.
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_META_PREFIX = "magicseg."
_SEED = 0


class ExportError(UsageError):
    """An exported file is missing, altered since export, or not a valid ONNX model."""


@dataclass(frozen=True)
class ExportedModel:
    """One exported file and what a runtime needs to know to feed it.

    Shapes give each dimension as an int, or as the name of a dynamic one ("batch").
    `sha256` is the digest of the .onnx file, followed by its .onnx.data file when the
    weights are stored externally (`external_data`).
    """

    component: str
    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_shapes: dict[str, tuple[int | str, ...]]
    precision: str
    opset: int
    sha256: str
    external_data: bool
    output_shapes: dict[str, tuple[int | str, ...]] = field(default_factory=dict)
    # numpy dtype names ("float32", "int64", ...), per input and output.
    dtypes: dict[str, str] = field(default_factory=dict)
    # unet-capture only: the captured cross-attention modules, name -> factor.
    capture_layers: dict[str, int] = field(default_factory=dict)

    @property
    def data_path(self) -> Path:
        return self.path.with_name(self.path.name + ".data")


# --- the networks as exported -------------------------------------------------------------


class _TextEncoder(torch.nn.Module):
    """One text encoder's last hidden state; with SDXL's second encoder, both as the sampler reads them."""

    def __init__(self, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder_2 is None:
            return self.text_encoder(input_ids=input_ids, return_dict=False)[0]
        from magicseg_engine.engine.backends import text_conditioning

        return text_conditioning(self.text_encoder, self.text_encoder_2, input_ids)


def _added(text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
    return None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}


class _UNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=_added(text_embeds, time_ids), return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]


class _SamImageEncoder(torch.nn.Module):
    def __init__(self, image_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # forward(), not __call__: build_sam's dtype-casting hooks would put float32 casts
        # around a half-precision graph.
        return self.image_encoder.forward(images)


class _SamMaskDecoder(torch.nn.Module):
    """SAM's MaskDecoder.predict_masks, multimask outputs only, image rows broadcast to prompts."""

    def __init__(self, sam: torch.nn.Module) -> None:
        super().__init__()
        self.mask_decoder = sam.mask_decoder
        dtype = next(sam.mask_decoder.parameters()).dtype
        with torch.no_grad():
            # Computed in float32: the prompt encoder's Fourier features are written for it.
            image_pe = sam.prompt_encoder.get_dense_pe()
        self.register_buffer("image_pe", image_pe.to(dtype), persistent=False)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dec = self.mask_decoder
        prompts = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(prompts, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        src = image_embeddings + dense_prompt_embeddings
        pos_src = self.image_pe.expand(prompts, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = dec.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + dec.num_mask_tokens, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = dec.output_upscaling(src)
        # Token 0 is the single-mask output; 1.. are the multimask ones SamRefiner asks for.
        hyper_in = torch.stack(
            [dec.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(1, dec.num_mask_tokens)],
            dim=1,
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, dec.num_mask_tokens - 1, h, w)
        iou_pred = dec.iou_prediction_head(iou_token_out)[:, 1:]
        return masks, iou_pred


class _ExportCaptureProcessor:
    """Stands in for a cross-attention processor while the capture variant is traced.

    Returns what the processor it replaced returns; also adds the layer's class attention
    (the math of ``class_attention_reference``, in plain torch ops) to its owner's sum for
    the layer's factor.
    """

    def __init__(self, owner: _UNetCapture, original: Any, factor: int) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.owner = owner
        self.original = original
        self.factor = factor
        self._inline = type(original) is AttnProcessor2_0

    # Parameter names as AttnProcessor2_0's: Attention.forward drops keywords a processor does not name.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        from magicseg_engine.generate.attention import _project, _sdpa_attention

        if encoder_hidden_states is None:
            return self._call_original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        if self._inline and not kwargs:
            out, query, key = _sdpa_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            # SDPA's own scale, which ignores attn.scale.
            scale = float(query.shape[-1]) ** -0.5
        else:
            out = self._call_original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
            query, key = _project(attn, hidden_states, encoder_hidden_states, temb)
            scale = float(attn.scale)
        self.owner._record(self.factor, query, key, scale)
        return out

    def _call_original(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs):
        if temb is not None:
            kwargs = {**kwargs, "temb": temb}
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)


def _class_attention(q: torch.Tensor, k: torch.Tensor, token_index: torch.Tensor, scale: float) -> torch.Tensor:
    """[R, C, N] float32, as class_attention_reference, in ops that export with R, C, T dynamic.

    The class gather is a [R, C, L] count matrix (how often each key appears among a class's
    positions; -1 matches none) multiplied with the head-averaged probabilities.
    """
    probs = torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, dim=-1).mean(dim=1)
    keys = torch.arange(k.shape[2], device=k.device, dtype=token_index.dtype)
    select = (token_index.unsqueeze(-1) == keys).to(probs.dtype).sum(dim=2)  # [R, C, L]
    return torch.matmul(select, probs.transpose(1, 2))  # [R, C, N]


class _UNetCapture(torch.nn.Module):
    """The UNet plus, per captured factor, the sum of its layers' class attention for one call."""

    def __init__(self, unet: torch.nn.Module, layers: Mapping[str, int]) -> None:
        super().__init__()
        self.unet = unet
        self.layers = dict(layers)
        self.factors = tuple(sorted(set(self.layers.values())))
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._sums: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The export processors on the captured layers inside; the originals back on exit."""
        modules = dict(self.unet.named_modules())
        originals = {name: modules[name].processor for name in self.layers}
        try:
            for name, factor in self.layers.items():
                modules[name].set_processor(_ExportCaptureProcessor(self, originals[name], factor))
            yield
        finally:
            for name, processor in originals.items():
                modules[name].set_processor(processor)

    def _record(self, factor: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        query_rows, key_rows, token_index = self._rows
        maps = _class_attention(query.index_select(0, query_rows), key.index_select(0, key_rows), token_index, scale)
        previous = self._sums.get(factor)
        self._sums[factor] = maps if previous is None else previous + maps

    # The added conditions come last, after the capture's inputs, so that SD 1.x/2.x files keep their inputs' order.
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                query_rows: torch.Tensor, key_rows: torch.Tensor, token_index: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        self._rows = (query_rows, key_rows, token_index)
        self._sums = {}
        try:
            noise = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=_added(text_embeds, time_ids), return_dict=False)[0]
            sums = dict(self._sums)
        finally:
            self._rows = None
            self._sums = {}
        missing = [f for f in self.factors if f not in sums]
        if missing:
            raise RuntimeError(f"no captured layer ran at factor(s) {missing}: are they cross-attention layers?")
        return (noise, *(sums[f] for f in self.factors))


def _capture_spec(factors: Sequence[int], unet: torch.nn.Module) -> _Spec:
    base = _SPECS["unet"]
    added = ADDED_CONDITION_INPUTS if takes_added_conditions(unet) else ()
    outputs = tuple(f"maps_f{f}" for f in factors)
    dynamic = dict(base.dynamic)
    dynamic.update({"query_rows": {0: "rows"}, "key_rows": {0: "rows"},
                    "token_index": {0: "rows", 1: "classes", 2: "tokens"}})
    dynamic.update({name: {0: "batch"} for name in added})
    dynamic.update({name: {0: "rows", 1: "classes"} for name in outputs})
    return _Spec(base.inputs + CAPTURE_INPUTS + added, base.outputs + outputs, dynamic)


def _check_capture_layers(net: torch.nn.Module, capture_layers: Mapping[str, int]) -> dict[str, int]:
    from magicseg_engine.generate.attention import cross_attention_layers

    layers = {str(n): int(f) for n, f in dict(capture_layers).items()}
    if not layers:
        raise UsageError("capture_layers is empty; pass AttentionCapture(...).layers")
    available = cross_attention_layers(net)
    unknown = sorted(set(layers) - set(available))
    if unknown:
        raise UsageError(f"not cross-attention modules of this UNet: {', '.join(unknown)}")
    wrong = sorted(n for n, f in layers.items() if available[n] != f)
    if wrong:
        raise UsageError(f"capture_layers gives factors other than the UNet's for {', '.join(wrong)}")
    return layers


def capture_callable(module_or_models: Any, capture_layers: Mapping[str, int]) -> Callable[..., Any]:
    """The torch computation unet-capture is exported from, inputs in the export's order.

    Use it as ``with f.installed(): f(*inputs)``: outside, the captured layers keep their
    processors and nothing is recorded.
    """
    net = _network("unet", module_or_models)
    wrapper = _UNetCapture(net, _check_capture_layers(net, capture_layers))
    wrapper.eval()
    return wrapper


@dataclass(frozen=True)
class _Spec:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]


_SPECS: dict[str, _Spec] = {
    "text-encoder": _Spec(
        ("input_ids",), ("last_hidden_state",),
        {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}},
    ),
    "unet": _Spec(
        ("sample", "timestep", "encoder_hidden_states"), ("noise_pred",),
        {"sample": {0: "batch"}, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
         "noise_pred": {0: "batch"}},
    ),
    "vae-decoder": _Spec(("latents",), ("image",), {"latents": {0: "batch"}, "image": {0: "batch"}}),
    "sam-image-encoder": _Spec(
        ("images",), ("image_embeddings",), {"images": {0: "batch"}, "image_embeddings": {0: "batch"}},
    ),
    "sam-mask-decoder": _Spec(
        ("image_embeddings", "sparse_prompt_embeddings", "dense_prompt_embeddings"), ("masks", "iou_predictions"),
        {"image_embeddings": {0: "images"}, "sparse_prompt_embeddings": {0: "prompts", 1: "tokens"},
         "dense_prompt_embeddings": {0: "prompts"}, "masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}},
    ),
}


# SDXL's UNet inputs beyond SD's three: the pooled text embedding and the six size numbers.
ADDED_CONDITION_INPUTS = ("text_embeds", "time_ids")
TIME_IDS = 6


def takes_added_conditions(unet: torch.nn.Module) -> bool:
    """Whether the UNet takes SDXL's added conditions; UsageError for added conditions of other kinds."""
    config = getattr(unet, "config", None)
    kind = config.get("addition_embed_type") if hasattr(config, "get") else None
    if kind not in (None, "text_time"):
        raise UsageError(f"the UNet's added conditioning {kind!r} is not exported; SD 1.x, SD 2.x and SDXL "
                         "(text_time) are")
    return kind == "text_time"


def _spec(component: str, wrapper: torch.nn.Module) -> _Spec:
    """The inputs, outputs and dynamic axes of `component` exported from `wrapper` (as _wrap gives it)."""
    spec = _SPECS[component]
    if component == "unet" and takes_added_conditions(wrapper.unet):
        return _Spec(spec.inputs + ADDED_CONDITION_INPUTS, spec.outputs,
                     {**spec.dynamic, **{name: {0: "batch"} for name in ADDED_CONDITION_INPUTS}})
    if component == "text-encoder" and wrapper.text_encoder_2 is not None:
        outputs = ("encoder_hidden_states", "text_embeds")
        return _Spec(spec.inputs, outputs, {"input_ids": {0: "batch"}, **{name: {0: "batch"} for name in outputs}})
    return spec


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise UsageError(f"unknown component {component!r}; choose one of: {', '.join(COMPONENTS)}")


def _network(component: str, module_or_models: Any) -> torch.nn.Module:
    """The torch module a component is exported from: picked out of DiffusionModels or a Sam."""
    obj = module_or_models
    if component in DIFFUSION_COMPONENTS:
        attr = {"text-encoder": "text_encoder", "unet": "unet", "vae-decoder": "vae"}[component]
        net = getattr(obj, attr, obj) if not isinstance(obj, torch.nn.Module) else obj
        expected = {"text-encoder": "max_position_embeddings", "unet": "cross_attention_dim",
                    "vae-decoder": "scaling_factor"}[component]
        if not isinstance(net, torch.nn.Module) or not hasattr(getattr(net, "config", None), expected):
            raise TypeError(f"{component} is exported from DiffusionModels or its {attr} module, "
                            f"not {type(obj).__name__}")
        return net
    if component == "sam-image-encoder":
        net = getattr(obj, "image_encoder", obj)
        if not isinstance(net, torch.nn.Module) or not hasattr(net, "patch_embed"):
            raise TypeError(f"sam-image-encoder is exported from a Sam or its image encoder, not {type(obj).__name__}")
        return net
    if not (isinstance(obj, torch.nn.Module) and hasattr(obj, "mask_decoder") and hasattr(obj, "prompt_encoder")):
        raise TypeError(f"sam-mask-decoder is exported from a Sam (it needs the prompt encoder's "
                        f"positional encoding), not {type(obj).__name__}")
    return obj


def _second_text_encoder(module_or_models: Any) -> torch.nn.Module | None:
    """SDXL's second text encoder, where `module_or_models` is DiffusionModels that have one."""
    return None if isinstance(module_or_models, torch.nn.Module) else getattr(module_or_models, "text_encoder_2", None)


def _wrap(component: str, module_or_models: Any) -> torch.nn.Module:
    """The module whose forward is the exported graph, over the caller's own networks."""
    net = _network(component, module_or_models)
    if component == "text-encoder":
        return _TextEncoder(net, _second_text_encoder(module_or_models))
    return {
        "unet": _UNet, "vae-decoder": _VaeDecoder,
        "sam-image-encoder": _SamImageEncoder, "sam-mask-decoder": _SamMaskDecoder,
    }[component](net)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside, as each was after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _param(net: torch.nn.Module, component: str) -> torch.nn.Parameter:
    if component == "sam-mask-decoder":
        net = net.mask_decoder
    return next(net.parameters())


def _target(precision: str, current: torch.device) -> tuple[torch.dtype, torch.device]:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    dtype = _DTYPES[precision]
    if dtype is torch.float32:
        return dtype, current
    if not torch.cuda.is_available():
        raise UsageError(
            f"{precision} export needs a CUDA device and none is visible: the network is traced in "
            f"{precision} on the GPU, and ONNX Runtime's CPU provider has no half-precision convolutions "
            "to check the file with; export fp32 here (TensorRT builds fp16 engines from it with --fp16)"
        )
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError("bf16 export needs a GPU with bfloat16 support; export fp16 or fp32 instead")
    return dtype, current if current.type == "cuda" else torch.device("cuda")


def _prepared(component: str, module_or_models: Any, precision: str) -> torch.nn.Module:
    """The component's wrapper, on the export device in the export dtype; the caller's models untouched."""
    wrapper = _wrap(component, module_or_models)
    p = next(wrapper.parameters())
    dtype, device = _target(precision, p.device)
    if (p.dtype, p.device) != (dtype, device):
        # A copy of the wrapper (just the network exported), so the caller's models keep
        # their dtype and device.
        wrapper = torch.nn.Module.to(copy.deepcopy(wrapper), device=device, dtype=dtype)
    return wrapper


def _check_processors(component: str, net: torch.nn.Module) -> None:
    if component != "unet":
        return
    for name, module in net.named_modules():
        processor = getattr(module, "processor", None)
        if type(processor).__name__ == "_CapturingProcessor":
            raise UsageError(
                f"the UNet has an attention-capture processor installed on {name}; export it outside "
                "AttentionCapture.installed(), the exported graph cannot carry the capture"
            )


# --- example inputs -----------------------------------------------------------------------


def _latent_hw(component: str, net: torch.nn.Module, latent_size: int | Sequence[int] | None) -> tuple[int, int]:
    if latent_size is not None:
        hw = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
            raise UsageError(f"latent_size must be a positive int or (height, width), got {latent_size!r}")
        return hw  # type: ignore[return-value]
    if component == "unet":
        size = net.config.sample_size
    else:
        # The VAE's sample_size is in pixels; its latents are 2**(blocks-1) times smaller.
        size = net.config.sample_size // 2 ** (len(net.config.block_out_channels) - 1)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def sample_inputs(
    component: str,
    module_or_models: Any,
    batch: int,
    *,
    latent_size: int | Sequence[int] | None = None,
    seed: int = _SEED,
) -> dict[str, torch.Tensor]:
    """Example inputs of `component`, named as the exported graph names them, `batch` rows each.

    Drawn from `seed` alone, on the module's device and in its dtype (timesteps float32,
    token ids int64). For the mask decoder `batch` is the number of prompts (one point and a
    box each, embedded by SAM's own prompt encoder) on one shared image embedding.
    `latent_size` (UNet and VAE decoder) defaults to the size the model was trained at.
    """
    _check_component(component)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    net = _network(component, module_or_models)
    p = _param(net, component)
    device, dtype = p.device, p.dtype
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device, dtype)

    if component == "text-encoder":
        cfg = net.config
        second = _second_text_encoder(module_or_models)
        if second is None:
            ids = torch.randint(0, cfg.vocab_size, (batch, cfg.max_position_embeddings), generator=gen)
        else:
            vocab = min(cfg.vocab_size, second.config.vocab_size)
            ids = torch.randint(0, vocab, (batch, 2, cfg.max_position_embeddings), generator=gen)
        return {"input_ids": ids.to(device)}
    if component == "unet":
        h, w = _latent_hw(component, net, latent_size)
        cross = net.config.cross_attention_dim
        cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
        steps = int(getattr(net.config, "num_train_timesteps", None) or 1000)
        inputs = {
            "sample": randn(batch, net.config.in_channels, h, w),
            "timestep": torch.randint(0, steps, (batch,), generator=gen).float().to(device),
            "encoder_hidden_states": randn(batch, _context_length(module_or_models), cross),
        }
        if takes_added_conditions(net):
            cfg = net.config
            pooled = cfg.projection_class_embeddings_input_dim - TIME_IDS * cfg.addition_time_embed_dim
            # As the sampler gives them: original size, crop corner (0, 0), target size, in pixels
            # (of SD's 8x VAE; the UNet alone does not know its VAE).
            size = torch.tensor([8 * h, 8 * w], dtype=torch.float32)
            time_ids = torch.cat([size, torch.zeros(2), size]).expand(batch, TIME_IDS)
            inputs.update(text_embeds=randn(batch, pooled), time_ids=time_ids.to(device, dtype))
        return inputs
    if component == "vae-decoder":
        h, w = _latent_hw(component, net, latent_size)
        return {"latents": randn(batch, net.config.latent_channels, h, w)}
    if component == "sam-image-encoder":
        size = net.img_size
        return {"images": randn(batch, 3, size, size)}
    # sam-mask-decoder
    prompt_encoder = net.prompt_encoder
    size = prompt_encoder.input_image_size[0]
    h, w = prompt_encoder.image_embedding_size
    pe_device = next(prompt_encoder.parameters()).device
    corners = torch.rand((batch, 2, 2), generator=gen) * size
    boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    points = (corners.mean(dim=1, keepdim=True), torch.ones((batch, 1), dtype=torch.int))
    with torch.no_grad():
        sparse, dense = prompt_encoder(
            points=(points[0].to(pe_device), points[1].to(pe_device)), boxes=boxes.to(pe_device), masks=None
        )
    return {
        "image_embeddings": randn(1, prompt_encoder.embed_dim, h, w),
        "sparse_prompt_embeddings": sparse.to(device, dtype),
        "dense_prompt_embeddings": dense.to(device, dtype),
    }


def _context_length(module_or_models: Any) -> int:
    # The UNet alone does not know the text length; SD's is 77.
    text_encoder = getattr(module_or_models, "text_encoder", None)
    return int(text_encoder.config.max_position_embeddings) if text_encoder is not None else 77


# --- graph clean-up -----------------------------------------------------------------------

# Never folded: their value is not a function of their inputs.
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
# A folded tensor must stay this small, so that folding never stores a transformed copy of a weight.
_FOLD_MAX_ELEMENTS = 1 << 16


def _clean_graph(model: onnx.ModelProto) -> None:
    """Identity removal, folding of small constant and static-shape values, dead-node removal.

    Besides nodes whose inputs are all constants, Shape nodes fold where the dimensions they
    read are static, and so do Gather and Slice on such shapes with constant indices: with
    only the batch dynamic, most of the shape arithmetic a tracer records becomes constant.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    shapes = _inferred_shapes(model)
    small: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= _FOLD_MAX_ELEMENTS:
            small[init.name] = numpy_helper.to_array(init)
    # Outputs of Shape (and of Gather/Slice on them) whose values are partly known: None = dynamic.
    partial: dict[str, list[int | None]] = {}

    alias: dict[str, str] = {}
    kept: list[onnx.NodeProto] = []
    folded_values: dict[str, np.ndarray] = {}

    def fold(node: onnx.NodeProto, values: Sequence[np.ndarray]) -> None:
        for name, value in zip(node.output, values):
            small[name] = value
            folded_values[name] = value

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        standard = node.domain in ("", "ai.onnx")
        produces_output = any(o in graph_outputs for o in node.output)
        if standard and node.op_type == "Identity" and not produces_output:
            alias[node.output[0]] = node.input[0]
            continue
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if not standard or has_subgraph or produces_output or node.op_type in _NONDETERMINISTIC:
            kept.append(node)
            continue
        inputs = [n for n in node.input if n]
        if all(n in small for n in inputs):
            values = _evaluate(node, small, opset)
            if values is not None and all(v.size <= _FOLD_MAX_ELEMENTS for v in values):
                fold(node, values)
                continue
        dims = _shape_values(node, shapes, partial, small)
        if dims is not None:
            if all(d is not None for d in dims):
                fold(node, [np.asarray(dims, dtype=np.int64).reshape(_gather_shape(node, small))])
                continue
            partial[node.output[0]] = dims
        kept.append(node)

    # Live nodes: those a graph output depends on.
    needed = set(graph_outputs)
    live: list[onnx.NodeProto] = []
    for node in reversed(kept):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(n for n in node.input if n)
    live.reverse()

    # In place: rebuilding the list would copy every weight (protobuf copies on extend).
    existing = set()
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in needed:
            existing.add(graph.initializer[i].name)
        else:
            del graph.initializer[i]
    graph.initializer.extend(
        numpy_helper.from_array(value, name)
        for name, value in folded_values.items()
        if name in needed and name not in existing
    )
    del graph.node[:]
    graph.node.extend(live)
    # Shapes are inferred again after saving; stale entries would only contradict them.
    del graph.value_info[:]


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every tensor's inferred dimensions (None where dynamic or unknown).

    Inferred on a copy whose large weights are declared as inputs of their shape, without
    their data: shapes never depend on them, and the copy stays far below protobuf's 2 GB.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    big = [t for t in graph.initializer if int(np.prod(t.dims, dtype=np.int64)) > _FOLD_MAX_ELEMENTS]
    big_names = {t.name for t in big}
    skeleton = helper.make_model(
        helper.make_graph(
            list(graph.node),
            graph.name,
            list(graph.input) + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big],
            list(graph.output),
            [t for t in graph.initializer if t.name not in big_names],
        ),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
    )
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:
        # Without shapes only the all-constant nodes fold.
        return {}
    shapes: dict[str, list[int | None]] = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = [int(d.dim_value) if d.HasField("dim_value") else None
                                  for d in tensor_type.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    return shapes


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _shape_values(
    node: onnx.NodeProto,
    shapes: Mapping[str, list[int | None]],
    partial: Mapping[str, list[int | None]],
    constants: Mapping[str, np.ndarray],
) -> list[int | None] | None:
    """The (partly) known int64 values of a Shape, or of a Gather/Slice of one; None if not such a node."""
    if node.op_type == "Shape":
        dims = shapes.get(node.input[0])
        if dims is None:
            return None
        rank = len(dims)
        start, end = _attr(node, "start", 0), _attr(node, "end", rank)
        return list(dims[slice(*(max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end)))])
    if not node.input or node.input[0] not in partial:
        return None
    dims = partial[node.input[0]]
    if node.op_type == "Gather" and _attr(node, "axis", 0) == 0 and node.input[1] in constants:
        indices = constants[node.input[1]].astype(np.int64).reshape(-1)
        if not all(-len(dims) <= i < len(dims) for i in indices):
            return None
        return [dims[int(i)] for i in indices]
    if node.op_type == "Slice" and all(n in constants for n in node.input[1:] if n):
        names = list(node.input) + [""] * (5 - len(node.input))
        starts, ends = (constants[n].astype(np.int64).reshape(-1) for n in names[1:3])
        axes = constants[names[3]].reshape(-1) if names[3] else np.array([0])
        steps = constants[names[4]].astype(np.int64).reshape(-1) if names[4] else np.array([1])
        if len(starts) != 1 or list(axes) not in ([0], [-1]):
            return None
        return list(dims[slice(int(starts[0]), int(min(ends[0], 2**62)), int(steps[0]))])
    return None


def _gather_shape(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    """The shape of a folded shape value: a Gather's indices shape (scalar index: a scalar), else 1-D."""
    if node.op_type == "Gather":
        return tuple(constants[node.input[1]].shape)
    return (-1,)


def _evaluate(node: onnx.NodeProto, values: Mapping[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    try:
        if node.op_type == "Constant":
            evaluator = ReferenceEvaluator(
                helper.make_model(
                    helper.make_graph([node], "c", [], [helper.make_empty_tensor_value_info(node.output[0])]),
                    opset_imports=[helper.make_opsetid("", opset)],
                )
            )
            return [np.asarray(v) for v in evaluator.run(None, {})]
        evaluator = ReferenceEvaluator(node, opsets={"": opset})
        feeds = {n: values[n] for n in node.input if n}
        return [np.asarray(v) for v in evaluator.run(None, feeds)]
    except Exception:
        # Anything the reference runtime cannot evaluate stays in the graph as it is.
        return None


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            total += t.ByteSize()
    return total


# --- files --------------------------------------------------------------------------------


def _sha256(paths: Iterable[Path]) -> str:
    # Files just written: always hashed. Loading goes through safe_files.sha256_files, which
    # hashes a big file once per process.
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dims(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return tuple(dims)


def _dtype_name(value: onnx.ValueInfoProto) -> str:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name


def _describe(path: Path, model: onnx.ModelProto, sha256: str, external: bool) -> ExportedModel:
    meta = {p.key: p.value for p in model.metadata_props}
    component = meta.get(_META_PREFIX + "component")
    precision = meta.get(_META_PREFIX + "precision")
    if component not in COMPONENTS + (CAPTURE_COMPONENT,) or precision not in PRECISIONS:
        raise ExportError(f"{path} was not written by this exporter: it does not name its component and precision")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    values = list(model.graph.input) + list(model.graph.output)
    return ExportedModel(
        component=component,
        path=path,
        input_names=tuple(v.name for v in model.graph.input),
        output_names=tuple(v.name for v in model.graph.output),
        input_shapes={v.name: _dims(v) for v in model.graph.input},
        precision=precision,
        opset=int(opset),
        sha256=sha256,
        external_data=external,
        output_shapes={v.name: _dims(v) for v in model.graph.output},
        dtypes={v.name: _dtype_name(v) for v in values},
        capture_layers={str(k): int(v) for k, v in json.loads(meta.get(_META_PREFIX + "capture_layers", "{}")).items()},
    )


def load_exported(path: str | Path) -> ExportedModel:
    """The ExportedModel of a file `export_component` wrote (its digest recomputed)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported model {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise ExportError(f"{path} is not an ONNX model ({type(err).__name__}); re-export it") from None
    external = any(uses_external_data(t) for t in model.graph.initializer)
    data = path.with_name(path.name + ".data")
    if external and not data.is_file():
        raise ExportError(f"{path} keeps its weights in {data.name}, which is missing; re-export it")
    return _describe(path, model, sha256_files([path, data] if external else [path]), external)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    with warnings.catch_warnings():
        # Tracing warns at every Python branch on a shape (all fixed here but the batch, which
        # no branch reads), and torch warns that the TorchScript exporter is deprecated.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        # CLIP's pooled output picks each row's end token by argmax, an index never negative.
        warnings.filterwarnings("ignore", message=r"Exporting aten::index operator of advanced indexing.*")
        yield


def export_component(
    component: str,
    module_or_models: Any,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    opset: int = 18,
    latent_size: int | Sequence[int] | None = None,
    external_data: bool | None = None,
    capture_layers: Mapping[str, int] | None = None,
) -> ExportedModel:
    """Export `component` of `module_or_models` to `out_dir/{component}.onnx`, checked.

    `capture_layers` (unet only; name -> factor, as ``AttentionCapture(...).layers``)
    exports the capture variant instead, to `out_dir/unet-capture.onnx`: the UNet with its
    class-attention maps as extra outputs (see the module docstring).

    `module_or_models` is DiffusionModels (or the one module) for the diffusion components
    and a Sam (or its image encoder, for the encoder) for the SAM ones; it is left as it
    was. `external_data` forces the weights into `{component}.onnx.data` (True) or into the
    .onnx file (False); None decides by size. The file is traced at batch 2 and carries a
    dynamic batch; see the module docstring for inputs, outputs and choices.
    """
    import onnx

    _check_component(component)
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset!r}")
    if latent_size is not None and component not in ("unet", "vae-decoder"):
        raise UsageError(f"latent_size applies to the unet and the vae-decoder, not the {component}")
    out_dir = Path(out_dir)
    check_writable_dir(out_dir)
    _check_processors(component, _network(component, module_or_models))
    layers = None
    if capture_layers is not None:
        if component != "unet":
            raise UsageError(f"capture_layers applies to the unet, not the {component}")
        layers = _check_capture_layers(_network(component, module_or_models), capture_layers)
    wrapper = _prepared(component, module_or_models, precision)
    installed: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if layers is None:
        spec = _spec(component, wrapper)
        name = component
        # Traced at batch 2: at 1 the tracer could take the batch for a broadcastable constant.
        example = _export_inputs(component, module_or_models, wrapper, latent_size)
    else:
        wrapper = _UNetCapture(wrapper.unet, layers)
        installed = wrapper.installed()
        spec = _capture_spec(wrapper.factors, wrapper.unet)
        name = CAPTURE_COMPONENT
        example = _capture_export_inputs(module_or_models, wrapper, latent_size)
    final = out_dir / f"{name}.onnx"
    data_name = final.name + ".data"

    with tempfile.TemporaryDirectory(prefix=f".{final.name}.", suffix=".tmp", dir=out_dir) as tmp:
        tmp_dir = Path(tmp)
        raw = tmp_dir / "raw" / final.name
        raw.parent.mkdir()
        with _quiet_export(), _eval_mode(wrapper), torch.no_grad(), installed:
            torch.onnx.export(
                wrapper,
                tuple(example[name] for name in spec.inputs),
                str(raw),
                dynamo=False,
                export_params=True,
                do_constant_folding=True,
                opset_version=opset,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic,
            )
        example_hw = tuple(example["sample"].shape[-2:]) if layers is not None else None
        del example
        model = onnx.load(str(raw), load_external_data=True)
        shutil.rmtree(raw.parent)
        _clean_graph(model)
        if layers is not None:
            _fix_map_sizes(model, example_hw, wrapper.factors)
        meta = {"component": name, "precision": precision, "exporter": "torch.onnx TorchScript"}
        if layers is not None:
            meta["capture_layers"] = json.dumps(layers, sort_keys=True)
        if component == "vae-decoder":
            meta["vae_scaling_factor"] = repr(wrapper.scaling_factor)
        onnx.helper.set_model_props(model, {_META_PREFIX + k: v for k, v in meta.items()})
        external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data

        staged = tmp_dir / final.name
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        del model
        try:
            # Path-based, so that models past protobuf's 2 GB limit are inferred too.
            onnx.shape_inference.infer_shapes_path(str(staged), str(staged), check_type=True,
                                                   strict_mode=True, data_prop=True)
        except Exception as err:
            raise ExportError(f"shape inference failed on the exported {component}: {_first_line(err)}") from None
        staged_data = tmp_dir / data_name
        files = [staged, staged_data] if external else [staged]
        for f in files:
            _fsync(f)
        sha256 = _sha256(files)
        described = _describe(final, onnx.load(str(staged), load_external_data=False), sha256, external)
        _check(staged, name)
        # Weights first: the .onnx that appears names a data file already in place.
        if external:
            os.replace(staged_data, out_dir / data_name)
        os.replace(staged, final)
        if not external:
            with contextlib.suppress(FileNotFoundError):
                (out_dir / data_name).unlink()
    fsync_dir(out_dir)
    return described


def _export_inputs(
    component: str, module_or_models: Any, wrapper: torch.nn.Module, latent_size: int | Sequence[int] | None
) -> dict[str, torch.Tensor]:
    """Batch-2 example inputs on the wrapper's device, floating ones in its dtype (timesteps float32)."""
    p = next(wrapper.parameters())
    inputs = sample_inputs(component, module_or_models, 2, latent_size=latent_size)
    if component == "sam-mask-decoder":
        # One image row per prompt while tracing; at run time one row broadcasts to all.
        inputs["image_embeddings"] = inputs["image_embeddings"].expand(2, -1, -1, -1).contiguous()
    return {
        name: t.to(p.device, p.dtype) if t.is_floating_point() and name != "timestep" else t.to(p.device)
        for name, t in inputs.items()
    }


def _capture_export_inputs(
    module_or_models: Any, wrapper: _UNetCapture, latent_size: int | Sequence[int] | None
) -> dict[str, torch.Tensor]:
    """The unet's example inputs at batch 4 (one guided pair), read by 3 map rows, 2 classes, 3 tokens.

    Every dynamic size differs from the others and from the static ones, so that the tracer
    cannot take one for another.
    """
    p = next(wrapper.parameters())
    inputs = sample_inputs("unet", module_or_models, 4, latent_size=latent_size)
    inputs = {name: t.to(p.device, p.dtype) if name != "timestep" else t.to(p.device) for name, t in inputs.items()}
    inputs["query_rows"] = torch.tensor([2, 3, 1], dtype=torch.int64, device=p.device)
    inputs["key_rows"] = torch.tensor([2, 2, 0], dtype=torch.int64, device=p.device)
    inputs["token_index"] = torch.tensor(
        [[[1, 2, -1], [4, -1, -1]], [[1, 2, -1], [4, -1, -1]], [[3, -1, -1], [-1, -1, -1]]],
        dtype=torch.int64, device=p.device,
    )
    return inputs


def _fix_map_sizes(model: onnx.ModelProto, latent_hw: Sequence[int], factors: Sequence[int]) -> None:
    """Declare the position count of each maps output: static, but lost by the UNet's -1 reshapes."""
    h, w = latent_hw
    for value in model.graph.output:
        for f in factors:
            if value.name == f"maps_f{f}":
                dim = value.type.tensor_type.shape.dim[2]
                dim.Clear()
                dim.dim_value = -(-h // f) * -(-w // f)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _check(path: Path, component: str) -> None:
    import onnx

    try:
        # Path-based: the checker then follows external data and has no 2 GB limit.
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:
        raise ExportError(f"{path} ({component}) fails the ONNX checker: {_first_line(err)}; re-export it") from None


def export_diffusion(
    models: DiffusionModels,
    out_dir: str | Path,
    components: Sequence[str] = DIFFUSION_COMPONENTS,
    precision: str = "fp32",
    *,
    opset: int = 18,
    latent_size: int | Sequence[int] | None = None,
) -> list[ExportedModel]:
    """Export the text encoder, UNet and VAE decoder (or those of `components`) of `models`."""
    components = _check_subset(components, DIFFUSION_COMPONENTS, "export_diffusion")
    return [
        export_component(c, models, out_dir, precision=precision, opset=opset,
                         latent_size=latent_size if c != "text-encoder" else None)
        for c in components
    ]


def export_sam(
    sam: Any,
    out_dir: str | Path,
    components: Sequence[str] = SAM_COMPONENTS,
    precision: str = "fp32",
    *,
    opset: int = 18,
) -> list[ExportedModel]:
    """Export SAM's image encoder and mask decoder (or those of `components`)."""
    components = _check_subset(components, SAM_COMPONENTS, "export_sam")
    return [export_component(c, sam, out_dir, precision=precision, opset=opset) for c in components]


def _check_subset(components: Sequence[str] | str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    components = (components,) if isinstance(components, str) else tuple(components)
    wrong = [c for c in components if c not in allowed]
    if wrong or not components:
        raise UsageError(f"{what} exports {', '.join(allowed)}; got {', '.join(map(repr, components)) or 'none'}")
    return components


def check_exported(exported: ExportedModel) -> None:
    """Raise ExportError unless the file is there, unchanged since export, and passes the ONNX checker."""
    path = Path(exported.path)
    if not path.is_file():
        raise ExportError(f"exported {exported.component} {path} does not exist; re-export it")
    files = [path]
    if exported.external_data:
        if not exported.data_path.is_file():
            raise ExportError(f"{path} keeps its weights in {exported.data_path.name}, which is missing; re-export it")
        files.append(exported.data_path)
    if sha256_files(files) != exported.sha256:
        raise ExportError(f"{path} ({exported.component}) changed since it was exported (sha256 differs); re-export it")
    _check(path, exported.component)


def onnxruntime_session(
    exported: ExportedModel, providers: Sequence[Any] | None = None
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the file, with full graph optimisation.

    `providers` defaults to CUDA where this onnxruntime build has it, then the CPU.
    """
    import onnxruntime as ort

    path = Path(exported.path)
    if not path.is_file():
        raise ExportError(f"exported {exported.component} {path} does not exist; re-export it")
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=list(providers))


def torch_callable(component: str, source: Any) -> Callable[..., Any]:
    """The torch computation that `component` of `source` was exported from, taking the
    export's inputs in order: the reference for parity checks and backend benchmarks."""
    _check_component(component)
    wrapper = _wrap(component, source)
    wrapper.eval()
    return wrapper


def parity(
    component: str,
    torch_module: Any,
    exported: ExportedModel,
    sample_inputs: Mapping[str, torch.Tensor],
    *,
    session: onnxruntime.InferenceSession | None = None,
) -> dict[str, Any]:
    """How far ONNX Runtime's outputs are from torch's on the same inputs.

    `torch_module` is what was exported (DiffusionModels, the module, or a Sam); it runs as
    it is, in its own dtype, so an fp16 file compared with an fp32 model measures what the
    lower precision costs. Inputs are cast to each side's dtypes. Returns, per output and
    over all outputs, `max_abs` (largest absolute difference) and `max_rel` (that divided by
    the largest magnitude of torch's output, so near-zero elements do not dominate), plus
    both sides' wall times in seconds.
    """
    _check_component(component)
    if exported.component != component:
        raise ValueError(f"the exported file is a {exported.component}, not a {component}")
    net = _network(component, torch_module)
    wrapper = _wrap(component, torch_module)
    p = _param(net, component)
    spec = _spec(component, wrapper)
    missing = [n for n in spec.inputs if n not in sample_inputs]
    if missing:
        raise ValueError(f"{component} needs inputs {', '.join(spec.inputs)}; missing {', '.join(missing)}")
    torch_in = {
        n: sample_inputs[n].to(p.device, p.dtype) if sample_inputs[n].is_floating_point() and n != "timestep"
        else sample_inputs[n].to(p.device)
        for n in spec.inputs
    }
    t0 = time.perf_counter()
    with _eval_mode(wrapper), torch.no_grad():
        expected = wrapper(*(torch_in[n] for n in spec.inputs))
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    torch_s = time.perf_counter() - t0
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    session = session or onnxruntime_session(exported)
    feeds = {}
    for value in session.get_inputs():
        dtype = _ORT_TYPES.get(value.type)
        if dtype is None:
            raise ValueError(f"unsupported input type {value.type} of {value.name}")
        feeds[value.name] = to_numpy(sample_inputs[value.name], dtype)
    t0 = time.perf_counter()
    got = session.run(list(spec.outputs), feeds)
    ort_s = time.perf_counter() - t0

    result = _compare(spec.outputs, expected, got)
    result.update(torch_s=torch_s, onnxruntime_s=ort_s)
    return result


def capture_parity(models: Any, exported: ExportedModel) -> dict[str, Any]:
    """parity() for unet-capture: ONNX Runtime against the torch capture computation, fp32.

    Inputs are a guided pair's UNet batch read by three map rows over two classes (the
    export's example layout) at the file's latent size; returns what parity() returns.
    """
    if exported.component != CAPTURE_COMPONENT:
        raise ValueError(f"the exported file is a {exported.component}, not a {CAPTURE_COMPONENT}")
    wrapper = capture_callable(models, exported.capture_layers)
    inputs = _capture_export_inputs(models, wrapper, tuple(exported.input_shapes["sample"][2:]))
    with wrapper.installed(), _eval_mode(wrapper), torch.no_grad():
        expected = wrapper(*(inputs[n] for n in exported.input_names))
    session = onnxruntime_session(exported, providers=["CPUExecutionProvider"])
    feeds = {v.name: to_numpy(inputs[v.name], _ORT_TYPES[v.type]) for v in session.get_inputs()}
    got = session.run(list(exported.output_names), feeds)
    return _compare(exported.output_names, expected, got)


def _compare(names: Sequence[str], expected: Sequence[torch.Tensor], got: Sequence[np.ndarray]) -> dict[str, Any]:
    result: dict[str, Any] = {"outputs": {}, "max_abs": 0.0, "max_rel": 0.0}
    for name, ref, out in zip(names, expected, got):
        ref64 = ref.detach().to(torch.float64).cpu().numpy()
        out64 = np.asarray(out, dtype=np.float64)
        if ref64.shape != out64.shape:
            raise AssertionError(f"{name}: torch gives {ref64.shape}, onnxruntime {out64.shape}")
        max_abs = float(np.max(np.abs(out64 - ref64))) if ref64.size else 0.0
        scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        result["outputs"][name] = {"max_abs": max_abs, "max_rel": max_rel}
        result["max_abs"] = max(result["max_abs"], max_abs)
        result["max_rel"] = max(result["max_rel"], max_rel)
    return result


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bfloat16)": "bfloat16",
}


def to_numpy(t: torch.Tensor, dtype: Any) -> np.ndarray:
    """`t` as a numpy array of `dtype` (a numpy dtype or name; "bfloat16" through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return t.detach().float().cpu().numpy().astype(ml_dtypes.bfloat16)
    return t.detach().cpu().to(torch.float32 if t.dtype is torch.bfloat16 else t.dtype).numpy().astype(dtype)

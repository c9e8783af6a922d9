"""Per-class cross-attention maps of both images of each pair, read from the UNet while it samples.

`AttentionCapture` puts a capturing processor on chosen cross-attention modules (`attn2`) of a
diffusers UNet for the duration of `installed()`, and is handed to `PairedSampler` as its step
hook. Each capturing processor returns exactly what the processor it replaced returns; on the
captured steps it also feeds the queries and keys it saw to the class-attention kernel:

* positive rows: the positive image's queries against the positive prompt's keys;
* negative rows: the negative image's queries against the POSITIVE prompt's keys. The class
  words are gone from the negative prompt, so its own keys say nothing about them; the positive
  keys measure how much the negative image still responds to the class, which is what the
  counterfactual check compares.

Unconditional rows are never read. Layers are chosen by how many times smaller than the latent
their feature map is (their "factor"), derived from the UNet's blocks, so any
UNet2DConditionModel works (SD 1.x/2.x and the tiny test models). A cross-attention mask
(Stable Diffusion pipelines pass none) is not applied to the maps.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Collection, Iterator, Sequence

import torch
import torch.nn.functional as F

from magicseg_engine.generate.sampler import UNetBatchLayout
from magicseg_engine.generate.tokenizer import ClipTokenizer
from magicseg_engine.kernels import attention_capture as kernel
from magicseg_engine.prompts.counterfactual import find_mentions

log = logging.getLogger(__name__)

# For SD at 64x64 latents these are the 32x32 and 16x16 layers: the ones attention-based
# pseudo-labelling reads. The 64x64 layers follow texture more than objects, and the 8x8 mid
# block is too coarse to outline anything.
DEFAULT_FACTORS = (2, 4)


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, int]:
    """Name -> factor of every cross-attention module of a diffusers UNet2DConditionModel.

    The factor is how many times smaller than the latent the layer's feature map is (1 = the
    latent resolution). A down block runs at its level and downsamples at its end; an up block
    runs at its level and upsamples at its end; the mid block runs at the coarsest level.
    """
    from diffusers.models.attention_processor import Attention

    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        raise TypeError(f"{type(unet).__name__} has no down_blocks/up_blocks; "
                        "expected a diffusers UNet2DConditionModel")
    block_factor: dict[str, int] = {}
    factor = 1
    for i, block in enumerate(unet.down_blocks):
        block_factor[f"down_blocks.{i}"] = factor
        if getattr(block, "downsamplers", None):
            factor *= 2
    block_factor["mid_block"] = factor
    for i, block in enumerate(unet.up_blocks):
        block_factor[f"up_blocks.{i}"] = factor
        if getattr(block, "upsamplers", None):
            factor //= 2

    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            parts = name.split(".")
            key = "mid_block" if parts[0] == "mid_block" else ".".join(parts[:2])
            if key in block_factor:
                layers[name] = block_factor[key]
    return layers


def self_attention_layers(unet: torch.nn.Module, factor: int) -> list[str]:
    """Names of the self-attention modules (`attn1`) that sit beside the cross-attention ones at `factor`."""
    modules = dict(unet.named_modules())
    out = []
    for name, f in cross_attention_layers(unet).items():
        sibling = name.rsplit(".", 1)[0] + ".attn1"
        if f == factor and sibling in modules:
            out.append(sibling)
    return out


def _step_range(steps: tuple[float, float], num_steps: int) -> set[int]:
    """Indices of the steps whose share [i/n, (i+1)/n) of the schedule overlaps [lo, hi).

    Overlap rather than containment, so that any non-empty range selects at least one step.
    """
    lo, hi = steps
    return {i for i in range(num_steps) if i / num_steps < hi and (i + 1) / num_steps > lo}


class _CapturingProcessor:
    """Stands in for one cross-attention module's processor while capture is installed.

    On a captured step it only hands the queries and keys it saw to the capture
    (`AttentionCapture._stash`); the maps are computed between steps, outside the UNet, so a
    compiled UNet traces no bookkeeping and the maps of a step's layers are computed together.
    """

    def __init__(self, capture: AttentionCapture, original, factor: int):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.capture = capture
        self.original = original
        self.factor = factor
        # diffusers' default processor on torch 2 is recomputed here step for step, keeping its
        # query and key; any other processor runs as is and the capture projects q and k itself.
        self._inline = type(original) is AttnProcessor2_0

    # The parameter names match AttnProcessor2_0's: Attention.forward drops the keyword
    # arguments a processor's signature does not name.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        capture = self.capture
        if not capture._active or encoder_hidden_states is None:
            return self._original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        rows, keys = capture._query_rows, capture._key_rows
        if self._inline and not kwargs:
            out, query, key = _sdpa_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            # SDPA's own scale, which ignores attn.scale.
            capture._stash(self.factor, query[rows], key[keys], query.shape[-1] ** -0.5)
            return out
        out = self._original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        query, _ = _project(attn, hidden_states[rows], encoder_hidden_states[rows],
                            temb[rows] if temb is not None else None)
        _, key = _project(attn, hidden_states[keys], encoder_hidden_states[keys],
                          temb[keys] if temb is not None else None)
        capture._stash(self.factor, query, key, attn.scale)
        return out

    def _original(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs):
        # As Attention.forward calls a processor: by keyword, and temb only when there is one,
        # since not every processor takes it.
        if temb is not None:
            kwargs = {**kwargs, "temb": temb}
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)


class _SelfAttentionProbe:
    """Stands in for one self-attention module's processor: its output unchanged, and on the
    captured steps the head-mean attention probabilities of the positive and negative rows."""

    def __init__(self, capture: AttentionCapture, original):
        self.capture = capture
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if temb is not None:
            kwargs = {**kwargs, "temb": temb}
        out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **kwargs)
        capture = self.capture
        if capture._active and encoder_hidden_states is None:
            both = capture._both_rows  # positives and negatives, whatever the capture reads
            rows = hidden_states[both]
            q, k = _project(attn, rows, rows, temb[both] if temb is not None else None)
            probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1).mean(1)
            capture._stashed_self.append(probs)
        return out


def _sdpa_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    """AttnProcessor2_0's computation, op for op (so the output is bit-identical), plus q and k.

    Returns the layer output and the head-split query [B, H, N, D] and key [B, H, L, D].
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    hidden_states = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
    )
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    hidden_states = hidden_states / attn.rescale_output_factor
    return hidden_states, query, key


def _project(attn, hidden_states, encoder_hidden_states, temb):
    """The head-split query [B, H, N, D] and key [B, H, L, D] that diffusers' processors compute."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    batch_size = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key


class AttentionCapture:
    """Cross-attention maps of each pair's classes, for the positive and the negative image.

    Usage::

        capture = AttentionCapture(models.unet, models.tokenizer)
        capture.set_prompts(prompts, classes)
        with capture.installed():
            batch = sampler(prompts, negatives, seeds, hook=capture)
        maps = capture.maps()  # [B, 2, C_max, h, w]

    `steps` is the part of the schedule to read, as fractions [lo, hi) of the sampling steps.
    `factors` picks layers by how many times smaller than the latent they are (default: those
    of DEFAULT_FACTORS the UNet has, else all); `layer_names` picks modules by name instead.
    `use_triton`: None uses the Triton kernel for CUDA tensors and the torch reference
    elsewhere; True or False forces one. `self_attention_power` > 0 also reads the
    self-attention of the finest chosen level and refines the maps with it that many times
    (DiffSegmenter's and Dataset Diffusion's refinement); `bench quality --sweep` measures it.
    `read_negatives=False` reads the positive images only (their negatives' maps stay zero): for
    runs whose counterfactual check is off, it halves what capture computes.

    What it costs: on a captured step each chosen layer's processor keeps a view of its queries
    and keys (no arithmetic); when the step ends the maps of all layers of one size are
    computed together (the Triton kernel per layer on a GPU), so the UNet's own work is
    untouched and the extra memory is one step's queries of the chosen layers.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        tokenizer: ClipTokenizer,
        *,
        steps: tuple[float, float] = (0.0, 1.0),
        factors: Collection[int] | None = None,
        layer_names: Collection[str] | None = None,
        use_triton: bool | None = None,
        self_attention_power: int = 0,
        read_negatives: bool = True,
    ):
        lo, hi = (float(s) for s in steps)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"steps must be fractions 0 <= lo < hi <= 1 of the schedule, got {steps}")
        available = cross_attention_layers(unet)
        if not available:
            raise ValueError(f"{type(unet).__name__} has no cross-attention layers")
        if layer_names is not None:
            unknown = sorted(set(layer_names) - set(available))
            if unknown:
                raise ValueError(f"not cross-attention modules of this UNet: {', '.join(unknown)}")
            chosen = {n: f for n, f in available.items() if n in set(layer_names)}
        elif factors is not None:
            chosen = {n: f for n, f in available.items() if f in set(factors)}
        else:
            chosen = {n: f for n, f in available.items() if f in DEFAULT_FACTORS} or dict(available)
        if not chosen:
            raise ValueError(f"no cross-attention layer at factors {sorted(factors or ())}; "
                             f"this UNet has {sorted(set(available.values()))}")
        self.unet = unet
        self.tokenizer = tokenizer
        self.steps = (lo, hi)
        self.layers: dict[str, int] = chosen  # module name -> factor
        if use_triton and kernel.triton is None:
            raise RuntimeError("use_triton=True but Triton is not installed")
        self.use_triton = use_triton
        if self_attention_power < 0:
            raise ValueError(f"self_attention_power must be 0 or more, got {self_attention_power}")
        self.self_attention_power = self_attention_power
        # The self-attention read for refinement: the finest level among the chosen layers.
        self.self_attention_factor = min(chosen.values())
        self.self_layers = self_attention_layers(unet, self.self_attention_factor) if self_attention_power else []

        self._prompts: list[str] = []
        self._classes: list[tuple[str, ...]] = []
        self._positions: list[list[list[int]]] = []
        self._missing: list[list[str]] = []
        self._token_index = torch.full((0, 0, 1), -1, dtype=torch.int32)
        self._index_on: dict[torch.device, torch.Tensor] = {}

        self.read_negatives = read_negatives
        self._processors: dict[str, object] = {}  # built once, so a compiled UNet sees the same ones
        self._installed = False
        self._active = False
        self._seen = False  # a batch ran with the capture installed (or fed by an exported UNet)
        self._layout: UNetBatchLayout | None = None
        self._selected: set[int] = set()
        self._latent_hw: tuple[int, int] | None = None
        self._device = torch.device("cpu")
        # Rows of the UNet batch the processors read: queries (positives, then negatives when
        # they are read) and the positive prompt's keys; set per batch by `start`.
        self._query_rows = slice(0, 0)
        self._key_rows = slice(0, 0)
        self._both_rows = slice(0, 0)
        self._stashed: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []  # this step's (factor, q, k, scale)
        self._stashed_self: list[torch.Tensor] = []
        self._sums: dict[int, torch.Tensor] = {}  # factor -> [2B, C, N] sum over layers and steps
        self._calls = 0
        self._self_sum: torch.Tensor | None = None  # [2B, N, N] self-attention probabilities

    # --- prompts -------------------------------------------------------------------------

    def set_prompts(self, prompts: Sequence[str], classes: Sequence[Sequence[str]]) -> None:
        """The positive prompt and class names of each pair of the next batch."""
        if len(prompts) != len(classes):
            raise ValueError(f"{len(prompts)} prompts but {len(classes)} class lists")
        self._prompts = list(prompts)
        self._classes = [tuple(c) for c in classes]
        self._positions = [[self._class_positions(p, name, names) for name in names]
                           for p, names in zip(self._prompts, self._classes)]
        self._missing = [[name for name, pos in zip(names, positions) if not pos]
                         for names, positions in zip(self._classes, self._positions)]
        for i, missing in enumerate(self._missing):
            if missing:
                log.warning("no tokens for %s in prompt %d (%r): not mentioned, or cut off at %d tokens; "
                            "their maps will be zero", ", ".join(map(repr, missing)), i, self._prompts[i],
                            self.tokenizer.context_length)
        c_max = max((len(c) for c in self._classes), default=0)
        t_max = max((len(p) for row in self._positions for p in row), default=0)
        index = torch.full((len(prompts), c_max, max(t_max, 1)), -1, dtype=torch.int32)
        for i, row in enumerate(self._positions):
            for c, pos in enumerate(row):
                index[i, c, : len(pos)] = torch.tensor(pos, dtype=torch.int32)
        self._token_index = index
        self._index_on = {}

    def _class_positions(self, prompt: str, name: str, classes: Sequence[str]) -> list[int]:
        # The tokens of the class's mentions as the counterfactual rewrite finds them (every
        # form, every occurrence; not "dog" inside "hot dog", a modifier such as "bus" in "bus
        # stop", or a possessive), so the maps read exactly the words the negative removes. BPE
        # splits at word boundaries, so a span's tokens are those of the prompt up to its end
        # minus those up to its start. The hyphens of "traffic-light" are tokens of their own
        # and say nothing about the class; a mention cut off by the context length is left out.
        ids = self.tokenizer([prompt])[0].tolist()
        hyphen_ids = set(self.tokenizer.encode("-"))
        positions: set[int] = set()
        for start, end in find_mentions(prompt, name, classes=classes):
            first = 1 + len(self.tokenizer.encode(prompt[:start]))  # 1: the start token
            stop = 1 + len(self.tokenizer.encode(prompt[:end]))
            if stop - 1 <= self.tokenizer.context_length - 2:
                positions.update(p for p in range(first, stop) if ids[p] not in hyphen_ids)
        return sorted(positions)

    @property
    def token_positions(self) -> list[list[list[int]]]:
        """For each pair and class, the token positions read (start token = 0)."""
        return [[list(p) for p in row] for row in self._positions]

    def missing_classes(self) -> list[list[str]]:
        """For each pair, the classes none of whose tokens are in its prompt; their maps are zero."""
        return [list(m) for m in self._missing]

    # --- installation ----------------------------------------------------------------------

    @contextlib.contextmanager
    def installed(self) -> Iterator[AttentionCapture]:
        """Capturing processors on the chosen layers while inside; the originals back on exit.

        The processors are made once per capture and reused by every installation: a compiled
        UNet guards on its processors, and new ones each batch would recompile it each batch.
        """
        if self._installed:
            raise RuntimeError("this capture is already installed")
        modules = dict(self.unet.named_modules())
        if any(isinstance(modules[n].processor, _CapturingProcessor) for n in self.layers):
            raise RuntimeError("another attention capture is installed on this UNet")
        originals = {name: modules[name].processor for name in [*self.layers, *self.self_layers]}
        if any(self._processors.get(n) is None or self._processors[n].original is not p
               for n, p in originals.items()):
            self._processors = {name: _CapturingProcessor(self, originals[name], factor)
                                for name, factor in self.layers.items()}
            self._processors.update({name: _SelfAttentionProbe(self, originals[name]) for name in self.self_layers})
        try:
            for name, processor in self._processors.items():
                modules[name].set_processor(processor)
            self._installed = True
            yield self
        finally:
            self._installed = False
            self._active = False
            self._stashed, self._stashed_self = [], []
            for name, processor in originals.items():
                modules[name].set_processor(processor)

    # --- StepHook ---------------------------------------------------------------------------

    def start(self, layout: UNetBatchLayout, num_steps: int) -> None:
        if layout.pairs != len(self._prompts):
            raise ValueError(f"the batch has {layout.pairs} pairs but set_prompts was given {len(self._prompts)}")
        self._layout = layout
        self._latent_hw = layout.latent_hw
        self._device = next(self.unet.parameters()).device
        pos, neg = layout.positive_rows, layout.negative_rows
        self._key_rows = pos
        self._both_rows = slice(pos.start, neg.stop)
        self._query_rows = self._both_rows if self.read_negatives else pos
        self._index_on = {}
        self._selected = _step_range(self.steps, num_steps)
        self._stashed, self._stashed_self = [], []
        self._sums = {}
        self._calls = 0
        self._self_sum = None
        self._active = False
        self._seen = self._installed

    def before_step(self, index: int, timestep: torch.Tensor) -> None:
        self._flush()
        self._active = self._installed and index in self._selected

    def finish(self) -> None:
        self._flush()
        self._active = False
        if self._calls == 0:
            log.warning("attention capture recorded nothing: it was not installed, or no step was selected")

    # --- recording --------------------------------------------------------------------------

    def _stash(self, factor: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """One layer's head-split queries [R, H, N, D] of the rows read (positives, then
        negatives) and keys [B, H, L, D] of the positive prompts, kept until the step ends."""
        self._stashed.append((factor, query, key, scale))

    def _flush(self) -> None:
        """The maps of the step's stashed layers, added to the running sums per factor."""
        stashed, self._stashed = self._stashed, []
        selfs, self._stashed_self = self._stashed_self, []
        for probs in selfs:
            self._record_self(probs)
        if not stashed:
            return
        self._calls += len(stashed)
        classes = self._token_index.shape[1]
        if classes == 0:
            return
        groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for factor, q, k, scale in stashed:
            groups.setdefault((factor, scale, q.shape, k.shape, q.dtype, q.device), []).append((q, k))
        pairs = self._layout.pairs
        for (factor, scale, q_shape, _, _, device), layers in groups.items():
            n = q_shape[2]
            buf = self._sums.get(factor)
            if buf is None:
                buf = self._sums[factor] = torch.zeros((2 * pairs, classes, n), dtype=torch.float32, device=device)
            elif buf.shape[2] != n:
                raise RuntimeError(f"layers at factor {factor} have {buf.shape[2]} and {n} positions")
            index = self._index_on.get(device)
            if index is None:
                index = self._index_on[device] = self._token_index.to(device)
            # Straight into the running sums: positives' rows first, negatives' after them.
            self._accumulate(layers, index, scale, buf[: q_shape[0]])

    def _accumulate(self, layers: list[tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor, scale: float,
                    out: torch.Tensor) -> None:
        """Add the class maps of `layers` (queries [R, H, N, D], keys [B, H, L, D], R = B or 2B)
        into `out` [R, C, N]."""
        use_triton = self.use_triton
        if use_triton is None:
            # The interpreter is far slower than torch on the CPU; the kernel pays off on GPUs.
            use_triton = out.device.type == "cuda" and kernel.triton is not None
        if use_triton:
            for q, k in layers:
                repeats = q.shape[0] // k.shape[0]
                kernel.class_attention(q, k.repeat(repeats, 1, 1, 1), index.repeat(repeats, 1, 1), scale, out=out)
        else:
            out += kernel.class_attention_layers([q for q, _ in layers], [k for _, k in layers], index, scale)

    def _record_self(self, probs: torch.Tensor) -> None:
        """Add one self-attention layer's head-mean probabilities [2B, N, N] (positives, then
        negatives) of a captured step."""
        probs = probs.float()
        self._self_sum = probs if self._self_sum is None else self._self_sum.add_(probs)

    def _refine(self, total: torch.Tensor, self_sum: torch.Tensor | None, power: int) -> torch.Tensor:
        """[2B, C, h, w] maps, each pixel replaced `power` times by the mean of the map over the
        pixels it attends to in `self_sum` [2B, N, N] (row-normalised self-attention): the maps
        spread over the object the UNet groups together, and stop at its edges."""
        if self_sum is None:
            raise RuntimeError("self-attention refinement was asked for but no self-attention was recorded")
        attn = self_sum / self_sum.sum(-1, keepdim=True).clamp_min(1e-12)
        rows, classes, h0, w0 = total.shape
        f = self.self_attention_factor
        h, w = math.ceil(h0 / f), math.ceil(w0 / f)
        if attn.shape[-1] != h * w:
            raise RuntimeError(f"self-attention has {attn.shape[-1]} positions, not {h}x{w}")
        grid = F.adaptive_avg_pool2d(total, (h, w)) if (h, w) != (h0, w0) else total
        flat = grid.reshape(rows, classes, h * w).transpose(1, 2)
        for _ in range(power):
            flat = attn @ flat
        grid = flat.transpose(1, 2).reshape(rows, classes, h, w)
        if (h, w) != (h0, w0):
            grid = F.interpolate(grid, size=(h0, w0), mode="bilinear", align_corners=False)
        return grid

    # --- a UNet that runs outside torch ------------------------------------------------------
    # An exported UNet (unet-capture.onnx, or an engine built from it) computes the same class
    # attention inside its graph. The runner asks for the rows and token index of each step
    # and hands back the per-factor sums; no processor runs.

    def external_inputs(self, sample: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """unet-capture's extra inputs for this step, or None when the step is not captured.

        Call once per UNet call with its latents `sample`, before running it. Rows follow
        the processors': positive queries against positive keys, then negative queries
        against the positive keys.
        """
        self._latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        self._device = sample.device
        self._seen = True
        if not self._active:
            return None
        if self._token_index.shape[1] == 0:
            self._calls += len(self.layers)  # the step counts; there is nothing to read
            return None
        pos, neg = self._layout.positive_rows, self._layout.negative_rows
        pos_rows = torch.arange(pos.start, pos.stop, dtype=torch.int64)
        neg_rows = torch.arange(neg.start, neg.stop, dtype=torch.int64)
        index = self._token_index.to(torch.int64)
        return {"query_rows": torch.cat([pos_rows, neg_rows]).to(sample.device),
                "key_rows": torch.cat([pos_rows, pos_rows]).to(sample.device),
                "token_index": torch.cat([index, index]).to(sample.device)}

    def add_external_maps(self, maps: dict[int, torch.Tensor]) -> None:
        """Add one UNet call's outputs, factor -> [2B, C, N] summed over that factor's layers."""
        if set(maps) != set(self.layers.values()):
            raise ValueError(f"maps for factors {sorted(maps)}, but this capture reads {sorted(set(self.layers.values()))}")
        for factor, summed in maps.items():
            summed = summed.to(self._device, torch.float32)
            buf = self._sums.get(factor)
            self._sums[factor] = summed.clone() if buf is None else buf.add_(summed)
            self._calls += sum(1 for f in self.layers.values() if f == factor)

    # --- results ----------------------------------------------------------------------------

    def maps(self) -> torch.Tensor:
        """[B, 2, C_max, h, w] float32 at the latent resolution: positive then negative image's maps.

        Each captured layer and step counts once in the average. Layers are summed per
        resolution while sampling and each sum is upsampled once here; bilinear upsampling is
        linear, so this equals averaging every layer's upsampled map, at one resize per
        resolution instead of one per layer and step. Classes a pair does not have, or whose
        tokens are missing, are zero.
        """
        self._flush()
        if self._layout is None or self._latent_hw is None or not self._seen:
            raise RuntimeError("nothing captured yet: sample with the capture installed and passed as the hook")
        pairs = self._layout.pairs
        classes = self._token_index.shape[1]
        h0, w0 = self._latent_hw
        total = torch.zeros((2 * pairs, classes, h0, w0), dtype=torch.float32, device=self._device)
        with torch.no_grad():
            for factor, buf in sorted(self._sums.items()):
                h, w = math.ceil(h0 / factor), math.ceil(w0 / factor)
                if h * w != buf.shape[2]:
                    raise RuntimeError(f"layers at factor {factor} have {buf.shape[2]} positions, "
                                       f"not {h}x{w} for a {h0}x{w0} latent")
                grid = buf.reshape(2 * pairs, classes, h, w)
                if (h, w) != (h0, w0):
                    grid = F.interpolate(grid, size=(h0, w0), mode="bilinear", align_corners=False)
                total += grid
            if self._calls:
                total /= self._calls
            if self.self_attention_power:
                total = self._refine(total, self._self_sum, self.self_attention_power)
        return total.reshape(2, pairs, classes, h0, w0).transpose(0, 1).contiguous()

"""The segmentation model pretrained on generated data: CLIP with deep visual prompts and a relation decoder.

The recipe follows ZegCLIP. A CLIP ViT image encoder, frozen by default, gets learnable prompt
tokens at the input of each of its first `prompt_depth` layers (deep visual prompt tuning). The
class names of a vocabulary are embedded once by the frozen CLIP text encoder, averaged over
prompt templates (`TextEmbeddingBank`). A small transformer decoder turns each candidate class
into a query: the "relationship descriptor" of its text embedding and the image's global
embedding, which then attends to the patch tokens. After every decoder layer each query is
compared with every patch embedding, giving one mask logit map per class, so losses can be
applied to each layer.

The towers are open_clip's own classes built from a configuration with random weights;
`load_clip_weights` fills them from an open_clip or OpenAI checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from magicseg_engine.atomic import atomic_output
from magicseg_engine.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a cropped photo of the {}.",
    "a good photo of the {}.",
    "there is a {} in the scene.",
)

# Mask logits are scaled cosine similarities; the scale is learned in log space and capped
# like CLIP's own so that training cannot blow it up.
_INIT_LOGIT_SCALE = 10.0
_MAX_LOGIT_SCALE = 100.0


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# open_clip config keys this module knows how to build, and the field each one fills.
_OPEN_CLIP_TOP = {"embed_dim": "embed_dim", "quick_gelu": "quick_gelu"}
_OPEN_CLIP_VISION = {"layers": "layers", "width": "width", "patch_size": "patch_size", "mlp_ratio": "mlp_ratio"}
_OPEN_CLIP_TEXT = {
    "context_length": "context_length", "vocab_size": "vocab_size",
    "width": "text_width", "heads": "text_heads", "layers": "text_layers",
}


class SegModelConfig(BaseModel):
    """Architecture of `MagicSegModel`; `SegModelConfig.preset("tiny" | "vit-b16", **overrides)`.

    With `open_clip_model` set, the tower fields come from that open_clip configuration (and
    must agree with it where given); `image_size` stays ours, since segmentation runs at a higher
    resolution than CLIP was trained at and the positional embedding is interpolated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    open_clip_model: str | None = None
    image_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    # Image tower.
    width: int = Field(gt=0)
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    # OpenAI's CLIP weights were trained with QuickGELU; LAION's open_clip weights with GELU.
    quick_gelu: bool = False
    # Text tower; the tokenizer is always CLIP's BPE vocabulary.
    text_width: int = Field(gt=0)
    text_layers: int = Field(gt=0)
    text_heads: int = Field(gt=0)
    context_length: int = Field(77, ge=2)
    vocab_size: int = Field(49408, gt=0)
    embed_dim: int = Field(gt=0)
    # Deep visual prompt tuning: `prompt_tokens` fresh tokens at the input of each of the first
    # `prompt_depth` layers (default: all of them).
    prompt_tokens: int = Field(10, ge=0)
    prompt_depth: int | None = Field(None, ge=0)
    freeze_backbone: bool = True
    # Relation decoder.
    decoder_layers: int = Field(3, gt=0)
    decoder_heads: int = Field(8, gt=0)
    decoder_dim: int = Field(512, gt=0)
    decoder_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    # What `images` must be normalised with before `forward`.
    image_mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    image_std: tuple[float, float, float] = OPENAI_DATASET_STD

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SegModelConfig:
        if name not in PRESETS:
            raise UsageError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @model_validator(mode="before")
    @classmethod
    def _fill_from_open_clip(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("open_clip_model"):
            return data
        name = data["open_clip_model"]
        oc = open_clip.get_model_config(name)
        if oc is None:
            raise ValueError(f"open_clip has no model config named {name!r}")
        vision, text = dict(oc.get("vision_cfg", {})), dict(oc.get("text_cfg", {}))
        # Only plain ViT + text transformer CLIPs can be built and prompted here.
        unsupported = (
            sorted(set(oc) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"})
            + [f"vision_cfg.{k}" for k in sorted(set(vision) - set(_OPEN_CLIP_VISION) - {"image_size", "head_width"})]
            + [f"text_cfg.{k}" for k in sorted(set(text) - set(_OPEN_CLIP_TEXT))]
        )
        if unsupported:
            raise ValueError(f"open_clip model {name!r} is not a plain ViT CLIP (it sets {', '.join(unsupported)})")
        found = {field: oc[k] for k, field in _OPEN_CLIP_TOP.items() if k in oc}
        found |= {field: vision[k] for k, field in _OPEN_CLIP_VISION.items() if k in vision}
        found |= {field: text[k] for k, field in _OPEN_CLIP_TEXT.items() if k in text}
        found["heads"] = vision.get("width", 768) // vision.get("head_width", 64)
        data = dict(data)
        for field, value in found.items():
            if field in data and data[field] != value:
                raise ValueError(f"{field}={data[field]!r} contradicts open_clip model {name!r} ({value!r})")
            data[field] = value
        return data

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_templates(v)

    @model_validator(mode="after")
    def _consistent(self) -> SegModelConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for width, heads, what in (
            (self.width, self.heads, "image tower"),
            (self.text_width, self.text_heads, "text tower"),
            (self.decoder_dim, self.decoder_heads, "decoder"),
        ):
            if width % heads:
                raise ValueError(f"{what} width {width} is not divisible by its {heads} heads")
        if self.prompt_depth is not None and self.prompt_depth > self.layers:
            raise ValueError(f"prompt_depth {self.prompt_depth} exceeds the {self.layers} image tower layers")
        return self

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h, w) at `image_size`."""
        n = self.image_size // self.patch_size
        return n, n

    @property
    def deep_prompt_layers(self) -> int:
        """How many layers get fresh prompt tokens (0 when prompting is off)."""
        if not self.prompt_tokens:
            return 0
        return self.layers if self.prompt_depth is None else self.prompt_depth

    def text_tower_key(self) -> dict[str, Any]:
        """The fields that shape text embeddings besides the weights."""
        return {k: getattr(self, k) for k in (
            "text_width", "text_layers", "text_heads", "context_length", "vocab_size", "embed_dim",
            "quick_gelu", "mlp_ratio",
        )}


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """`templates` as a tuple; ValueError unless there is at least one and each has one '{}'."""
    if not templates:
        raise ValueError("needs at least one prompt template")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}' for the class name")
    return tuple(templates)


PRESETS: dict[str, dict[str, Any]] = {
    # Same structure as vit-b16 at toy size: a few hundred CPU training steps take a minute or two.
    "tiny": dict(
        image_size=64, patch_size=8, width=64, layers=4, heads=4,
        text_width=64, text_layers=2, text_heads=4, embed_dim=64,
        prompt_tokens=10, decoder_layers=2, decoder_heads=4, decoder_dim=64,
    ),
    # ZegCLIP's setting: ViT-B/16 at 512 px (32x32 patches), 10 prompt tokens in every layer (the
    # first layer's plus 11 deep ones), decoder of 3 layers, 8 heads, 512 dims.
    "vit-b16": dict(
        open_clip_model="ViT-B-16", image_size=512, quick_gelu=True,
        prompt_tokens=10, prompt_depth=12, decoder_layers=3, decoder_heads=8, decoder_dim=512,
    ),
}


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def resize_positional_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + n*n, W] class + square-grid positional embedding -> [1 + h*w, W] for `grid` (bicubic)."""
    n = math.isqrt(pos.shape[0] - 1)
    if n * n != pos.shape[0] - 1:
        raise ValueError(f"positional embedding of {pos.shape[0]} rows is not a class token plus a square grid")
    if (n, n) == tuple(grid):
        return pos
    cls_pos, grid_pos = pos[:1], pos[1:]
    grid_pos = grid_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    grid_pos = F.interpolate(grid_pos, size=tuple(grid), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([cls_pos, grid_pos], dim=0)


def mask_logits(
    pixel_embeddings: torch.Tensor, class_queries: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """[B,P,E] pixels and [B,K,E] classes -> [B,K,P] logits: logit_scale * <class, pixel>.

    The model computes its logits with exactly this function, so a fused loss given the same
    three tensors reproduces them.
    """
    return logit_scale * torch.bmm(class_queries, pixel_embeddings.transpose(1, 2))


def build_clip(config: SegModelConfig) -> CLIP:
    """The open_clip CLIP described by `config`, with random weights."""
    vision = CLIPVisionCfg(
        layers=config.layers, width=config.width, head_width=config.width // config.heads,
        mlp_ratio=config.mlp_ratio, patch_size=config.patch_size, image_size=config.image_size,
    )
    text = CLIPTextCfg(
        context_length=config.context_length, vocab_size=config.vocab_size,
        width=config.text_width, heads=config.text_heads, layers=config.text_layers,
        mlp_ratio=config.mlp_ratio,
    )
    return CLIP(config.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=config.quick_gelu)


class MagicSegModel(nn.Module):
    """CLIP ViT with deep visual prompts + relation decoder: images and class embeddings -> mask logits.

    `clip` holds both open_clip towers (keys as in open_clip checkpoints, under `clip.`). The
    text tower is always frozen (its embeddings are cached); the image tower is frozen when
    `config.freeze_backbone`. Prompts and decoder always train.
    """

    def __init__(self, config: SegModelConfig):
        super().__init__()
        self.config = config
        self.clip = build_clip(config)
        for name, p in self.clip.named_parameters():
            if config.freeze_backbone or not name.startswith("visual."):
                p.requires_grad_(False)

        depth, n, width = config.deep_prompt_layers, config.prompt_tokens, config.width
        if depth:
            # VPT's initialisation: uniform with the Xavier bound of a patch projection.
            bound = math.sqrt(6.0 / (3 * config.patch_size**2 + width))
            self.prompts = nn.Parameter(torch.empty(depth, n, width).uniform_(-bound, bound))
        else:
            self.register_parameter("prompts", None)

        e, d = config.embed_dim, config.decoder_dim
        # Patch tokens into the decoder's width (ZegCLIP's input projection and norm).
        self.pixel_in = nn.Sequential(nn.Linear(e, d), nn.LayerNorm(d))
        # Relationship descriptor: [text * global, text] -> query.
        self.query_in = nn.Linear(2 * e, d)
        self.decoder = nn.ModuleList(
            nn.TransformerDecoderLayer(
                d, config.decoder_heads, dim_feedforward=4 * d, dropout=config.decoder_dropout,
                batch_first=True, norm_first=True,
            )
            for _ in range(config.decoder_layers)
        )
        # Shared by all layers, so every layer's queries live in the same space as the pixels.
        self.query_norm = nn.LayerNorm(d)
        self.class_head = nn.Linear(d, e)
        self.pixel_head = nn.Linear(d, e)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(_INIT_LOGIT_SCALE)))

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """[B,3,H,W] -> (class token [B,E], patch tokens [B,h*w,E], (h, w)), both projected by CLIP.

        The visual transformer's blocks are run here rather than by open_clip so that prompt
        tokens can be inserted after the class token and replaced at every prompted layer.
        """
        visual = self.clip.visual
        x = visual.conv1(images)  # [B, W, h, w]
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(b, 1, -1)
        pos = resize_positional_embedding(visual.positional_embedding, (h, w))
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        x = visual.ln_pre(x)

        n = self.config.prompt_tokens
        depth = self.config.deep_prompt_layers
        transformer = visual.transformer
        for i, block in enumerate(transformer.resblocks):
            if i < depth:
                prompts = self.prompts[i].to(x.dtype).expand(b, -1, -1)
                # Layer 0 inserts prompts after the class token; later layers replace the
                # previous layer's outputs at those positions with fresh ones.
                rest = x[:, 1:] if i == 0 else x[:, 1 + n:]
                x = torch.cat([x[:, :1], prompts, rest], dim=1)
            elif i == depth and depth:
                x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
            if transformer.batch_first:
                x = block(x)
            else:
                x = block(x.transpose(0, 1)).transpose(0, 1)
        if depth == len(transformer.resblocks):
            x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)

        # CLIP's own head applied to every token: patch tokens land in the joint text space.
        x = visual.ln_post(x) @ visual.proj
        return x[:, 0], x[:, 1:], (h, w)

    def forward(
        self,
        images: torch.Tensor,
        class_embeddings: torch.Tensor,
        class_padding_mask: torch.Tensor | None = None,
        twins: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Mask logits for normalised `images` [B,3,H,W] and text `class_embeddings` [B,K,E] or [K,E].

        `class_padding_mask` [B,K] (True = padding) keeps padded classes out of the queries'
        self-attention when images have different numbers of candidates; the logits of padded
        classes are meaningless and must be left out of losses. Returns:

        - `logits`: one [B,K,h,w] tensor per decoder layer, h, w = H/patch, W/patch
        - `layers`: per decoder layer, (pixel_embeddings [B,h*w,E], class_queries [B,K,E]); the
          pixel embeddings are shared by all layers
        - `pixel_embeddings` [B,h*w,E], `class_queries` [B,K,E]: the last layer's, L2-normalised
        - `logit_scale`: scalar; logits[i] == mask_logits(*layers[i], logit_scale).view(B,K,h,w)
        - `global_embedding` [B,E]: the image's projected class token, L2-normalised
        - `twin_global_embedding` [B,E]: the same for `twins` [B,3,H,W] (the counterfactual
          twins), when given; they share the images' backbone pass, as one batch of 2B
        - `grid`: (h, w)
        """
        b = images.shape[0]
        if class_embeddings.dim() == 2:
            class_embeddings = class_embeddings.unsqueeze(0).expand(b, -1, -1)
        if class_embeddings.dim() != 3 or class_embeddings.shape[0] != b:
            raise ValueError(f"class_embeddings must be [K,E] or [{b},K,E], got {list(class_embeddings.shape)}")
        k = class_embeddings.shape[1]

        twin_global = None
        if twins is not None:
            if twins.shape != images.shape:
                raise ValueError(f"twins must have the images' shape {list(images.shape)}, got {list(twins.shape)}")
            global_token, patches, (h, w) = self.encode_image(torch.cat([images, twins]))
            twin_global = F.normalize(global_token[b:], dim=-1)
            global_token, patches = global_token[:b], patches[:b]
        else:
            global_token, patches, (h, w) = self.encode_image(images)
        global_embedding = F.normalize(global_token, dim=-1)
        text = F.normalize(class_embeddings.to(global_embedding.dtype), dim=-1)
        queries = self.query_in(torch.cat([text * global_embedding.unsqueeze(1), text], dim=-1))

        memory = self.pixel_in(patches)
        pixels = F.normalize(self.pixel_head(memory), dim=-1)
        logit_scale = self.logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE)

        logits, layers = [], []
        for layer in self.decoder:
            queries = layer(queries, memory, tgt_key_padding_mask=class_padding_mask)
            classes = F.normalize(self.class_head(self.query_norm(queries)), dim=-1)
            layers.append((pixels, classes))
            logits.append(mask_logits(pixels, classes, logit_scale).view(b, k, h, w))
        return {
            "logits": logits,
            "layers": layers,
            "pixel_embeddings": pixels,
            "class_queries": classes,
            "logit_scale": logit_scale,
            "global_embedding": global_embedding,
            "twin_global_embedding": twin_global,
            "grid": (h, w),
        }

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, class_embeddings: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        """Last-layer mask logits [B,K,*out_size], bilinearly upsampled. Call `eval()` first."""
        logits = self(images, class_embeddings)["logits"][-1]
        return F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Text embeddings
# ---------------------------------------------------------------------------------------------


class TextEmbeddingBank:
    """Class names -> L2-normalised CLIP text embeddings [K,E], averaged over prompt templates.

    Embeddings are kept in memory, and on disk under `cache_dir` in a file keyed by a hash of
    the text tower's weights and shape, the templates and the names, so a large vocabulary is
    encoded once across runs. Call `lookup(vocabulary)` once up front: later lookups of any of
    those names are served from memory. Build the bank after loading the model's weights.
    """

    def __init__(
        self,
        model: MagicSegModel,
        cache_dir: str | Path | None = None,
        templates: Sequence[str] | None = None,
        batch_size: int = 256,
    ):
        self.model = model
        self.templates = check_templates(templates if templates is not None else model.config.templates)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self._memory: dict[str, torch.Tensor] = {}
        self._weights_digest: str | None = None

    def lookup(self, names: Sequence[str]) -> torch.Tensor:
        """[len(names), E] float32 embeddings on the model's device, in the order of `names`."""
        names = list(names)
        missing = sorted(set(names) - set(self._memory))
        if missing:
            self._memory.update(self._load_or_encode(missing))
        if not names:
            return torch.empty(0, self.model.config.embed_dim, device=self._device())
        return torch.stack([self._memory[n] for n in names]).to(self._device())

    def cache_key(self, names: Sequence[str]) -> str:
        """The file stem that embeddings of `names` (in any order) are stored under."""
        if self._weights_digest is None:
            self._weights_digest = _text_weights_digest(self.model.clip)
        key = {
            "weights": self._weights_digest,
            "tower": self.model.config.text_tower_key(),
            "templates": list(self.templates),
            "names": sorted(set(names)),
        }
        return "text-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def _device(self) -> torch.device:
        return self.model.clip.token_embedding.weight.device

    def _load_or_encode(self, names: list[str]) -> dict[str, torch.Tensor]:
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{self.cache_key(names)}.safetensors"
            if path.is_file():
                from safetensors.torch import load_file

                table = load_file(str(path), device=str(self._device()))["embeddings"]
                return dict(zip(names, table))
        table = self._encode(names)
        if path is not None:
            from safetensors.torch import save

            data = save({"embeddings": table.cpu().contiguous()}, metadata={"names": json.dumps(names)})
            with atomic_output(path, "wb", site="text_cache") as f:
                f.write(data)
        return dict(zip(names, table))

    @torch.no_grad()
    def _encode(self, names: list[str]) -> torch.Tensor:
        clip = self.model.clip
        texts = [t.format(n) for n in names for t in self.templates]
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = open_clip.tokenize(texts[start:start + self.batch_size], self.model.config.context_length)
            out.append(F.normalize(clip.encode_text(tokens.to(self._device())).float(), dim=-1))
        # Average each name's unit embeddings over templates, then back onto the sphere.
        per_name = torch.cat(out).view(len(names), len(self.templates), -1).mean(dim=1)
        return F.normalize(per_name, dim=-1)


def _text_weights_digest(clip: CLIP) -> str:
    h = hashlib.sha256()
    for name, t in sorted(clip.state_dict().items()):
        if name.startswith("visual.") or name.startswith("logit_"):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading CLIP weights
# ---------------------------------------------------------------------------------------------

# Not weights: metadata in OpenAI's TorchScript archives, and the text tower's causal mask,
# which TorchScript archives keep although open_clip rebuilds it.
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# The text tower's keys in open_clip's flat CLIP layout; CustomTextCLIP nests them under "text.".
_TEXT_KEYS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
# Weights the model holds but does not use: their absence from a checkpoint is harmless.
_UNUSED = ("logit_scale", "logit_bias")


@dataclass(frozen=True)
class LoadReport:
    """What `load_clip_weights` did: tensors loaded, resized, and keys it could not place."""

    loaded: int
    resized: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        if self.resized:
            parts.append(f"resized {', '.join(self.resized)}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({', '.join(self.missing[:5])})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({', '.join(self.unexpected[:5])})")
        return "; ".join(parts)


def load_clip_weights(model: MagicSegModel, path: str | Path, allow_missing: bool = False) -> LoadReport:
    """Fill `model.clip` from an open_clip/OpenAI checkpoint (.pt/.bin/.pth or .safetensors).

    Accepts a bare state dict or one under "state_dict" (open_clip's training checkpoints),
    "module."-prefixed keys, open_clip's CustomTextCLIP layout ("text." keys) and OpenAI's
    TorchScript archives. The visual positional embedding is interpolated to the model's patch
    grid. A checkpoint of another architecture raises UsageError; so do missing weights (a
    half-random backbone would train into plausible garbage) unless `allow_missing`. Keys the
    model has no place for are logged and reported.
    """
    path = Path(path)
    state = _normalise_keys(_read_state_dict(path))
    if "visual.conv1.weight" not in state or "visual.positional_embedding" not in state:
        raise UsageError(f"{path} is not an open_clip ViT CLIP checkpoint (it has no visual.conv1.weight)")

    target = model.clip.state_dict()
    resized = []
    pos = state["visual.positional_embedding"]
    if pos.shape != target["visual.positional_embedding"].shape and pos.dim() == 2:
        try:
            state["visual.positional_embedding"] = resize_positional_embedding(pos, model.config.grid)
        except ValueError as err:
            raise UsageError(f"{path}: {err}") from None
        new_shape = list(target["visual.positional_embedding"].shape)
        resized.append(f"visual.positional_embedding {list(pos.shape)} -> {new_shape}")

    mismatched = [k for k in state if k in target and state[k].shape != target[k].shape]
    missing = sorted(k for k in target if k not in state and k not in _UNUSED)
    unexpected = sorted(k for k in state if k not in target)
    # A different number of blocks shows up as missing or surplus blocks, not as shapes.
    extra_blocks = [k for k in missing + unexpected if ".resblocks." in k]
    if mismatched or extra_blocks:
        if mismatched:
            k = mismatched[0]
            example = f"{k} is {list(state[k].shape)} there, {list(target[k].shape)} here"
        else:
            example = f"{extra_blocks[0]} is {'missing' if extra_blocks[0] in missing else 'extra'}"
        cfg = model.config
        wanted = f"open_clip's {cfg.open_clip_model}" if cfg.open_clip_model else (
            f"a {cfg.layers}-layer, {cfg.width}-wide ViT/{cfg.patch_size} CLIP")
        raise UsageError(f"{path} holds a different CLIP architecture than the model ({example}); use weights of {wanted}")
    if missing and not allow_missing:
        raise UsageError(
            f"{path} lacks {len(missing)} weights the model needs (e.g. {missing[0]}); "
            "it is an incomplete checkpoint"
        )
    if unexpected:
        log.warning("%s: ignored %d weights the model has no place for: %s", path, len(unexpected),
                    ", ".join(unexpected[:10]))
    if missing:
        log.warning("%s: %d weights missing, left as initialised: %s", path, len(missing), ", ".join(missing[:10]))

    loadable = {k: v for k, v in state.items() if k in target}
    model.clip.load_state_dict(loadable, strict=False)
    return LoadReport(len(loadable), tuple(resized), tuple(missing), tuple(unexpected))


def _read_state_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    from magicseg_engine.safe_files import is_torchscript, load_torch_file, torchscript_tensors, why_unreadable

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if is_torchscript(path):
            # OpenAI released its CLIP weights as TorchScript archives; their tensors are read
            # without torch.jit.load, which would run the archive's code.
            obj = torchscript_tensors(path)
        else:
            obj = load_torch_file(path)
    except Exception as err:
        raise UsageError(f"cannot read checkpoint {path} ({why_unreadable(err)}); give open_clip's or OpenAI's "
                         "CLIP weights, or a .safetensors file") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise UsageError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _normalise_keys(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key in _NOT_WEIGHTS:
            continue
        # DataParallel/DDP wrappers, possibly nested.
        while key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("text.") and key[len("text."):].startswith(_TEXT_KEYS):
            key = key[len("text."):]
        out[key] = value
    return out


def text_tower_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's weights, renamed into open_clip's text-tower layout.

    `state` is the state dict of a `CLIPTextModel`, `CLIPTextModelWithProjection` or the text half
    of a `CLIPModel` (keys with or without the "text_model." level, which transformers 5 dropped).
    The per-head query, key and value projections become one packed `in_proj`; a model without a
    text projection gets the identity, so its pooled output is the embedding. A `MagicSegModel`
    built with the encoder's width, layers, heads, context length (`max_position_embeddings`) and
    activation (`quick_gelu` for "quick_gelu") then embeds text exactly as the encoder pools it.
    """
    def find(suffix: str) -> torch.Tensor:
        for prefix in ("text_model.", "", "model.text_model."):
            if prefix + suffix in state:
                return state[prefix + suffix]
        raise UsageError(f"the text encoder's weights have no {suffix}; is it a CLIP text model?")

    out = {"token_embedding.weight": find("embeddings.token_embedding.weight"),
           "positional_embedding": find("embeddings.position_embedding.weight"),
           "ln_final.weight": find("final_layer_norm.weight"), "ln_final.bias": find("final_layer_norm.bias")}
    layer = 0
    while any(k.endswith(f"encoder.layers.{layer}.self_attn.q_proj.weight") for k in state):
        src, dst = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [find(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")])
            for theirs, ours in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{ours}.{kind}"] = find(f"{src}{theirs}.{kind}")
        layer += 1
    if layer == 0:
        raise UsageError("the text encoder's weights have no encoder layers; is it a CLIP text model?")
    projection = next((v for k, v in state.items() if k.endswith("text_projection.weight")), None)
    width = out["ln_final.weight"].shape[0]
    # open_clip multiplies by its projection (x @ P); a Linear's weight is P transposed.
    out["text_projection"] = projection.T.contiguous() if projection is not None else torch.eye(width)
    return {k: v.detach().clone() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Optimiser parameter groups
# ---------------------------------------------------------------------------------------------


def param_groups(
    model: MagicSegModel, lr: float, weight_decay: float, head_lr_mult: float = 10.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups over the trainable parameters, each exactly once.

    Prompts and decoder ("head") get `lr * head_lr_mult`, an unfrozen backbone `lr` (the
    reference: AdamW lr 2e-5, wd 0.01, x10 for prompts and head). Norms, biases, scalars,
    prompts and positional/class embeddings get no weight decay. Each group carries `name`
    and `lr_mult` so a scheduler can scale from a base rate.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel's wrapper
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if name.startswith("clip.") else "head"
        no_decay = (
            p.ndim < 2 or name == "prompts"
            or name.endswith(("positional_embedding", "class_embedding"))
        )
        buckets.setdefault((part, no_decay), []).append(p)
    groups = []
    for (part, no_decay), params in sorted(buckets.items()):
        mult = head_lr_mult if part == "head" else 1.0
        groups.append({
            "name": f"{part}{'_no_decay' if no_decay else ''}",
            "params": params,
            "lr": lr * mult,
            "lr_mult": mult,
            "weight_decay": 0.0 if no_decay else weight_decay,
        })
    return groups

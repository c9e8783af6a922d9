"""Segment Anything: the model per preset, and batched refinement of attention prompts into masks.

Every class of a generated image arrives with a box and positive/negative points taken from its
cross-attention map. SAM turns each such prompt into three candidate masks; the refiner keeps the
one that SAM rates highest, optionally pulled towards the attention mask itself.

Models come three ways, like the diffusion models: a tiny seeded-random SAM for tests and the
offline demo, the official ViT-B/L/H architectures with seeded random weights for throughput
runs, and the official ViT-B/L/H with a `.pth` checkpoint as Meta publishes them.

Throughput comes from encoding a chunk of images in one image-encoder call and decoding all
prompts of an image in one prompt-encoder + mask-decoder call. `SamRefiner.refine_one_by_one`
computes the same result with `SamPredictor`, one image and one prompt at a time: the reference
the batched path is tested against, and the baseline it is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from magicseg_engine.engine.backends import SamRunners, sam_torch_runners
from magicseg_engine.errors import UsageError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

MODEL_TYPES = ("tiny", "vit_b", "vit_l", "vit_h")

# Small enough that a batch of 64x64 images is refined in milliseconds per image on a CPU, yet
# built from SAM's own modules (windowed and global attention with relative positions, the
# two-way transformer, three multimask outputs) so the refiner meets the real structure.
TINY_SAM: dict[str, Any] = {
    "image_size": 128,
    "patch_size": 8,  # a 16x16 image embedding; low-resolution masks are 64x64
    "encoder_embed_dim": 64,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_window_size": 8,
    "encoder_global_attn_indexes": (1,),
    "prompt_embed_dim": 64,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 256,
    "decoder_num_heads": 4,
    "iou_head_hidden_dim": 64,
}

# Image-encoder width and depth tell the variants apart in a state dict.
_ENCODER_SHAPES: dict[str, tuple[int, int]] = {
    "tiny": (TINY_SAM["encoder_embed_dim"], TINY_SAM["encoder_depth"]),
    "vit_b": (768, 12),
    "vit_l": (1024, 24),
    "vit_h": (1280, 32),
}

# The names Meta publishes the checkpoints under, to point users at the right file.
_OFFICIAL_FILES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}

# Sam's defaults, which every registry build uses too.
_PIXEL_MEAN = (123.675, 116.28, 103.53)
_PIXEL_STD = (58.395, 57.12, 57.375)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- building -----------------------------------------------------------------------------


def build_sam(
    model_type: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Sam:
    """SAM of `model_type` on `device`, in eval mode and frozen.

    With `checkpoint`, the official-format state dict at that path is loaded (any mismatch is a
    UsageError naming the expected model type and, when recognisable, the one the file holds).
    Without it the weights are random, drawn from `seed` alone: the same seed gives the same
    tiny model on every device (it is drawn on the CPU); the full-size ones are drawn where
    they will run, to skip a multi-gigabyte CPU detour.

    `dtype` applies to the image encoder, where nearly all the compute is. The prompt encoder
    and mask decoder stay in float32: the prompt encoder's random-Fourier positional encoding
    is written for float32 coordinates and fails in half precision. Hooks cast the encoder's
    input and output, so it still takes and gives float32 to the rest of SAM and to
    `SamPredictor`.
    """
    if model_type not in MODEL_TYPES:
        raise UsageError(f"unknown SAM model type {model_type!r}; choose one of: {', '.join(MODEL_TYPES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, _DTYPES))}, got {dtype}")
    device = torch.device(device)

    if checkpoint is not None:
        state = _read_checkpoint(Path(checkpoint).expanduser(), model_type)
        # Built without memory and then handed the loaded tensors: no random initialisation of
        # 640M parameters that would be overwritten, and no second copy of the weights.
        with torch.device("meta"):
            sam = _construct(model_type)
        _check_fits(sam, state, Path(checkpoint), model_type)
        sam.load_state_dict(state, strict=True, assign=True)
        _restore_pixel_statistics(sam)
    else:
        init_device = torch.device("cpu") if model_type == "tiny" else device
        # A private RNG stream: the weights depend on `seed` alone, and callers' random state is untouched.
        with torch.random.fork_rng(devices=_rng_devices()):
            torch.manual_seed(seed)
            with init_device:
                sam = _construct(model_type)
            _randomise_positions(sam)
        _restore_pixel_statistics(sam)

    sam.to(device=device, dtype=torch.float32)
    if dtype is not torch.float32:
        sam.image_encoder.to(dtype=dtype)
        sam.image_encoder.register_forward_pre_hook(_cast_to_encoder_dtype)
        sam.image_encoder.register_forward_hook(_cast_to_float32)
    sam.eval()
    sam.requires_grad_(False)
    return sam


def _construct(model_type: str) -> Sam:
    from segment_anything import sam_model_registry

    if model_type != "tiny":
        # The registry's own builders, so the architecture is exactly the published one.
        return sam_model_registry[model_type]()
    return _construct_tiny()


def _construct_tiny() -> Sam:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    c = TINY_SAM
    size, dim = c["image_size"], c["prompt_embed_dim"]
    grid = size // c["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=c["encoder_depth"],
            embed_dim=c["encoder_embed_dim"],
            img_size=size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=c["encoder_num_heads"],
            patch_size=c["patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=c["encoder_global_attn_indexes"],
            window_size=c["encoder_window_size"],
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(size, size),
            mask_in_chans=c["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=c["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=c["decoder_mlp_dim"],
                num_heads=c["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=c["iou_head_hidden_dim"],
        ),
        pixel_mean=list(_PIXEL_MEAN),
        pixel_std=list(_PIXEL_STD),
    )


@torch.no_grad()
def _randomise_positions(sam: Sam) -> None:
    # SAM zero-initialises its absolute and relative position tables (training fills them).
    # Left at zero, a random image encoder would ignore where things are, and every mask would
    # depend on position only through the prompts.
    for name, param in sam.image_encoder.named_parameters():
        if name == "pos_embed" or name.endswith(("rel_pos_h", "rel_pos_w")):
            torch.nn.init.trunc_normal_(param, std=0.02)


def _restore_pixel_statistics(sam: Sam) -> None:
    # Sam keeps them as non-persistent buffers: a state dict never carries them, so a model
    # built on the meta device must get them here if they were created there.
    for name, values in (("pixel_mean", _PIXEL_MEAN), ("pixel_std", _PIXEL_STD)):
        if getattr(sam, name).is_meta:
            sam.register_buffer(name, torch.tensor(values).view(-1, 1, 1), persistent=False)


def _rng_devices() -> list[int]:
    # torch.manual_seed reseeds every GPU too, wherever the weights are drawn.
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _cast_to_encoder_dtype(module: torch.nn.Module, args: tuple) -> tuple:
    dtype = module.patch_embed.proj.weight.dtype
    return (args[0].to(dtype), *args[1:])


def _cast_to_float32(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float()


# --- checkpoints --------------------------------------------------------------------------


def _expected_file(model_type: str) -> str:
    official = _OFFICIAL_FILES.get(model_type)
    if official:
        return f"a {model_type} state dict such as {official}"
    # The one tiny checkpoint users meet is the shapes preset's, shipped with the package.
    return ("a tiny state dict such as `magicseg-engine train-world-sam` writes (the shapes preset's "
            "ships with the package: reinstall magicseg-engine if it is missing)")


def _read_checkpoint(path: Path, model_type: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UsageError(f"SAM checkpoint {path} does not exist; expected {_expected_file(model_type)}")
    if path.is_dir():
        raise UsageError(f"SAM checkpoint {path} is a folder; expected {_expected_file(model_type)}")
    from magicseg_engine.safe_files import load_torch_file, why_unreadable

    try:
        # Weights only: a checkpoint is data, and unpickling arbitrary objects could run code.
        state = load_torch_file(path)
    except Exception as err:
        raise UsageError(
            f"cannot read SAM checkpoint {path} ({why_unreadable(err)}); expected {_expected_file(model_type)}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UsageError(
            f"SAM checkpoint {path} is not a state dict of tensors; expected {_expected_file(model_type)}"
        )
    return state


def _encoder_shape(state: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(patch-embedding width, number of encoder blocks) of a SAM state dict, None if it has none."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None or weight.dim() != 4:
        return None
    prefix = "image_encoder.blocks."
    blocks = {k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return int(weight.shape[0]), len(blocks)


def _held_model_type(state: dict[str, torch.Tensor]) -> str | None:
    shape = _encoder_shape(state)
    return next((name for name, known in _ENCODER_SHAPES.items() if known == shape), None)


def _check_fits(sam: Sam, state: dict[str, torch.Tensor], path: Path, model_type: str) -> None:
    expected = sam.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong_shape):
        return
    shape = _encoder_shape(state)
    held = _held_model_type(state)
    if held is not None and held != model_type:
        raise UsageError(
            f"SAM checkpoint {path} holds a {held} model (image encoder {shape[0]} wide, {shape[1]} blocks), "
            f"not the {model_type} asked for; use model type {held} or {_expected_file(model_type)}"
        )
    example = (missing or unexpected or wrong_shape)[0]
    if shape is None:
        what = "it has no SAM image encoder"
    elif held is None:
        what = f"it holds an unknown SAM variant (image encoder {shape[0]} wide, {shape[1]} blocks)"
    else:
        what = "it looks truncated or edited"
    raise UsageError(
        f"SAM checkpoint {path} does not fit model type {model_type}: {len(missing)} weights missing, "
        f"{len(unexpected)} unexpected and {len(wrong_shape)} of the wrong shape (e.g. {example}); {what}"
    )


# --- refinement ---------------------------------------------------------------------------


@dataclass
class RefinedMasks:
    masks: torch.Tensor  # [B, C, H, W] bool at the input image size
    scores: torch.Tensor  # [B, C] float: the chosen mask's predicted IoU (0 where the class had no prompt)
    agreement: torch.Tensor  # [B, C] float: IoU between the chosen mask and the attention mask given (0 where none)


@dataclass
class _Inputs:
    images: np.ndarray  # [B, H, W, 3] uint8
    boxes: np.ndarray  # [B, C, 4] float64, original pixels
    has_box: np.ndarray  # [B, C] bool
    points: np.ndarray  # [B, C, P, 2] float64, original pixels
    labels: np.ndarray  # [B, C, P] int32, -1 = padding
    attention: torch.Tensor | None  # [B, C, H, W] bool on the model's device

    def prompt(self, b: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The valid points, their labels and the box (None if absent) of class c of image b."""
        valid = self.labels[b, c] != -1
        return self.points[b, c][valid], self.labels[b, c][valid], self.boxes[b, c] if self.has_box[b, c] else None


class SamRefiner:
    """Refines per-class boxes and points into masks with SAM, batched over images and classes.

    Images are resized with ResizeLongestSide's own `apply_image` (the transform SAM expects,
    and the one SamPredictor uses) and encoded `image_batch_size` at a time. The prompts of an
    image are decoded together, in one prompt-encoder + mask-decoder call (see below for the
    one exception). SAM gives three candidate masks
    per prompt; the one maximising `(1 - w) * predicted_iou + w * IoU(mask, attention_mask)`
    is kept, w = `agreement_weight` (predicted IoU alone when no attention masks are given).

    A prompt is a class's valid points (label 1 positive, 0 negative; -1 is padding and is
    dropped) followed by its box (absent when all four coordinates are -1), exactly what
    SamPredictor would be given for it. The mask decoder attends over all prompt tokens and
    has no padding mask, so prompts of one call must have the same number of tokens to give
    the masks SAM gives for each alone. So an image whose prompts differ in layout (number of
    valid points, box or not) gets one call per layout instead; with the usual box and fixed
    number of points per class, that is one call per image.

    Results (masks, scores, agreement) are on the model's device.
    """

    def __init__(self, sam: Sam, *, image_batch_size: int = 8, agreement_weight: float = 0.5,
                 runners: SamRunners | None = None) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        if image_batch_size < 1:
            raise ValueError(f"image_batch_size must be at least 1, got {image_batch_size}")
        if not 0.0 <= agreement_weight <= 1.0:
            raise ValueError(f"agreement_weight must be in [0, 1], got {agreement_weight}")
        self.sam = sam
        self.image_batch_size = int(image_batch_size)
        self.agreement_weight = float(agreement_weight)
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        # Image encoder and mask decoder calls: torch by default, or an exported backend's.
        self.runners = runners or sam_torch_runners(sam)

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @torch.inference_mode()
    def __call__(
        self,
        images: np.ndarray | torch.Tensor,
        boxes: torch.Tensor,
        points: torch.Tensor,
        point_labels: torch.Tensor,
        attention_masks: torch.Tensor | None = None,
    ) -> RefinedMasks:
        """Masks for every class of every image.

        images [B, H, W, 3] uint8 RGB; boxes [B, C, 4] (x0, y0, x1, y1) pixels, all -1 for no
        box; points [B, C, P, 2] (x, y) pixels with point_labels [B, C, P] (1 positive, 0
        negative, -1 padding); attention_masks [B, C, H, W] bool, optional. A class with
        neither a box nor a valid point gets an empty mask and zero scores.
        """
        x = _normalise(images, boxes, points, point_labels, attention_masks, self.device)
        n_images, height, width = x.images.shape[:3]
        n_classes = x.boxes.shape[1]
        original_size = (height, width)
        result = _empty_result(n_images, n_classes, original_size, self.device)
        # Into the encoder's input frame, with ResizeLongestSide's own float64 arithmetic as
        # SamPredictor does it, so the prompts are bit-identical to the one-by-one reference.
        points_in = self.transform.apply_coords(x.points, original_size)
        boxes_in = self.transform.apply_coords(x.boxes.reshape(n_images, n_classes, 2, 2), original_size)
        boxes_in = boxes_in.reshape(n_images, n_classes, 4)
        inputs_in = _Inputs(x.images, boxes_in, x.has_box, points_in, x.labels, x.attention)

        for start in range(0, n_images, self.image_batch_size):
            chunk = range(start, min(n_images, start + self.image_batch_size))
            embeddings, input_size = self._encode(x.images[chunk.start : chunk.stop])
            for i, b in enumerate(chunk):
                self._refine_image(embeddings[i : i + 1], input_size, original_size, inputs_in, b, result)
        return result

    def _encode(self, images: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        resized = np.stack([self.transform.apply_image(image) for image in images])
        pixels = torch.as_tensor(resized, device=self.device).permute(0, 3, 1, 2)
        input_size = tuple(pixels.shape[-2:])
        return self.runners.encode_images(self.sam.preprocess(pixels)), input_size

    def _refine_image(
        self,
        embedding: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        x: _Inputs,
        b: int,
        result: RefinedMasks,
    ) -> None:
        sam = self.sam
        layouts: dict[tuple[int, bool], list[int]] = {}
        for c in range(x.boxes.shape[1]):
            n_points = int((x.labels[b, c] != -1).sum())
            if n_points or x.has_box[b, c]:
                layouts.setdefault((n_points, bool(x.has_box[b, c])), []).append(c)
        if not layouts:
            return

        classes: list[int] = []
        low_res, iou_pred = [], []
        for (n_points, has_box), group in layouts.items():
            prompts = [x.prompt(b, c) for c in group]
            point_prompt = None
            if n_points:
                coords = torch.as_tensor(np.stack([p[0] for p in prompts]), dtype=torch.float, device=self.device)
                labels = torch.as_tensor(np.stack([p[1] for p in prompts]), dtype=torch.int, device=self.device)
                point_prompt = (coords, labels)
            box_prompt = None
            if has_box:
                box_prompt = torch.as_tensor(np.stack([p[2] for p in prompts]), dtype=torch.float, device=self.device)
            sparse, dense = sam.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=None)
            masks, iou = self.runners.decode_masks(embedding, sparse, dense)
            classes += group
            low_res.append(masks)
            iou_pred.append(iou)
        low_res_all, iou_all = torch.cat(low_res), torch.cat(iou_pred)
        rows = torch.arange(len(classes), device=self.device)

        if x.attention is None:
            # Only the chosen mask needs upscaling when the choice does not look at the masks.
            choice = iou_all.argmax(dim=1)
            chosen_logits = sam.postprocess_masks(low_res_all[rows, choice][:, None], input_size, original_size)
            chosen = chosen_logits[:, 0] > sam.mask_threshold
            agreement = torch.zeros(len(classes), device=self.device)
        else:
            candidates = sam.postprocess_masks(low_res_all, input_size, original_size) > sam.mask_threshold
            choice, agreement_all = choose_masks(
                iou_all, candidates, x.attention[b, classes], self.agreement_weight
            )
            chosen = candidates[rows, choice]
            agreement = agreement_all[rows, choice]
        result.masks[b, classes] = chosen
        result.scores[b, classes] = iou_all[rows, choice]
        result.agreement[b, classes] = agreement

    @torch.inference_mode()
    def refine_one_by_one(
        self,
        images: np.ndarray | torch.Tensor,
        boxes: torch.Tensor,
        points: torch.Tensor,
        point_labels: torch.Tensor,
        attention_masks: torch.Tensor | None = None,
    ) -> RefinedMasks:
        """What `__call__` computes, the slow way: SamPredictor, one image and one prompt at a time."""
        from segment_anything import SamPredictor

        x = _normalise(images, boxes, points, point_labels, attention_masks, self.device)
        n_images, height, width = x.images.shape[:3]
        n_classes = x.boxes.shape[1]
        result = _empty_result(n_images, n_classes, (height, width), self.device)
        predictor = SamPredictor(self.sam)
        for b in range(n_images):
            predictor.set_image(x.images[b], image_format="RGB")
            for c in range(n_classes):
                coords, labels, box = x.prompt(b, c)
                if not len(coords) and box is None:
                    continue
                masks, iou, _ = predictor.predict(
                    point_coords=coords if len(coords) else None,
                    point_labels=labels if len(coords) else None,
                    box=box,
                    multimask_output=True,
                )
                candidates = torch.as_tensor(masks, device=self.device)[None]
                iou_pred = torch.as_tensor(iou, device=self.device)[None]
                if x.attention is None:
                    choice = int(iou_pred.argmax(dim=1))
                    agreement = 0.0
                else:
                    choices, agreement_all = choose_masks(
                        iou_pred, candidates, x.attention[b, c][None], self.agreement_weight
                    )
                    choice = int(choices[0])
                    agreement = float(agreement_all[0, choice])
                result.masks[b, c] = candidates[0, choice]
                result.scores[b, c] = iou_pred[0, choice]
                result.agreement[b, c] = agreement
        return result


def choose_masks(
    iou_pred: torch.Tensor, candidates: torch.Tensor, attention: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, the index of the candidate maximising `(1-w)*iou_pred + w*IoU(candidate, attention)`.

    iou_pred [N, K] float; candidates [N, K, H, W] bool; attention [N, H, W] bool. Returns the
    indices [N] (the first one on ties) and the IoUs with the attention mask [N, K] (0 where
    both masks are empty).
    """
    a = attention[:, None]
    inter = (candidates & a).flatten(2).sum(-1).float()
    union = (candidates | a).flatten(2).sum(-1).float()
    agreement = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
    score = (1.0 - weight) * iou_pred.float() + weight * agreement
    return score.argmax(dim=1), agreement


def _empty_result(n_images: int, n_classes: int, size: tuple[int, int], device: torch.device) -> RefinedMasks:
    return RefinedMasks(
        masks=torch.zeros((n_images, n_classes, *size), dtype=torch.bool, device=device),
        scores=torch.zeros((n_images, n_classes), dtype=torch.float32, device=device),
        agreement=torch.zeros((n_images, n_classes), dtype=torch.float32, device=device),
    )


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _normalise(
    images: Any, boxes: Any, points: Any, point_labels: Any, attention_masks: Any, device: torch.device
) -> _Inputs:
    images = _as_numpy(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be [B, H, W, 3] uint8, got {list(images.shape)} {images.dtype}")
    n_images, height, width = images.shape[:3]
    boxes = _as_numpy(boxes).astype(np.float64)
    if boxes.ndim != 3 or boxes.shape[0] != n_images or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be [B={n_images}, C, 4], got {list(boxes.shape)}")
    n_classes = boxes.shape[1]
    points = _as_numpy(points).astype(np.float64)
    labels = _as_numpy(point_labels)
    if points.ndim != 4 or points.shape[:2] != (n_images, n_classes) or points.shape[3] != 2:
        raise ValueError(f"points must be [B={n_images}, C={n_classes}, P, 2], got {list(points.shape)}")
    if labels.shape != points.shape[:3]:
        raise ValueError(f"point_labels must be [B, C, P] = {list(points.shape[:3])}, got {list(labels.shape)}")
    if labels.size and not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError("point_labels must be 1 (positive), 0 (negative) or -1 (padding)")
    attention = None
    if attention_masks is not None:
        attention = torch.as_tensor(attention_masks, device=device)
        if tuple(attention.shape) != (n_images, n_classes, height, width):
            raise ValueError(
                f"attention_masks must be [B, C, H, W] = {[n_images, n_classes, height, width]}, "
                f"got {list(attention.shape)}"
            )
        attention = attention.bool()
    has_box = ~(boxes == -1).all(axis=-1)
    return _Inputs(np.ascontiguousarray(images), boxes, has_box, points, labels.astype(np.int32), attention)

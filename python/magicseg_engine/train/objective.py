"""What pretraining minimises: candidate classes per image, mask losses after every decoder
layer, and the counterfactual hinge between an image and its twin.

Candidates: each image is scored against its own 1-2 classes plus vocabulary classes drawn at
random, K in all (the whole vocabulary when it is smaller), so the model learns to say "not
this class" as well as "this class". Labels are remapped per image from the mask's class
numbers to positions among its candidates.

Mask losses run at 1/`stride` of the crop (4 by default: 128x128 for 512 crops). The model's
logits are at patch resolution (1/16); they are upsampled bilinearly to the loss grid, which
equals upsampling the pixel embeddings, since a logit is linear in its pixel embedding. So the
fused kernel receives upsampled embeddings and never materialises the [B, K, P] logits. The
logit scale is folded into the pixel embeddings so that it keeps its gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from magicseg_engine.kernels.counterfactual_loss import counterfactual_loss
from magicseg_engine.kernels.segmentation_loss import segmentation_losses
from magicseg_engine.train.data import IGNORE_INDEX

BACKGROUND = -1  # negative for every candidate
IGNORE = -100  # counts for nothing; outside any candidate index, however many there are


@dataclass(frozen=True)
class LossWeights:
    """The reference recipe's weights: focal 100, dice 1, per decoder layer; hinge 1 at margin 0."""

    focal: float = 100.0
    dice: float = 1.0
    counterfactual: float = 1.0
    margin: float = 0.0


def sample_candidates(classes: Sequence[Sequence[str]], vocabulary: Mapping[str, int], k: int,
                      rng: np.random.Generator) -> torch.Tensor:
    """[B, K] vocabulary indices: each image's own classes first, then others drawn without repeats.

    K is min(k, vocabulary size), the same for every image, so the batch needs no padding.
    """
    v = len(vocabulary)
    k = min(k, v)
    rows = []
    for names in classes:
        own = list(dict.fromkeys(vocabulary[n] for n in names))
        if len(own) > k:
            raise ValueError(f"an image has {len(own)} classes but only {k} candidates are drawn; raise k")
        others = np.setdiff1d(np.arange(v), own, assume_unique=False)
        rows.append(own + rng.choice(others, size=k - len(own), replace=False).tolist())
    return torch.tensor(rows, dtype=torch.long)


def remap_labels(mask: torch.Tensor, classes: Sequence[Sequence[str]], candidates: torch.Tensor,
                 vocabulary: Mapping[str, int]) -> torch.Tensor:
    """Mask class numbers (0 background, i = i-th class, 255 ignore) → candidate positions.

    Returns int32 labels of mask's shape: a position in [0, K), BACKGROUND, or IGNORE.
    """
    b = mask.shape[0]
    table = torch.full((b, 256), BACKGROUND, dtype=torch.int32)
    table[:, IGNORE_INDEX] = IGNORE
    for i, names in enumerate(classes):
        position = {int(c): j for j, c in enumerate(candidates[i].tolist())}
        for number, name in enumerate(names, start=1):
            table[i, number] = position[vocabulary[name]]
    table = table.to(mask.device)
    return torch.gather(table, 1, mask.reshape(b, -1).long()).reshape(mask.shape)


def loss_grid_labels(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """Labels at 1/stride resolution, [B, P]: the centre pixel of each stride x stride cell."""
    sub = labels[:, stride // 2::stride, stride // 2::stride]
    return sub.reshape(sub.shape[0], -1).contiguous()


def upsample_pixels(pixels: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Pixel embeddings [B, h*w, E] on the patch grid → [B, H*W, E] at `size`, bilinear."""
    b, _, e = pixels.shape
    x = pixels.transpose(1, 2).reshape(b, e, *grid)
    if tuple(size) != tuple(grid):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def micro_batch_shares(masks: Sequence[torch.Tensor], stride: int) -> list[tuple[float, float]]:
    """(pixel share, image share) of each micro-batch of one optimiser step, from its masks [B, S, S].

    The focal term is a mean over the loss grid's non-ignored pixels and the dice and hinge
    terms are means over images. Weighting each micro-batch's means by its share of those
    pixels and images (instead of 1 / micro-batches) makes an accumulated step the gradient of
    one batch holding all of them: crops padded with ignore pixels make micro-batches' pixel
    counts unequal, and an epoch's last batch may hold fewer images. One micro-batch: (1, 1).
    """
    pixels = [int((loss_grid_labels(m, stride) != IGNORE_INDEX).sum()) for m in masks]
    images = [int(m.shape[0]) for m in masks]
    n = len(masks)
    total_pixels, total_images = sum(pixels), sum(images)
    return [(p / total_pixels if total_pixels else 1.0 / n, i / total_images if total_images else 1.0 / n)
            for p, i in zip(pixels, images)]


def pretraining_losses(outputs: dict, labels: torch.Tensor, weights: LossWeights, *, stride: int = 4,
                       use_triton: bool | None = None, pixel_share: float = 1.0,
                       image_share: float = 1.0) -> dict[str, torch.Tensor]:
    """Weighted mask losses summed over decoder layers, plus the counterfactual hinge.

    `outputs` is MagicSegModel's forward (with twins for the hinge); `labels` [B, S, S] from
    remap_labels. Returns "loss" (what to minimise) and its float32 parts, the parts as this
    batch's own means. In "loss" the focal term is multiplied by `pixel_share` and the dice and
    hinge terms by `image_share`: a micro-batch's shares of its step (`micro_batch_shares`).
    """
    target = loss_grid_labels(labels, stride)
    size = (len(range(stride // 2, labels.shape[1], stride)), len(range(stride // 2, labels.shape[2], stride)))
    scale = outputs["logit_scale"]
    upsampled: dict[int, torch.Tensor] = {}
    focal = dice = torch.zeros((), device=labels.device)
    for pixels, classes in outputs["layers"]:
        # The decoder layers share one pixel embedding: upsample it once.
        up = upsampled.get(id(pixels))
        if up is None:
            up = upsampled[id(pixels)] = upsample_pixels(pixels, outputs["grid"], size) * scale
        f, d = segmentation_losses(up, classes, target, logit_scale=1.0, ignore_index=IGNORE,
                                   use_triton=use_triton)
        focal = focal + f
        dice = dice + d
    parts = {"focal": focal, "dice": dice}
    loss = weights.focal * pixel_share * focal + weights.dice * image_share * dice
    if outputs.get("twin_global_embedding") is not None:
        hinge = counterfactual_loss(outputs["global_embedding"], outputs["twin_global_embedding"],
                                    margin=weights.margin, use_triton=use_triton)
        parts["counterfactual"] = hinge
        loss = loss + weights.counterfactual * image_share * hinge
    return {"loss": loss, **{k: v.detach().float() for k, v in parts.items()}}

"""Label maps from a pretrained model, and their mean IoU against ground truth.

A pixel takes the candidate class with the highest mask logit when its probability passes
`threshold`, else background (0); class c of the vocabulary is label c + 1. The IoU is
torchmetrics' multiclass Jaccard index over background plus the vocabulary, ignoring
IGNORE_INDEX pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from magicseg_engine.train.data import IGNORE_INDEX


@torch.no_grad()
def label_maps(model, images: torch.Tensor, text: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """[B, H, W] int64 labels (0 background, c + 1 = vocabulary class c) for normalised `images`."""
    logits = model.predict(images, text, tuple(images.shape[-2:]))  # [B, V, H, W]
    best, index = logits.max(dim=1)
    return torch.where(torch.sigmoid(best) > threshold, index + 1, torch.zeros_like(index))


def vocabulary_labels(mask: torch.Tensor, classes: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> torch.Tensor:
    """A batch's masks (i = i-th class of the sample) as vocabulary labels (c + 1), 255 kept."""
    where = {name: i + 1 for i, name in enumerate(vocabulary)}
    out = torch.zeros_like(mask)
    out[mask == IGNORE_INDEX] = IGNORE_INDEX
    for b, names in enumerate(classes):
        for number, name in enumerate(names, start=1):
            out[b][mask[b] == number] = where[name]
    return out


@torch.no_grad()
def mean_iou(model, batches: Iterable[dict], text: torch.Tensor, vocabulary: Sequence[str],
             threshold: float = 0.5) -> dict:
    """mIoU over background + vocabulary of `model` on loader batches, and per-class IoU."""
    from torchmetrics.classification import MulticlassJaccardIndex

    device = text.device
    metric = MulticlassJaccardIndex(num_classes=len(vocabulary) + 1, ignore_index=IGNORE_INDEX,
                                    average="none").to(device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            predicted = label_maps(model, batch["image"].to(device), text, threshold)
            metric.update(predicted, vocabulary_labels(batch["mask"], batch["classes"], vocabulary).to(device))
    finally:
        model.train(was_training)
    per_class = metric.compute().cpu()
    names = ["background", *vocabulary]
    return {"miou": float(per_class.mean()), "iou": {n: float(v) for n, v in zip(names, per_class)}}

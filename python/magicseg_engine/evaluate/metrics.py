"""Segmentation metrics from a confusion matrix kept on the device.

`ConfusionMatrix.update` adds one batch of predictions with a single `bincount` where the
labels are (a GPU during evaluation), so nothing leaves the device until `compute`. The
numbers follow the usual benchmark definitions, which are also torchmetrics':

- IoU of class c = TP / (TP + FP + FN); a class absent from both ground truth and prediction
  has no IoU (None) and is left out of the mean, as torchmetrics' macro average does;
- pixel accuracy = correct pixels / labelled pixels; mean accuracy = mean over classes present
  in the ground truth of TP / (TP + FN);
- with a seen/unseen split (zero-shot papers), mIoU over each part and their harmonic mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ConfusionMatrix:
    """[C, C] int64 counts, rows = ground truth, columns = prediction; `ignore_index` pixels skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError("num_classes must be positive")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add predictions and targets of the same shape, both integer class labels."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {list(prediction.shape)} and target {list(target.shape)} differ in shape")
        prediction = prediction.to(self.matrix.device, torch.int64).reshape(-1)
        target = target.to(self.matrix.device, torch.int64).reshape(-1)
        keep = target != self.ignore_index
        prediction, target = prediction[keep], target[keep]
        c = self.num_classes
        if target.numel() and (int(target.max()) >= c or int(target.min()) < 0):
            raise ValueError(f"target labels must be in 0..{c - 1} or {self.ignore_index}")
        if prediction.numel() and (int(prediction.max()) >= c or int(prediction.min()) < 0):
            raise ValueError(f"predicted labels must be in 0..{c - 1}")
        self.matrix += torch.bincount(target * c + prediction, minlength=c * c).view(c, c)

    def compute(self, names: Sequence[str] | None = None, unseen: Sequence[str] = ()) -> dict:
        """Scores as plain Python numbers; see the module docstring. `names` label the classes."""
        m = self.matrix.double().cpu()
        names = list(names) if names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} names for {self.num_classes} classes")
        tp = m.diag()
        gt = m.sum(1)
        pred = m.sum(0)
        union = gt + pred - tp
        iou = [float(tp[i] / union[i]) if union[i] > 0 else None for i in range(self.num_classes)]
        acc = [float(tp[i] / gt[i]) if gt[i] > 0 else None for i in range(self.num_classes)]
        labelled = float(m.sum())
        result = {
            "miou": _mean(iou),
            "pixel_accuracy": float(tp.sum()) / labelled if labelled else None,
            "mean_accuracy": _mean(acc),
            "pixels": int(labelled),
            "iou": dict(zip(names, iou)),
            "accuracy": dict(zip(names, acc)),
        }
        if unseen:
            unknown = sorted(set(unseen) - set(names))
            if unknown:
                raise ValueError(f"unseen classes not among the scored classes: {', '.join(unknown)}")
            # Background is neither seen nor unseen: zero-shot splits name object classes only.
            seen_names = [n for n in names if n not in set(unseen) and n != "background"]
            seen_miou = _mean([result["iou"][n] for n in seen_names])
            unseen_miou = _mean([result["iou"][n] for n in unseen])
            result["seen_miou"] = seen_miou
            result["unseen_miou"] = unseen_miou
            result["harmonic_miou"] = harmonic_mean(seen_miou, unseen_miou)
            result["unseen"] = list(unseen)
        return result


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None

"""Images + cross-attention maps → per-class label maps, boxes, scores and a counterfactual check.

For each pair: the positive's attention maps give a first mask per class and the box and
points that prompt SAM; SAM's masks are cleaned (small regions and holes, in C++) and merged
into one label map. The negative's maps — the negative image read against the positive's
class tokens — say how much of each class the counterfactual still shows: little, for a good
pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from magicseg_engine import ops
from magicseg_engine.config import MaskConfig
from magicseg_engine.kernels.mask_extract import SamPrompts, extract_masks, normalisation_params, normalise_maps
from magicseg_engine.masks.detector import Detections, GroundingDetector
from magicseg_engine.masks.sam import SamRefiner


@dataclass
class PairAnnotation:
    label_map: np.ndarray  # [H, W] uint8: 0 background, i + 1 the i-th class of the pair
    classes: list[dict] = field(default_factory=list)
    counterfactual: dict = field(default_factory=dict)
    maps: torch.Tensor | None = None  # [2, C, h, w]: the attention maps the masks came from

    def metadata(self) -> dict:
        return {"classes": self.classes, "counterfactual": self.counterfactual}


def class_validity(maps: torch.Tensor, classes: list[tuple[str, ...]]) -> torch.Tensor:
    """[B, C] bool: the class exists for that pair and its tokens drew some attention."""
    valid = torch.zeros(maps.shape[0], maps.shape[2], dtype=torch.bool)
    for b, names in enumerate(classes):
        valid[b, : len(names)] = True
    return valid & (maps[:, 0].flatten(2).amax(-1).cpu() > 0)


def attention_scores(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean normalised attention inside each mask, at map resolution: the score without SAM."""
    mins, scales = normalisation_params(maps)
    norm = normalise_maps(maps, mins, scales)
    small = F.interpolate(masks.float(), size=maps.shape[-2:], mode="area")
    return (norm * small).flatten(2).sum(-1) / small.flatten(2).sum(-1).clamp_min(1e-6)


def box_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] bool rectangles from [B, C, 4] boxes with exclusive ends (all -1: empty)."""
    H, W = size
    ys = torch.arange(H).view(1, 1, H, 1)
    xs = torch.arange(W).view(1, 1, 1, W)
    b = boxes.round().long().cpu()
    return ((ys >= b[..., 1, None, None]) & (ys < b[..., 3, None, None])
            & (xs >= b[..., 0, None, None]) & (xs < b[..., 2, None, None]))


def combine_prompts(attention: SamPrompts, detections: Detections, source: str) -> SamPrompts:
    """SAM prompts for the detector routes: detector boxes, with attention points or none."""
    found = detections.found.to(attention.boxes.device)
    det_boxes = detections.boxes.to(attention.boxes.device)
    if source == "detector":
        no_points = torch.full_like(attention.point_labels, -1)
        return SamPrompts(det_boxes, torch.zeros_like(attention.points), no_points)
    # attention+detector: a detector box where the detector found the class, else attention's.
    boxes = torch.where(found[..., None], det_boxes, attention.boxes)
    return SamPrompts(boxes, attention.points, attention.point_labels)


def counterfactual_above(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] bool on the maps' device: where the negative's attention, normalised by the
    positive's range and upsampled to `size`, is above the positive's threshold."""
    pos, neg = maps[:, 0].float(), maps[:, 1].float()
    mins, scales = normalisation_params(pos)
    neg_up = F.interpolate(normalise_maps(neg, mins, scales), size=tuple(size), mode="bilinear",
                           align_corners=False)
    return neg_up > thresholds.to(neg_up.device)[..., None, None]


def coverage_inside(above: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B, C] on the CPU: the fraction of each mask [B, C, H, W] where `above` holds."""
    masks = masks.to(above.device)
    inside = (above & masks).flatten(2).sum(-1).float()
    return (inside / masks.flatten(2).sum(-1).clamp_min(1)).cpu()


@dataclass
class DeviceAnnotations:
    """What `MaskAnnotator.on_device` hands to `MaskAnnotator.finish`: every part on the CPU."""

    classes: list[tuple[str, ...]]
    masks: np.ndarray  # [B, C, H, W]: the masks before clean-up (SAM's, attention's or the boxes)
    scores: torch.Tensor  # [B, C] float32
    agreement: torch.Tensor  # [B, C] float32
    valid: torch.Tensor  # [B, C] bool: the class has attention or a detector box
    above: torch.Tensor  # [B, C, H, W] bool: from `counterfactual_above`, for the coverage
    detector_scores: torch.Tensor | None = None  # [B, C] float32 on the detector routes


class MaskAnnotator:
    def __init__(self, config: MaskConfig, refiner: SamRefiner | None = None,
                 detector: GroundingDetector | None = None, use_triton: bool | None = None):
        if "detector" in config.source and detector is None:
            raise ValueError(f"mask source {config.source!r} needs a detector")
        self.config = config
        self.refiner = refiner if config.refine_with_sam else None
        self.detector = detector if "detector" in config.source else None
        self.use_triton = use_triton

    def __call__(self, positives: np.ndarray, maps: torch.Tensor | None, classes: list[tuple[str, ...]],
                 negatives: np.ndarray | None = None) -> list[PairAnnotation]:
        """`positives` [B, H, W, 3] uint8, `maps` [B, 2, C, h, w] from AttentionCapture.maps().

        Without maps (a run generated with --mask-source none), the detector route alone can
        annotate: it needs `negatives` [B, H, W, 3], on which the detector makes the
        counterfactual check that the negative's attention makes otherwise.
        """
        return self.finish(self.on_device(positives, maps, classes, negatives))

    def on_device(self, positives: np.ndarray, maps: torch.Tensor | None, classes: list[tuple[str, ...]],
                  negatives: np.ndarray | None = None) -> DeviceAnnotations:
        """The device half: masks, prompts, detector, SAM, scores and the counterfactual's
        comparison, on the maps' (and models') device; returns them on the CPU for `finish`."""
        cfg = self.config
        H, W = positives.shape[1:3]
        without_maps = maps is None
        if without_maps:
            if cfg.source != "detector" or negatives is None:
                raise ValueError("annotating without attention maps needs the detector route and the negatives")
            # No attention: every class is invalid until the detector finds it.
            maps = torch.zeros(len(positives), 2, max(map(len, classes), default=1), 8, 8, device=self._device())
        valid = class_validity(maps, classes).to(maps.device)
        pos_maps = maps[:, 0].float()
        extracted = extract_masks(pos_maps, valid, (H, W), cfg.threshold, cfg.positive_points,
                                  cfg.negative_points, use_triton=self.use_triton)
        masks, prompts = extracted.class_masks, extracted.prompts
        detections = None
        if self.detector is not None:
            detections = self.detector(positives, classes)
            prompts = combine_prompts(prompts, detections, cfg.source)
            found = detections.found.to(valid.device)
            valid = found if cfg.source == "detector" else valid | found
            if cfg.source == "detector":
                masks = box_masks(detections.boxes, (H, W)).to(masks.device)
        if self.refiner is not None:
            refined = self.refiner(positives, prompts.boxes, prompts.points, prompts.point_labels,
                                   attention_masks=extracted.class_masks)
            masks, scores, agreement = refined.masks, refined.scores.float().cpu(), refined.agreement.float().cpu()
        elif detections is not None and cfg.source == "detector":
            scores = detections.scores.float().cpu()
            agreement = torch.ones_like(scores)
        else:
            scores = attention_scores(pos_maps, masks).cpu()
            agreement = torch.ones_like(scores)
        if without_maps:
            # Where the detector still finds each class in the negative: its boxes stand in for
            # the negative's attention above threshold.
            absent = self.detector(negatives, classes)
            above = box_masks(absent.boxes, (H, W))
        else:
            # The float work of the coverage stays here, on the maps' device; `finish` only counts.
            above = counterfactual_above(maps, extracted.thresholds, (H, W)).cpu()
        return DeviceAnnotations(
            classes=list(classes), masks=masks.cpu().numpy(), scores=scores, agreement=agreement,
            valid=valid.cpu(), above=above,
            detector_scores=detections.scores.cpu() if detections is not None else None)

    def _device(self) -> torch.device:
        """Where the models run: SAM's device, else the CPU (the detector moves its inputs itself)."""
        if self.refiner is not None:
            return next(self.refiner.sam.parameters()).device
        return torch.device("cpu")

    def finish(self, part: DeviceAnnotations) -> list[PairAnnotation]:
        """The host half: C++ clean-up and merge, boxes, areas, coverage and the per-pair records.
        Touches no device, so it can run on any thread while the device works on the next batch."""
        cfg = self.config
        B, C, H, W = part.masks.shape
        area = H * W
        flat = part.masks.reshape(B * C, H, W)
        flat = ops.remove_small_regions(flat, round(cfg.min_region_fraction * area))
        flat = ops.fill_small_holes(flat, round(cfg.max_hole_fraction * area))
        cleaned = flat.reshape(B, C, H, W)
        labels = ops.merge_label_map(cleaned, part.scores.numpy(), part.valid.numpy(), rule=cfg.merge_rule)
        final = labels[:, None] == np.arange(1, C + 1, dtype=np.uint8)[None, :, None, None]
        boxes = ops.masks_to_boxes(final.reshape(B * C, H, W)).reshape(B, C, 4)
        areas = ops.mask_areas(final.reshape(B * C, H, W)).reshape(B, C)
        coverage = coverage_inside(part.above, torch.from_numpy(final))
        det = part.detector_scores
        return [self._pair(part.classes[b], labels[b], boxes[b], areas[b], part.scores[b], part.agreement[b],
                           part.valid[b], coverage[b], det[b] if det is not None else None)
                for b in range(B)]

    def _pair(self, names, label_map, boxes, areas, scores, agreement, valid, coverage,
              detector_scores) -> PairAnnotation:
        cfg = self.config
        per_class = []
        for c, name in enumerate(names):
            per_class.append({
                "name": name, "label": c + 1, "box": [int(v) for v in boxes[c]], "area": int(areas[c]),
                "score": round(float(scores[c]), 4), "attention_agreement": round(float(agreement[c]), 4),
                "found": bool(valid[c]), "empty": int(areas[c]) == 0,
                "counterfactual_coverage": round(float(coverage[c]), 4),
            })
            if detector_scores is not None:
                per_class[-1]["detector_score"] = round(float(detector_scores[c]), 4)
        present = [d for d in per_class if not d["empty"]]
        worst = max((d["counterfactual_coverage"] for d in present), default=1.0)
        check = {
            "max_coverage": worst,
            "quality": round(1.0 - worst, 4),
            "threshold": cfg.max_counterfactual_coverage,
            "passed": bool(present) and worst <= cfg.max_counterfactual_coverage,
            "reason": None if present and worst <= cfg.max_counterfactual_coverage
            else ("no class was found in the positive" if not present else "the negative still shows a class"),
        }
        return PairAnnotation(label_map, per_class, check)

"""The counterfactual check against answers known from geometry, not recomputed with its helpers.

Attention route. Maps are 8x8 cells, images 64x64, so the bilinear upsampling (align_corners
False) puts output column o at source position (o + 0.5) / 8 - 0.5. A stripe of value 1 over
cells [c0, c1) and the full height, 0 elsewhere, rises across the boundary between cells c0 - 1
and c0 as value = src - (c0 - 1); with the fixed threshold 0.5, value > 0.5 exactly from
o = 8 * c0 (value 0.5625; o = 8 * c0 - 1 gives 0.4375), and likewise it falls below 0.5 from
o = 8 * c1. So the positive's mask is columns [8 c0, 8 c1), all 64 rows, and a negative's
"still there" region is computed the same way from its own stripe. Full-height stripes keep
the rows out of it (a rectangle's bilinear corners would be products of two ramps).

A negative stripe of intensity a (relative to the positive's range) crosses 0.5 where
a * ramp > 0.5: for a = 0.6 the ramp must exceed 5/6, i.e. (o + 0.5) / 8 > c0 + 1/3, so o >= 8 c0 + 3
on the left and o <= 8 c1 - 4 on the right: 8 * width - 6 columns.

Detector route (no maps): a stub detector boxes the white pixels of each image, so the mask is
the positive's white rectangle and the coverage is the share of it that the negative's white
rectangle still covers: intersection area / rectangle area.

The pass rule is "covers at most max_counterfactual_coverage" of every class found (coverage
rounded to 4 decimals in the record), so each case is checked at its coverage exactly, and
0.001 below and above it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from magicseg_engine.config import MaskConfig
from magicseg_engine.masks.annotate import MaskAnnotator
from magicseg_engine.masks.detector import Detections

H = W = 64
CELLS = 8


def stripe(c0: int, c1: int, value: float = 1.0) -> torch.Tensor:
    """[8, 8] map: `value` over cells [c0, c1) of every row, 0 elsewhere."""
    m = torch.zeros(CELLS, CELLS)
    m[:, c0:c1] = value
    return m


def annotate(positive_maps, negative_maps, threshold=0.5, max_coverage=0.5):
    """One pair through the annotator, attention route, no SAM (the masks are the maps' own)."""
    config = MaskConfig(threshold=threshold, refine_with_sam=False, max_counterfactual_coverage=max_coverage)
    maps = torch.stack([torch.stack(positive_maps), torch.stack(negative_maps)])[None]  # [1, 2, C, 8, 8]
    names = tuple(f"class{i}" for i in range(len(positive_maps)))
    images = np.zeros((1, H, W, 3), np.uint8)
    (note,) = MaskAnnotator(config)(images, maps, [names])
    return note


# Positive: cells [2, 6) -> mask columns [16, 48), 32 columns x 64 rows.
POSITIVE = stripe(2, 6)
ATTENTION_CASES = [
    # (what the negative shows, its map, coverage from the geometry)
    ("identical to the positive", stripe(2, 6), 1.0),
    ("nothing at all", torch.zeros(CELLS, CELLS), 0.0),
    # Cells [3, 7) -> columns [24, 56): 24 of the 32 columns.
    ("moved right by one cell", stripe(3, 7), 24 / 32),
    # Cells [1, 5) -> columns [8, 40): 24 of 32.
    ("moved left by one cell", stripe(1, 5), 24 / 32),
    # Cells [4, 8) reach the right edge, where the upsampling repeats the last cell:
    # columns [32, 64), 16 of 32.
    ("moved right by two cells, to the edge", stripe(4, 8), 16 / 32),
    # Cells [6, 8) -> columns [48, 64): none of [16, 48). The object is elsewhere: the check
    # asks whether the class is still where the positive had it.
    ("moved off its place", stripe(6, 8), 0.0),
    # Cells [3, 5) -> columns [24, 40): 16 of 32.
    ("shrunk to half its width", stripe(3, 5), 16 / 32),
    # Cell 3 -> columns [24, 32): 8 of 32.
    ("shrunk to one cell", stripe(3, 4), 8 / 32),
    # Intensity 0.6 over the same cells: columns [19, 44], 26 of 32 (module docstring).
    ("dimmed to 0.6 in place", stripe(2, 6, 0.6), 26 / 32),
    # Intensity 0.49: nowhere above 0.5.
    ("dimmed below the threshold", stripe(2, 6, 0.49), 0.0),
]


@pytest.mark.parametrize("what,negative,coverage", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_route_coverage_is_the_geometry(what, negative, coverage):
    note = annotate([POSITIVE], [negative])
    (c,) = note.classes
    # The mask is the stripe's columns, all rows.
    mask = note.label_map == 1
    assert mask[:, 16:48].all() and not mask[:, :16].any() and not mask[:, 48:].any()
    assert c["area"] == 32 * 64 and c["box"] == [16, 0, 48, 64]
    # Exact counts over 2048 pixels: only the record's rounding to 4 decimals separates them.
    assert c["counterfactual_coverage"] == pytest.approx(coverage, abs=5e-5)
    assert note.counterfactual["max_coverage"] == c["counterfactual_coverage"]
    assert note.counterfactual["quality"] == pytest.approx(1 - coverage, abs=1e-4)


@pytest.mark.parametrize("what,negative,coverage", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_route_pass_flips_at_the_coverage(what, negative, coverage):
    # At the coverage itself the pair passes ("at most"), just below it fails, just above it passes.
    assert annotate([POSITIVE], [negative], max_coverage=coverage).counterfactual["passed"]
    if coverage > 0:
        failed = annotate([POSITIVE], [negative], max_coverage=coverage - 0.001).counterfactual
        assert not failed["passed"] and failed["reason"] == "the negative still shows a class"
    if coverage < 1:
        assert annotate([POSITIVE], [negative], max_coverage=min(1.0, coverage + 0.001)).counterfactual["passed"]


def test_the_negative_is_read_on_the_positive_scale():
    """Attention maps are not normalised: the negative is measured on its positive's range, so
    the same shape at 0.6 of the positive's peak is the 'dimmed to 0.6' case (26 of 32
    columns), whatever the positive's own scale; normalised on its own it would cover all 32."""
    for scale in (0.01, 4.0, 300.0):
        note = annotate([POSITIVE * scale], [stripe(2, 6, 0.6 * scale)])
        assert note.classes[0]["counterfactual_coverage"] == pytest.approx(26 / 32, abs=5e-5)
    # A negative brighter than its positive is clipped to the positive's top: coverage 1, not more.
    note = annotate([POSITIVE], [stripe(2, 6, 5.0)])
    assert note.classes[0]["counterfactual_coverage"] == 1.0


def test_otsu_threshold_keeps_the_threshold_free_answers():
    """With Otsu's threshold (the default) instead of 0.5, an identical negative still covers
    all of the mask and an empty one none of it: those answers hold for any threshold."""
    assert annotate([POSITIVE], [POSITIVE.clone()], threshold="otsu").classes[0]["counterfactual_coverage"] == 1.0
    assert annotate([POSITIVE], [torch.zeros(CELLS, CELLS)], threshold="otsu").classes[0][
        "counterfactual_coverage"] == 0.0


def test_the_worst_class_decides_and_classes_not_found_do_not_count():
    # Class 0: cells [1, 3) -> columns [8, 24), 16 columns; its negative dimmed to 0.6 keeps
    # 8 * 2 - 6 = 10 of them: [11, 20]. Class 1: cells [5, 7) -> columns [40, 56); its negative
    # at cells [6, 8) -> columns [48, 64) keeps 8 of 16. Class 2: no attention at all in the
    # positive, so it has no mask, whatever its negative shows.
    positive = [stripe(1, 3), stripe(5, 7), torch.zeros(CELLS, CELLS)]
    negative = [stripe(1, 3, 0.6), stripe(6, 8), stripe(0, 8)]
    note = annotate(positive, negative, max_coverage=0.6)
    a, b, c = note.classes
    assert a["counterfactual_coverage"] == pytest.approx(10 / 16, abs=5e-5)
    assert b["counterfactual_coverage"] == pytest.approx(8 / 16, abs=5e-5)
    assert c["empty"] and not c["found"]
    assert note.counterfactual["max_coverage"] == a["counterfactual_coverage"]
    assert not note.counterfactual["passed"]  # 0.625 > 0.6, though class 1 alone would pass
    assert annotate(positive, negative, max_coverage=0.625).counterfactual["passed"]


def test_a_pair_with_no_class_found_fails_whatever_the_threshold():
    note = annotate([torch.zeros(CELLS, CELLS)], [torch.zeros(CELLS, CELLS)], max_coverage=1.0)
    assert not note.counterfactual["passed"]
    assert note.counterfactual["reason"] == "no class was found in the positive"


# --- detector route: the negative image itself is read --------------------------------------


class WhiteBoxDetector:
    """Boxes the white pixels of each image for every class: a detector whose answer is known."""

    def __call__(self, images: np.ndarray, classes: list[tuple[str, ...]]) -> Detections:
        c_max = max(len(c) for c in classes)
        boxes = torch.full((len(images), c_max, 4), -1.0)
        scores = torch.zeros(len(images), c_max)
        for b, image in enumerate(images):
            rows, cols = np.nonzero(image[..., 0] > 128)
            if len(rows):
                boxes[b, : len(classes[b])] = torch.tensor(
                    [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
                scores[b, : len(classes[b])] = 0.9
        return Detections(boxes, scores)


def white_rectangle(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    image = np.zeros((H, W, 3), np.uint8)
    image[y0:y1, x0:x1] = 255
    return image


# Positive: x [10, 30), y [20, 40): 20 x 20 = 400 pixels.
DETECTOR_CASES = [
    ("identical to the positive", white_rectangle(10, 20, 30, 40), 1.0),
    ("empty", np.zeros((H, W, 3), np.uint8), 0.0),
    # x [15, 35): 15 x 20 = 300 of 400.
    ("moved right by 5", white_rectangle(15, 20, 35, 40), 300 / 400),
    # x [15, 35), y [30, 50): 15 x 10 = 150 of 400.
    ("moved right 5 and down 10", white_rectangle(15, 30, 35, 50), 150 / 400),
    # x [10, 20), y [20, 30): 100 of 400.
    ("shrunk to a quarter", white_rectangle(10, 20, 20, 30), 100 / 400),
    # x [40, 60): no overlap.
    ("moved away", white_rectangle(40, 20, 60, 40), 0.0),
]


def detector_annotate(negative: np.ndarray, max_coverage: float):
    config = MaskConfig(source="detector", refine_with_sam=False, max_counterfactual_coverage=max_coverage)
    annotator = MaskAnnotator(config, detector=WhiteBoxDetector())
    positive = white_rectangle(10, 20, 30, 40)
    (note,) = annotator(positive[None], None, [("thing",)], negatives=negative[None])
    return note


@pytest.mark.parametrize("what,negative,coverage", DETECTOR_CASES, ids=[c[0] for c in DETECTOR_CASES])
def test_detector_route_coverage_is_the_overlap_of_the_rectangles(what, negative, coverage):
    note = detector_annotate(negative, 0.5)
    (c,) = note.classes
    assert c["box"] == [10, 20, 30, 40] and c["area"] == 400
    assert c["counterfactual_coverage"] == pytest.approx(coverage, abs=5e-5)
    assert detector_annotate(negative, coverage).counterfactual["passed"]
    if coverage > 0:
        assert not detector_annotate(negative, coverage - 0.001).counterfactual["passed"]
    if coverage < 1:
        assert detector_annotate(negative, min(1.0, coverage + 0.001)).counterfactual["passed"]


# --- the writer keeps or drops on that verdict ---------------------------------------------------


class _Shards:
    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.added: list[str] = []

    def add(self, key, files):
        self.added.append(key)


@pytest.mark.parametrize("drop", [False, True])
def test_writer_flags_or_drops_exactly_the_pairs_above_the_threshold(tmp_path, drop):
    from magicseg_engine.pipeline import DROPPED_FILE, PairWriter

    shards = _Shards(tmp_path)
    writer = PairWriter(shards, drop_failed=drop)
    # Coverages 0.75 (moved one cell) and 0.25 (one cell) against 0.5: the first fails, the
    # second passes; then the threshold just above 0.75 keeps both.
    for key, negative, threshold in (("a", stripe(3, 7), 0.5), ("b", stripe(3, 4), 0.5),
                                     ("c", stripe(3, 7), 0.751)):
        note = annotate([POSITIVE], [negative], max_coverage=threshold)
        writer.write(key, {"classes": ["class0"]}, b"p", b"n", note)
    dropped = tmp_path / DROPPED_FILE
    if drop:
        assert shards.added == ["b", "c"] and writer.counts["dropped"] == 1 and writer.counts["flagged"] == 0
        assert [json.loads(line)["key"] for line in dropped.read_text().splitlines()] == ["a"]
    else:
        assert shards.added == ["a", "b", "c"] and writer.counts["flagged"] == 1 and writer.counts["dropped"] == 0
        assert not dropped.exists()

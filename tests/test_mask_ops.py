"""Mask cleanup and merging ops against plain references: scipy.ndimage.label for components
and holes, numpy and OpenCV for boxes and areas, a numpy (and a per-pixel) merge."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from magicseg_engine import _C, ops

ndimage = pytest.importorskip("scipy.ndimage")

# scipy structuring elements: 8-connected (edges and corners) and 4-connected (edges only).
STRUCTURE = {8: np.ones((3, 3), bool), 4: np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)}
OTHER = {8: 4, 4: 8}


# --- references ----------------------------------------------------------------------


def ref_remove_small_regions(masks: np.ndarray, min_area: int, connectivity: int = 8) -> np.ndarray:
    fg = np.asarray(masks) != 0
    out = np.zeros(fg.shape, np.uint8)
    for k, m in enumerate(fg):
        if m.size == 0:
            continue
        labels, n = ndimage.label(m, STRUCTURE[connectivity])
        keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_area
        keep[0] = False
        out[k] = keep[labels]
    return out


def ref_fill_small_holes(masks: np.ndarray, max_area: int, connectivity: int = 8) -> np.ndarray:
    fg = np.asarray(masks) != 0
    out = fg.astype(np.uint8)
    for k, m in enumerate(fg):
        if m.size == 0:
            continue
        labels, n = ndimage.label(~m, STRUCTURE[OTHER[connectivity]])
        fill = np.bincount(labels.ravel(), minlength=n + 1) <= max_area
        fill[0] = False
        fill[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
        out[k] |= fill[labels]
    return out


def ref_boxes(masks: np.ndarray) -> np.ndarray:
    out = np.full((len(masks), 4), -1, np.int32)
    for k, m in enumerate(np.asarray(masks) != 0):
        ys, xs = np.nonzero(m)
        if len(ys):
            out[k] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return out


def pixelwise_merge(masks, scores, valid, rule) -> np.ndarray:
    """The merge rule applied one pixel at a time, to check the numpy reference itself."""
    b, c, h, w = masks.shape
    areas = (masks != 0).reshape(b, c, -1).sum(-1)
    out = np.zeros((b, h, w), np.uint8)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                here = [k for k in range(c) if valid[i, k] and masks[i, k, y, x]]
                if here:
                    key = (lambda k: (-scores[i, k], k)) if rule == "score" else (lambda k: (areas[i, k], k))
                    out[i, y, x] = min(here, key=key) + 1
    return out


# --- mask generators -----------------------------------------------------------------


def blobs(n: int, h: int, w: int, seed: int, noise: float = 0.0) -> np.ndarray:
    """Unions of random ragged ellipses, optionally with salt-and-pepper noise (which adds
    small components and small holes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.arctan2(yy - h / 2, xx - w / 2)
    out = np.zeros((n, h, w), bool)
    for m in out:
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(1, h / 3 + 1), rng.uniform(1, w / 3 + 1)
            wobble = 1 + 0.2 * np.sin(rng.integers(3, 12) * angle + rng.uniform(0, 6.3))
            m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= wobble
    if noise:
        out ^= rng.random(out.shape) < noise
    return out


def random_masks(n: int, h: int, w: int, density: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, h, w)) < density


SIZES = [(1, 1), (1, 19), (19, 1), (2, 2), (3, 3), (7, 13), (13, 7), (64, 64), (101, 77)]
DENSITIES = [0.0, 0.05, 0.3, 0.55, 0.7, 0.95, 1.0]
CONNECTIVITY = [4, 8]


def strided_views() -> dict[str, np.ndarray]:
    base = blobs(6, 40, 50, seed=3, noise=0.08)
    rng = np.random.default_rng(3)
    valued = (base * rng.integers(1, 256, base.shape)).astype(np.uint8)  # foreground 1..255
    return {
        "transposed": base.transpose(0, 2, 1),
        "cropped": base[:, 2:-3, 4:-6],  # rows contiguous, but not one after the other
        "step_slices": base[:, ::3, 1::2],
        "negative_steps": base[::-1, ::-1, ::-2],
        "batch_step": base[::2],
        "fortran": np.asfortranarray(base),
        "hwn_layout": np.ascontiguousarray(base.transpose(1, 2, 0)).transpose(2, 0, 1),
        "coco_layout_values": np.asfortranarray(valued.transpose(1, 2, 0)).transpose(2, 0, 1),
        "transposed_values": valued.transpose(0, 2, 1)[:, ::2],
        "broadcast": np.broadcast_to(base[0], (4, 40, 50)),
    }


# --- remove_small_regions ------------------------------------------------------------


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("connectivity", CONNECTIVITY)
def test_remove_random_masks_match_scipy(h, w, density, connectivity):
    masks = random_masks(4, h, w, density, seed=h * 100 + w)
    for min_area in (0, 1, 2, 3, 6, 40, h * w, h * w + 1):
        out = ops.remove_small_regions(masks, min_area, connectivity)
        assert out.dtype == np.uint8 and out.shape == masks.shape
        np.testing.assert_array_equal(out, ref_remove_small_regions(masks, min_area, connectivity))


@pytest.mark.parametrize("h,w", [(64, 64), (120, 90), (257, 311)])
@pytest.mark.parametrize("connectivity", CONNECTIVITY)
def test_remove_noisy_blobs_match_scipy(h, w, connectivity):
    masks = blobs(6, h, w, seed=h, noise=0.03)
    assert masks.any() and not masks.all()
    for min_area in (2, 5, 30, 500):
        expected = ref_remove_small_regions(masks, min_area, connectivity)
        assert 0 < expected.sum() < masks.sum()  # something is removed, something kept
        np.testing.assert_array_equal(ops.remove_small_regions(masks, min_area, connectivity), expected)


@pytest.mark.parametrize("connectivity", CONNECTIVITY)
def test_remove_matches_opencv_component_areas(connectivity):
    cv2 = pytest.importorskip("cv2")
    masks = blobs(4, 90, 110, seed=21, noise=0.05)
    out = ops.remove_small_regions(masks, 12, connectivity)
    for m, o in zip(masks, out):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=connectivity)
        keep = stats[:, cv2.CC_STAT_AREA] >= 12
        keep[0] = False
        np.testing.assert_array_equal(o, keep[labels])


def test_remove_diagonal_pixels_are_one_region_only_with_8_connectivity():
    mask = np.zeros((5, 5), np.uint8)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = 1  # a diagonal line of 3 pixels
    np.testing.assert_array_equal(ops.remove_small_regions(mask, 3, connectivity=8), mask)
    np.testing.assert_array_equal(ops.remove_small_regions(mask, 3, connectivity=4), 0)
    np.testing.assert_array_equal(ops.remove_small_regions(mask, 1, connectivity=4), mask)
    # Anti-diagonal, which the run overlap test reaches from the other side.
    anti = mask[:, ::-1]
    np.testing.assert_array_equal(ops.remove_small_regions(anti, 3, connectivity=8), anti)
    np.testing.assert_array_equal(ops.remove_small_regions(anti, 2, connectivity=4), 0)


def test_remove_threshold_is_strict_and_border_components_count():
    mask = np.zeros((6, 8), np.uint8)
    mask[0, 0:3] = 1  # 3 pixels touching the top border and left corner
    mask[4:6, 6:8] = 1  # 4 pixels in the bottom-right corner
    mask[3, 3] = 1  # 1 isolated pixel
    np.testing.assert_array_equal(ops.remove_small_regions(mask, 1), mask)
    out = ops.remove_small_regions(mask, 3)
    assert out[0, 0:3].all() and out[4:6, 6:8].all() and out[3, 3] == 0
    out = ops.remove_small_regions(mask, 4)
    assert out.sum() == 4 and out[4:6, 6:8].all()
    assert ops.remove_small_regions(mask, 5).sum() == 0


def test_remove_u_shape_joined_below_is_one_region():
    # Two arms that meet only in a later row: union-find must merge labels seen separately.
    mask = np.zeros((6, 9), np.uint8)
    mask[0:5, 1] = mask[0:5, 7] = 1
    mask[5, 1:8] = 1
    mask[0:3, 4] = 1  # a separate 3-pixel stub in the middle
    out = ops.remove_small_regions(mask, 4)
    expected = mask.copy()
    expected[0:3, 4] = 0
    np.testing.assert_array_equal(out, expected)


def test_remove_empty_full_and_single_pixel():
    empty = np.zeros((2, 5, 7), bool)
    full = np.ones((2, 5, 7), bool)
    np.testing.assert_array_equal(ops.remove_small_regions(empty, 3), 0)
    np.testing.assert_array_equal(ops.remove_small_regions(full, 35), 1)
    np.testing.assert_array_equal(ops.remove_small_regions(full, 36), 0)
    one = np.ones((1, 1), bool)
    assert ops.remove_small_regions(one, 1)[0, 0] == 1
    assert ops.remove_small_regions(one, 2)[0, 0] == 0


# --- fill_small_holes ----------------------------------------------------------------


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("connectivity", CONNECTIVITY)
def test_fill_random_masks_match_scipy(h, w, density, connectivity):
    masks = random_masks(4, h, w, density, seed=h * 100 + w + 1)
    for max_area in (0, 1, 2, 3, 6, 40, h * w):
        out = ops.fill_small_holes(masks, max_area, connectivity)
        assert out.dtype == np.uint8 and out.shape == masks.shape
        np.testing.assert_array_equal(out, ref_fill_small_holes(masks, max_area, connectivity))


@pytest.mark.parametrize("h,w", [(64, 64), (120, 90), (257, 311)])
@pytest.mark.parametrize("connectivity", CONNECTIVITY)
def test_fill_noisy_blobs_match_scipy(h, w, connectivity):
    masks = blobs(6, h, w, seed=h + 1, noise=0.03)
    for max_area in (1, 4, 30, 10_000):
        expected = ref_fill_small_holes(masks, max_area, connectivity)
        assert expected.sum() > masks.sum()  # some holes are filled
        np.testing.assert_array_equal(ops.fill_small_holes(masks, max_area, connectivity), expected)


def test_fill_hole_size_threshold_is_inclusive():
    mask = np.ones((7, 9), np.uint8)
    mask[1:3, 1:3] = 0  # a 4-pixel hole
    mask[4, 6] = 0  # a 1-pixel hole
    out = ops.fill_small_holes(mask, 1)
    assert out[4, 6] == 1 and out[1:3, 1:3].sum() == 0
    np.testing.assert_array_equal(ops.fill_small_holes(mask, 4), 1)
    np.testing.assert_array_equal(ops.fill_small_holes(mask, 0), mask)


def test_fill_never_fills_background_touching_the_border():
    mask = np.ones((5, 6), np.uint8)
    mask[0, 2] = 0  # a 1-pixel notch on the top border
    mask[2:4, 5] = 0  # a notch on the right border
    mask[4, 0] = 0  # the bottom-left corner
    np.testing.assert_array_equal(ops.fill_small_holes(mask, 100), mask)
    # The same notches one pixel inwards are holes.
    inner = np.ones((7, 8), np.uint8)
    inner[1:-1, 1:-1] = mask
    np.testing.assert_array_equal(ops.fill_small_holes(inner, 2), 1)
    expected = inner.copy()
    expected[1, 3] = expected[5, 1] = 1  # the 1-pixel holes; the 2-pixel one stays
    assert (inner[3:5, 6] == 0).all()
    np.testing.assert_array_equal(ops.fill_small_holes(inner, 1), expected)


def test_fill_diamond_hole_depends_on_connectivity():
    # The centre touches the ring on all four sides but the outside diagonally.
    mask = np.zeros((5, 5), np.uint8)
    mask[1, 2] = mask[2, 1] = mask[2, 3] = mask[3, 2] = 1
    filled = mask.copy()
    filled[2, 2] = 1
    # 8-connected foreground: the ring is closed, its 4-connected centre is a hole.
    np.testing.assert_array_equal(ops.fill_small_holes(mask, 1, connectivity=8), filled)
    # 4-connected foreground: the centre leaks out through the corners, so it is no hole.
    np.testing.assert_array_equal(ops.fill_small_holes(mask, 100, connectivity=4), mask)


def test_fill_two_holes_meeting_at_a_corner():
    # Two 1-pixel holes touching diagonally: two holes of 1 for 8-connected foreground,
    # one hole of 2 for 4-connected foreground.
    mask = np.ones((4, 4), np.uint8)
    mask[1, 1] = mask[2, 2] = 0
    np.testing.assert_array_equal(ops.fill_small_holes(mask, 1, connectivity=8), 1)
    np.testing.assert_array_equal(ops.fill_small_holes(mask, 1, connectivity=4), mask)
    np.testing.assert_array_equal(ops.fill_small_holes(mask, 2, connectivity=4), 1)


def test_fill_empty_full_and_tiny_masks():
    np.testing.assert_array_equal(ops.fill_small_holes(np.zeros((2, 6, 6), bool), 1000), 0)
    np.testing.assert_array_equal(ops.fill_small_holes(np.ones((2, 6, 6), bool), 1000), 1)
    for shape in [(1, 1), (2, 2), (2, 5), (5, 2)]:
        mask = np.zeros(shape, np.uint8)  # too small to hold a hole
        np.testing.assert_array_equal(ops.fill_small_holes(mask, 10), 0)
    ring = np.ones((3, 3), np.uint8)
    ring[1, 1] = 0
    np.testing.assert_array_equal(ops.fill_small_holes(ring, 1), 1)


# --- masks_to_boxes and mask_areas -----------------------------------------------------


@pytest.mark.parametrize("h,w", SIZES + [(3, 300), (300, 3)])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.02, 0.5, 1.0])
def test_boxes_and_areas_of_random_masks(h, w, density):
    masks = random_masks(8, h, w, density, seed=h * 7 + w)
    np.testing.assert_array_equal(ops.masks_to_boxes(masks), ref_boxes(masks))
    areas = ops.mask_areas(masks)
    assert areas.dtype == np.int64
    np.testing.assert_array_equal(areas, np.count_nonzero(masks, axis=(1, 2)))


def test_boxes_of_blobs_match_opencv():
    cv2 = pytest.importorskip("cv2")
    masks = blobs(12, 97, 131, seed=5)
    boxes = ops.masks_to_boxes(masks)
    assert boxes.dtype == np.int32 and boxes.shape == (12, 4)
    for m, box in zip(masks, boxes):
        x, y, bw, bh = cv2.boundingRect(m.astype(np.uint8))
        assert tuple(box) == (x, y, x + bw, y + bh)
    areas = [cv2.countNonZero(m.astype(np.uint8)) for m in masks]
    np.testing.assert_array_equal(ops.mask_areas(masks), areas)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 21), (17, 1), (9, 33), (40, 17)])
def test_boxes_of_single_pixels_everywhere(h, w):
    cells = [(i, j) for i in range(h) for j in range(w)]
    masks = np.zeros((len(cells), h, w), np.uint8)
    for k, (i, j) in enumerate(cells):
        masks[k, i, j] = 1
    expected = np.array([(j, i, j + 1, i + 1) for i, j in cells], np.int32)
    np.testing.assert_array_equal(ops.masks_to_boxes(masks), expected)
    np.testing.assert_array_equal(ops.masks_to_boxes(masks.transpose(0, 2, 1)), expected[:, [1, 0, 3, 2]])
    np.testing.assert_array_equal(ops.mask_areas(masks), 1)


def test_boxes_of_two_far_pixels_and_of_empty_and_full_masks():
    masks = np.zeros((4, 30, 40), np.uint8)
    masks[0, 3, 35] = masks[0, 20, 2] = 1  # box spans both, neither pixel is a corner of it
    masks[2] = 1
    masks[3, :, 0] = 1
    expected = [(2, 3, 36, 21), (-1, -1, -1, -1), (0, 0, 40, 30), (0, 0, 1, 30)]
    np.testing.assert_array_equal(ops.masks_to_boxes(masks), expected)
    np.testing.assert_array_equal(ops.mask_areas(masks), [2, 0, 1200, 30])


def test_single_mask_gives_one_box_and_an_int_area():
    mask = blobs(1, 30, 20, seed=9)[0]
    np.testing.assert_array_equal(ops.masks_to_boxes(mask), ref_boxes(mask[None])[0])
    area = ops.mask_areas(mask)
    assert isinstance(area, int) and area == mask.sum()


def test_area_of_a_mask_over_a_million_pixels():
    mask = np.zeros((1, 1100, 1000), np.uint8)
    mask[0, ::3] = 7
    mask[0, -1, -5:] = 1
    assert ops.mask_areas(mask)[0] == 367 * 1000 + 5
    assert ops.mask_areas(mask[:, :, ::-1])[0] == 367 * 1000 + 5


# --- all mask ops: layouts, dtypes, threads --------------------------------------------


# name -> (op taking masks and num_threads, reference taking masks)
MASK_OPS = {
    "remove4": (
        lambda m, t=0: ops.remove_small_regions(m, 5, 4, num_threads=t),
        lambda m: ref_remove_small_regions(m, 5, 4),
    ),
    "remove8": (
        lambda m, t=0: ops.remove_small_regions(m, 5, 8, num_threads=t),
        lambda m: ref_remove_small_regions(m, 5, 8),
    ),
    "fill4": (lambda m, t=0: ops.fill_small_holes(m, 6, 4, num_threads=t), lambda m: ref_fill_small_holes(m, 6, 4)),
    "fill8": (lambda m, t=0: ops.fill_small_holes(m, 6, 8, num_threads=t), lambda m: ref_fill_small_holes(m, 6, 8)),
    "boxes": (lambda m, t=0: ops.masks_to_boxes(m, num_threads=t), ref_boxes),
    "areas": (lambda m, t=0: ops.mask_areas(m, num_threads=t), lambda m: np.count_nonzero(m, axis=(1, 2))),
}


@pytest.mark.parametrize("op", list(MASK_OPS))
@pytest.mark.parametrize("name", list(strided_views()))
def test_non_contiguous_inputs(op, name):
    view = strided_views()[name]
    assert not view.flags.c_contiguous
    fn, ref = MASK_OPS[op]
    before = view.copy()
    np.testing.assert_array_equal(fn(view), ref(np.ascontiguousarray(view)))
    np.testing.assert_array_equal(view, before)  # the input is only read


@pytest.mark.parametrize("op", list(MASK_OPS))
def test_c_ops_take_strided_bool_directly(op):
    view = strided_views()["transposed"][:, 3:, :-5]
    assert view.dtype == bool and not view.flags.c_contiguous
    c_fn = {
        "remove4": lambda m: _C.remove_small_regions(m, 5, 4, 2),
        "remove8": lambda m: _C.remove_small_regions(m, 5, 8, 2),
        "fill4": lambda m: _C.fill_small_holes(m, 6, 4, 2),
        "fill8": lambda m: _C.fill_small_holes(m, 6, 8, 2),
        "boxes": lambda m: _C.masks_to_boxes(m, 2),
        "areas": lambda m: _C.mask_areas(m, 2),
    }[op]
    np.testing.assert_array_equal(c_fn(view), MASK_OPS[op][1](view))


@pytest.mark.parametrize("op", list(MASK_OPS))
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.uint64, bool])
def test_dtypes_and_values_above_one_are_foreground(op, dtype):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 4, (4, 23, 19)) * (rng.random((4, 23, 19)) < 0.6)
    fn, ref = MASK_OPS[op]
    np.testing.assert_array_equal(fn(values.astype(dtype)), ref(values != 0))


@pytest.mark.parametrize("op", list(MASK_OPS))
def test_negative_int8_and_255_are_foreground(op):
    values = blobs(3, 20, 24, seed=2, noise=0.1).astype(np.int8) * -1
    fn, ref = MASK_OPS[op]
    np.testing.assert_array_equal(fn(values), ref(values != 0))
    np.testing.assert_array_equal(fn(values.view(np.uint8)), ref(values != 0))  # -1 is 255


@pytest.mark.parametrize("op", list(MASK_OPS))
def test_torch_tensors(op):
    torch = pytest.importorskip("torch")
    masks = torch.from_numpy(blobs(3, 25, 31, seed=7, noise=0.05))
    fn, ref = MASK_OPS[op]
    expected = ref(masks.numpy())
    for t in (masks, masks.to(torch.uint8), masks.to(torch.int64) * 7):
        np.testing.assert_array_equal(fn(t), expected)
    transposed = masks.transpose(1, 2)
    assert not transposed.is_contiguous()
    np.testing.assert_array_equal(fn(transposed), ref(transposed.numpy()))
    with pytest.raises(ValueError, match="bool or integer"):
        fn(masks.float().requires_grad_())


@pytest.mark.parametrize("op", list(MASK_OPS))
@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 5), (2, 5, 0)])
def test_empty_batches_and_masks(op, shape):
    fn, ref = MASK_OPS[op]
    out = fn(np.zeros(shape, np.uint8))
    expected = {"boxes": np.full((shape[0], 4), -1), "areas": np.zeros(shape[0])}.get(op, np.zeros(shape))
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("op", list(MASK_OPS))
@pytest.mark.parametrize("num_threads", [1, 2, 3, 8, 0, -1])
def test_thread_counts_give_identical_results(op, num_threads):
    masks = np.concatenate([blobs(9, 64, 48, seed=13, noise=0.04), random_masks(8, 64, 48, 0.5, 13)])
    fn, ref = MASK_OPS[op]
    np.testing.assert_array_equal(fn(masks, num_threads), ref(masks))
    np.testing.assert_array_equal(fn(masks, num_threads), fn(masks, 1))


def test_concurrent_calls_from_python_threads():
    batches = [blobs(6, 60 + k, 80 - k, seed=k, noise=0.05) for k in range(10)]
    expected = [ref_remove_small_regions(b, 4) for b in batches]
    start = threading.Barrier(5)

    def work(k: int) -> np.ndarray:
        if k < 5:
            start.wait()
        return ops.remove_small_regions(batches[k], 4, num_threads=2)

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(work, range(len(batches))))
    for k, out in enumerate(results):
        np.testing.assert_array_equal(out, expected[k])


# --- property tests ------------------------------------------------------------------


mask_batches = hnp.arrays(
    np.uint8,
    hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=14),
    elements=st.sampled_from([0, 0, 1, 1, 1, 255]),
)


@settings(max_examples=300, deadline=None)
@given(mask_batches, st.integers(0, 30), st.sampled_from(CONNECTIVITY))
def test_property_remove_small_regions_matches_scipy(masks, min_area, connectivity):
    out = ops.remove_small_regions(masks, min_area, connectivity, num_threads=2)
    np.testing.assert_array_equal(out, ref_remove_small_regions(masks, min_area, connectivity))


@settings(max_examples=300, deadline=None)
@given(mask_batches, st.integers(0, 30), st.sampled_from(CONNECTIVITY))
def test_property_fill_small_holes_matches_scipy(masks, max_area, connectivity):
    out = ops.fill_small_holes(masks, max_area, connectivity, num_threads=2)
    np.testing.assert_array_equal(out, ref_fill_small_holes(masks, max_area, connectivity))


@settings(max_examples=100, deadline=None)
@given(mask_batches, st.integers(0, 10), st.integers(0, 10), st.sampled_from(CONNECTIVITY), st.data())
@pytest.mark.slow
def test_property_strided_views(masks, min_area, max_area, connectivity, data):
    steps = [data.draw(st.sampled_from([1, 2, -1, -3])) for _ in range(3)]
    view = masks[:: steps[0], :: steps[1], :: steps[2]]
    view = view.transpose(0, 2, 1) if data.draw(st.booleans()) else view
    dense = np.ascontiguousarray(view)
    np.testing.assert_array_equal(
        ops.remove_small_regions(view, min_area, connectivity),
        ref_remove_small_regions(dense, min_area, connectivity),
    )
    np.testing.assert_array_equal(
        ops.fill_small_holes(view, max_area, connectivity),
        ref_fill_small_holes(dense, max_area, connectivity),
    )
    np.testing.assert_array_equal(ops.masks_to_boxes(view), ref_boxes(dense))


# --- merge_label_map -----------------------------------------------------------------


MERGE_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 6, 40, 33), (2, 12, 100, 90), (1, 40, 64, 64)]


def merge_case(b: int, c: int, h: int, w: int, seed: int):
    rng = np.random.default_rng(seed)
    masks = blobs(b * c, h, w, seed=seed).reshape(b, c, h, w)
    scores = rng.choice([0.1, 0.3, 0.5, 0.9], (b, c)).astype(np.float32)  # ties on purpose
    valid = rng.random((b, c)) < 0.8
    return masks, scores, valid


@pytest.mark.parametrize("rule", ["score", "smaller"])
@pytest.mark.parametrize("b,c,h,w", MERGE_SHAPES)
def test_merge_matches_numpy_reference(rule, b, c, h, w):
    masks, scores, valid = merge_case(b, c, h, w, seed=b * 100 + c)
    out = ops.merge_label_map(masks, scores, valid, rule)
    assert out.dtype == np.uint8 and out.shape == (b, h, w)
    expected = ops.merge_label_map_reference(masks, scores, valid, rule)
    np.testing.assert_array_equal(out, expected)
    assert set(np.unique(out)) <= {0} | {k + 1 for k in range(c) if valid[:, k].any()}


@pytest.mark.parametrize("rule", ["score", "smaller"])
def test_numpy_reference_matches_the_rule_pixel_by_pixel(rule):
    masks, scores, valid = merge_case(3, 5, 9, 11, seed=4)
    expected = pixelwise_merge(masks, scores, valid, rule)
    assert len(np.unique(expected)) > 3  # overlaps of several classes are exercised
    np.testing.assert_array_equal(ops.merge_label_map_reference(masks, scores, valid, rule), expected)
    np.testing.assert_array_equal(ops.merge_label_map(masks, scores, valid, rule), expected)


def test_merge_small_object_on_large_one():
    masks = np.zeros((1, 3, 8, 8), bool)
    masks[0, 0] = True  # large "table" covering everything
    masks[0, 1, 2:4, 2:4] = True  # small "cup" on it
    masks[0, 2, 5:8, 5:8] = True  # medium "plate" on it
    scores = np.array([[0.9, 0.2, 0.5]])
    by_score = ops.merge_label_map(masks, scores, np.ones((1, 3), bool), "score")
    np.testing.assert_array_equal(by_score, 1)  # the table scores highest and covers all
    smaller = ops.merge_label_map(masks, scores, np.ones((1, 3), bool), "smaller")[0]
    assert (smaller[2:4, 2:4] == 2).all() and (smaller[5:8, 5:8] == 3).all()
    assert (smaller == 1).sum() == 64 - 4 - 9


@pytest.mark.parametrize("rule", ["score", "smaller"])
def test_merge_ties_go_to_the_lower_class_index(rule):
    masks = np.zeros((1, 4, 3, 3), np.uint8)
    masks[0, 1, 0:2, 0:2] = 1  # class 1 and class 3: same area, same score, same place
    masks[0, 3, 0:2, 0:2] = 1
    masks[0, 2, 2, :] = 1
    scores = np.array([[0.7, 0.4, 0.1, 0.4]])
    out = ops.merge_label_map(masks, scores, None, rule)
    np.testing.assert_array_equal(out[0, 0:2, 0:2], 2)
    # Reversed class order: the other one has the lower index now.
    flipped = ops.merge_label_map(masks[:, ::-1], scores[:, ::-1], None, rule)
    np.testing.assert_array_equal(flipped[0, 0:2, 0:2], 1)


def test_merge_invalid_classes_never_appear():
    masks = np.ones((2, 3, 4, 5), bool)
    scores = np.array([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1]])
    valid = np.array([[False, True, True], [False, False, False]])
    for rule in ("score", "smaller"):
        out = ops.merge_label_map(masks, scores, valid, rule)
        np.testing.assert_array_equal(out[0], 2)
        np.testing.assert_array_equal(out[1], 0)


def test_merge_scores_decide_not_order():
    masks = np.zeros((1, 3, 2, 2), bool)
    masks[0, :, 0, 0] = True
    for winner in range(3):
        scores = np.full((1, 3), 0.2)
        scores[0, winner] = 0.8
        assert ops.merge_label_map(masks, scores, None, "score")[0, 0, 0] == winner + 1


def test_merge_254_classes_and_no_classes():
    c = 254
    masks = np.zeros((1, c, 16, 16), bool)
    masks[0].reshape(c, -1)[np.arange(c), np.arange(c)] = True  # class k owns pixel k
    scores = np.linspace(0, 1, c)[None]
    out = ops.merge_label_map(masks, scores, np.ones((1, c), bool))
    np.testing.assert_array_equal(out[0].ravel()[:c], np.arange(1, c + 1))
    assert out[0].ravel()[c:].sum() == 0
    none = ops.merge_label_map(np.zeros((2, 0, 3, 4), bool), np.zeros((2, 0)), np.zeros((2, 0), bool))
    np.testing.assert_array_equal(none, np.zeros((2, 3, 4)))
    assert ops.merge_label_map(np.zeros((0, 3, 3, 4), bool), np.zeros((0, 3)), None).shape == (0, 3, 4)


def test_merge_single_image_and_layouts():
    masks, scores, valid = merge_case(2, 5, 70, 45, seed=8)
    expected = ops.merge_label_map_reference(masks, scores, valid, "score")
    np.testing.assert_array_equal(ops.merge_label_map(masks[1], scores[1], valid[1]), expected[1])
    bhwc = np.ascontiguousarray(masks.transpose(0, 2, 3, 1))  # class-last model output
    for view in (bhwc.transpose(0, 3, 1, 2), np.asfortranarray(masks), masks.astype(np.uint8) * 200):
        np.testing.assert_array_equal(ops.merge_label_map(view, scores, valid, "score"), expected)
    for rule in ("score", "smaller"):
        cropped = masks[:, :, 3:-2, 5:-1]
        np.testing.assert_array_equal(
            ops.merge_label_map(cropped, scores, valid, rule),
            ops.merge_label_map_reference(np.ascontiguousarray(cropped), scores, valid, rule),
        )
    wide = masks.astype(np.int64) * 3
    out = ops.merge_label_map(wide, scores.astype(np.float64), valid.astype(np.int32))
    np.testing.assert_array_equal(out, expected)
    flipped = masks[:, :, ::-1, ::-1]
    np.testing.assert_array_equal(ops.merge_label_map(flipped, scores, valid), expected[:, ::-1, ::-1])


def test_merge_torch_inputs():
    torch = pytest.importorskip("torch")
    masks, scores, valid = merge_case(2, 4, 33, 29, seed=6)
    expected = ops.merge_label_map_reference(masks, scores, valid, "smaller")
    t_masks, t_scores, t_valid = (torch.from_numpy(x) for x in (masks, scores, valid))
    out = ops.merge_label_map(t_masks, t_scores, t_valid, "smaller")
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("rule", ["score", "smaller"])
@pytest.mark.parametrize("num_threads", [1, 2, 3, 0])
def test_merge_thread_counts_give_identical_results(rule, num_threads):
    # 100 rows are 4 row blocks per image, so a small batch is still split across threads.
    masks, scores, valid = merge_case(3, 7, 100, 60, seed=12)
    expected = ops.merge_label_map_reference(masks, scores, valid, rule)
    out = ops.merge_label_map(masks, scores, valid, rule, num_threads=num_threads)
    np.testing.assert_array_equal(out, expected)


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(bool, hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=7)),
    st.sampled_from(["score", "smaller"]),
    st.data(),
)
def test_property_merge_matches_pixelwise_rule(masks, rule, data):
    b, c = masks.shape[:2]
    scores = data.draw(hnp.arrays(np.float64, (b, c), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, -2.0])))
    valid = data.draw(hnp.arrays(bool, (b, c)))
    expected = pixelwise_merge(masks, scores, valid, rule)
    np.testing.assert_array_equal(ops.merge_label_map(masks, scores, valid, rule, num_threads=2), expected)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["remove", "fill", "boxes", "areas"])
def test_mask_ops_reject_bad_masks(op):
    fn = {
        "remove": lambda m: ops.remove_small_regions(m, 3),
        "fill": lambda m: ops.fill_small_holes(m, 3),
        "boxes": ops.masks_to_boxes,
        "areas": ops.mask_areas,
    }[op]
    for shape in [(5,), (2, 3, 4, 5), ()]:
        with pytest.raises(ValueError, match=r"shape \(H, W\) or \(N, H, W\)"):
            fn(np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match="bool or integer, got dtype float32"):
        fn(np.zeros((1, 3, 3), np.float32))


def test_thresholds_and_connectivity_are_checked():
    masks = np.zeros((1, 3, 3), np.uint8)
    for fn, name in ((ops.remove_small_regions, "min_area"), (ops.fill_small_holes, "max_area")):
        with pytest.raises(ValueError, match=f"{name} must be >= 0, got -1"):
            fn(masks, -1)
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            fn(masks, 2.5)
        for bad in (6, 0, True):
            with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
                fn(masks, 2, connectivity=bad)


def test_c_ops_reject_bad_arguments():
    good = np.zeros((1, 3, 3), np.uint8)
    with pytest.raises(ValueError, match=r"shape \(N, H, W\), got ndim=2"):
        _C.remove_small_regions(np.zeros((3, 3), np.uint8), 2, 8, 1)
    with pytest.raises(ValueError, match="bool or uint8, got dtype int32"):
        _C.masks_to_boxes(np.zeros((1, 3, 3), np.int32), 1)
    with pytest.raises(ValueError, match="bool or uint8, got dtype float64"):
        _C.mask_areas(np.zeros((1, 3, 3)), 1)
    with pytest.raises(ValueError, match="connectivity must be 4 or 8, got 6"):
        _C.fill_small_holes(good, 2, 6, 1)
    with pytest.raises(ValueError, match="min_area must be >= 0, got -3"):
        _C.remove_small_regions(good, -3, 8, 1)
    with pytest.raises(ValueError, match="max_area must be >= 0, got -1"):
        _C.fill_small_holes(good, -1, 4, 1)


def test_merge_rejects_bad_inputs():
    masks = np.zeros((2, 3, 4, 4), bool)
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"shape \(C, H, W\) or \(B, C, H, W\)"):
        ops.merge_label_map(masks[0, 0], scores)
    with pytest.raises(ValueError, match="bool or integer, got dtype float64"):
        ops.merge_label_map(masks.astype(float), scores)
    with pytest.raises(ValueError, match=r"scores must have shape \(2, 3\).*got \(3,\)"):
        ops.merge_label_map(masks, scores[0])
    with pytest.raises(ValueError, match=r"valid must have shape \(2, 3\).*got \(2, 4\)"):
        ops.merge_label_map(masks, scores, np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="valid must be bool or integer"):
        ops.merge_label_map(masks, scores, np.ones((2, 3)))
    with pytest.raises(ValueError, match="scores must be real numbers"):
        ops.merge_label_map(masks, np.zeros((2, 3), complex))
    with pytest.raises(ValueError, match="rule must be 'score' or 'smaller', got 'largest'"):
        ops.merge_label_map(masks, scores, rule="largest")
    with pytest.raises(ValueError, match="at most 254 classes.*C=255"):
        ops.merge_label_map(np.zeros((1, 255, 2, 2), bool), np.zeros((1, 255)))
    nan = scores.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.merge_label_map(masks, nan)
    valid = np.ones((2, 3), bool)
    valid[1, 2] = False
    ops.merge_label_map(masks, nan, valid)  # an invalid class's score is never looked at
    ops.merge_label_map(masks, nan, None, "smaller")  # nor are scores under "smaller"


def test_c_merge_rejects_bad_inputs():
    masks = np.zeros((2, 3, 4, 4), np.uint8)
    scores, valid = np.zeros((2, 3)), np.ones((2, 3), bool)
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\), got ndim=3"):
        _C.merge_label_map(masks[0], scores, valid, "score", 1)
    with pytest.raises(ValueError, match=r"scores must have shape \(B, C\) = \(2, 3\) to match masks, got \(3,\)$"):
        _C.merge_label_map(masks, scores[0], valid, "score", 1)
    with pytest.raises(ValueError, match=r"valid must have shape \(B, C\) = \(2, 3\) to match masks, got \(3, 2\)"):
        _C.merge_label_map(masks, scores, valid.T, "score", 1)
    with pytest.raises(ValueError, match="rule must be 'score' or 'smaller'"):
        _C.merge_label_map(masks, scores, valid, "bigger", 1)
    with pytest.raises(ValueError, match=r"scores\[0, 1\] is NaN for a valid class"):
        _C.merge_label_map(masks, np.array([[0, np.nan, 0], [0, 0, 0]]), valid, "score", 1)
    with pytest.raises(ValueError, match="C=300"):
        many = np.zeros((1, 300, 1, 1), np.uint8)
        _C.merge_label_map(many, np.zeros((1, 300)), np.ones((1, 300), bool), "score", 1)

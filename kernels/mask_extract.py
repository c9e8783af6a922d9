"""Cross-attention maps -> per-class pseudo masks, a label map and SAM prompts.

Per image b and class c, `maps[b, c]` is a small non-negative attention map (64x64 for 512x512
images). The pipeline, for every image of a batch at once:

1. min-max normalise each map to [0, 1] (a constant map becomes all 0);
2. upsample it bilinearly to the image size (as `F.interpolate(mode="bilinear",
   align_corners=False)`);
3. threshold it: a fixed value, or Otsu's threshold of that map's upsampled values;
4. label each pixel with the valid class of highest normalised value among those strictly above
   their threshold (ties go to the lower class index), else background; labels are uint8 with
   0 = background and c + 1 = class c;
5. derive SAM prompts per class: the box around its winning region, positive points at its
   highest-attention pixels and negative points off its region.

`extract_masks_reference` is plain torch and materialises the [B, C, H, W] upsampled maps.
`extract_masks` runs steps 1-4 as one Triton kernel over output pixels: each program reads the
small maps, normalises the four bilinear taps on the fly (with per-map minimum and 1/range
computed by a [B, C] torch reduction), compares with the thresholds, keeps a running argmax over
classes and writes the label and the winning value; the upsampled float maps are written only when
`return_normalized=True`. Otsu needs a histogram of the upsampled values: a second, cheaper Triton
pass over the output pixels of the valid maps computes exactly that histogram (256 bins over
[0, 1]) with the same sampling code, so it is exact rather than approximated at map resolution,
and writes nothing but [B, C, 256] counts. Otsu's threshold itself is a batched torch computation
on those counts. Boxes and points are torch code on the kernel's outputs (labels and winning
values), shared by both paths.

Agreement between the two paths: the normalised taps are computed identically, but the bilinear
sum may be rounded differently (fused multiply-adds on either side), so the upsampled values can
differ in the last bit or two. Labels then differ only at pixels where two classes tie or a value
sits on its threshold to within that rounding; the tests check exactly this.

Dots: none (no tl.dot); elementwise float32 arithmetic and integer histograms.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Read once, like Triton itself: the interpreter is chosen when a kernel is decorated.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

HIST_BINS = 256
# Reported as the threshold of invalid (padding) classes: no normalised value exceeds it.
INVALID_THRESHOLD = 1.0
# Positive points are spread by suppressing a disc of radius POSITIVE_SPREAD * sqrt(area / pi)
# (that is, this fraction of the radius of a disc of the region's area) around each chosen point.
POSITIVE_SPREAD = 0.5
# Background negative points, chosen on map cells, are at least this fraction of the map's
# shorter side apart (and at least one cell).
NEGATIVE_SPREAD = 0.125


@dataclass
class SamPrompts:
    """Prompts for SAM, per image and class, in pixel coordinates of the (H, W) image.

    boxes: [B, C, 4] float32 (x0, y0, x1, y1) around the class's region, ends exclusive; all -1
        where the class has no pixel (absent or invalid).
    points: [B, C, P, 2] float32 (x, y) = (column, row), P = num_positive + num_negative; the
        first num_positive entries are positive points, the rest negative; padding entries are 0.
    point_labels: [B, C, P] int64: 1 positive, 0 negative, -1 padding (SAM's own convention).
    """

    boxes: torch.Tensor
    points: torch.Tensor
    point_labels: torch.Tensor


@dataclass
class ExtractedMasks:
    """labels: [B, H, W] uint8 (0 background, c + 1 class c); class_masks: [B, C, H, W] bool
    (labels == c + 1); thresholds: [B, C] float32 (INVALID_THRESHOLD for invalid classes);
    normalized: [B, C, H, W] float32 upsampled normalised maps, or None unless asked for;
    prompts: SamPrompts."""

    labels: torch.Tensor
    class_masks: torch.Tensor
    thresholds: torch.Tensor
    normalized: torch.Tensor | None
    prompts: SamPrompts


# ----------------------------------------------------------------------------------------------
# Triton


@triton.jit
def _source_index(o, scale, n_in):
    """Bilinear taps and weights along one axis, as ATen computes them (align_corners=False)."""
    src = scale * (o.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)  # src >= 0, so truncation is floor
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _normalised_tap(ptr, offsets, mn, sc, mask):
    v = tl.load(ptr + offsets, mask=mask, other=0.0)
    return tl.minimum(tl.maximum((v - mn) * sc, 0.0), 1.0)


@triton.jit
def _upsampled_value(map_ptr, mn, sc, o00, o01, o10, o11, lx0, lx1, ly0, ly1, mask):
    v00 = _normalised_tap(map_ptr, o00, mn, sc, mask)
    v01 = _normalised_tap(map_ptr, o01, mn, sc, mask)
    v10 = _normalised_tap(map_ptr, o10, mn, sc, mask)
    v11 = _normalised_tap(map_ptr, o11, mn, sc, mask)
    # Same association as ATen's CPU kernel: rows outer, columns inner.
    return (v00 * lx0 + v01 * lx1) * ly0 + (v10 * lx0 + v11 * lx1) * ly1


@triton.jit
def _label_kernel(
    maps_ptr,  # [B, C, h, w] float32
    mins_ptr,  # [B, C] float32
    scales_ptr,  # [B, C] float32, 1 / (max - min), 0 for constant maps
    thr_ptr,  # [B, C] float32
    valid_ptr,  # [B, C] uint8
    labels_ptr,  # [B, H, W] uint8
    best_ptr,  # [B, H, W] float32: the winning value, -1 on background
    norm_ptr,  # [B, C, H, W] float32, written when WRITE_NORM
    C,
    h,
    w,
    H,
    W,
    scale_h,
    scale_w,
    WRITE_NORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    n_pix = H * W
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_pix
    y0, y1, ly0, ly1 = _source_index(offs // W, scale_h, h)
    x0, x1, lx0, lx1 = _source_index(offs % W, scale_w, w)
    o00 = y0 * w + x0
    o01 = y0 * w + x1
    o10 = y1 * w + x0
    o11 = y1 * w + x1
    best = tl.full([BLOCK], -1.0, tl.float32)
    label = tl.zeros([BLOCK], dtype=tl.int32)
    for c in range(C):
        bc = b * C + c
        mn = tl.load(mins_ptr + bc)
        sc = tl.load(scales_ptr + bc)
        thr = tl.load(thr_ptr + bc)
        ok = tl.load(valid_ptr + bc) != 0
        map_ptr = maps_ptr + bc.to(tl.int64) * h * w
        value = _upsampled_value(map_ptr, mn, sc, o00, o01, o10, o11, lx0, lx1, ly0, ly1, inside)
        if WRITE_NORM:
            tl.store(norm_ptr + bc.to(tl.int64) * n_pix + offs, value, mask=inside)
        # Strictly greater: on equal values the lower class index keeps the pixel.
        win = ok & (value > thr) & (value > best)
        best = tl.where(win, value, best)
        label = tl.where(win, c + 1, label)
    out = b.to(tl.int64) * n_pix + offs
    tl.store(labels_ptr + out, label.to(tl.uint8), mask=inside)
    tl.store(best_ptr + out, best, mask=inside)


@triton.jit
def _histogram_kernel(
    maps_ptr,
    mins_ptr,
    scales_ptr,
    map_ids_ptr,  # [n] int32: flat (b * C + c) indices of the maps to count
    hist_ptr,  # [B * C, BINS] int32, zeroed
    h,
    w,
    H,
    W,
    scale_h,
    scale_w,
    BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    bc = tl.load(map_ids_ptr + tl.program_id(0))
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < H * W
    y0, y1, ly0, ly1 = _source_index(offs // W, scale_h, h)
    x0, x1, lx0, lx1 = _source_index(offs % W, scale_w, w)
    value = _upsampled_value(
        maps_ptr + bc.to(tl.int64) * h * w,
        tl.load(mins_ptr + bc),
        tl.load(scales_ptr + bc),
        y0 * w + x0,
        y0 * w + x1,
        y1 * w + x0,
        y1 * w + x1,
        lx0,
        lx1,
        ly0,
        ly1,
        inside,
    )
    # value >= 0, so truncation is floor; value * BINS is exact (BINS is a power of two).
    bins = tl.minimum((value * BINS).to(tl.int32), BINS - 1)
    counts = tl.histogram(bins, BINS, mask=inside)
    tl.atomic_add(hist_ptr + bc.to(tl.int64) * BINS + tl.arange(0, BINS), counts)


# ----------------------------------------------------------------------------------------------
# Shared torch pieces


def _prepare(maps, valid, size, threshold, num_positive, num_negative):
    if maps.dim() != 4:
        raise ValueError(f"maps must be [B, C, h, w], got shape {tuple(maps.shape)}")
    B, C, h, w = maps.shape
    if min(B, C, h, w) == 0:
        raise ValueError(f"maps must not be empty, got shape {tuple(maps.shape)}")
    if C > 254:
        raise ValueError(f"at most 254 classes fit uint8 labels, got {C}")
    if tuple(valid.shape) != (B, C):
        raise ValueError(f"valid must be [B, C] = {(B, C)}, got {tuple(valid.shape)}")
    if isinstance(size, int):
        size = (size, size)
    H, W = (int(s) for s in size)
    if H <= 0 or W <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be a float in [0, 1] or 'otsu', got {threshold!r}")
    elif not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"a fixed threshold must lie in [0, 1], got {threshold}")
    if num_positive < 0 or num_negative < 0:
        raise ValueError("num_positive and num_negative must be >= 0")
    maps = maps.detach().to(torch.float32).contiguous()
    valid = valid.to(device=maps.device, dtype=torch.bool)
    return maps, valid, H, W


def normalisation_params(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-map minimum and 1 / (max - min) ([B, C] each); the scale is 0 for a constant map."""
    flat = maps.flatten(2)
    mins = flat.amin(-1)
    spread = flat.amax(-1) - mins
    tiny = torch.finfo(torch.float32).tiny
    scales = torch.where(spread >= tiny, 1.0 / spread.clamp_min(tiny), torch.zeros_like(spread))
    return mins.contiguous(), scales.contiguous()


def normalise_maps(maps: torch.Tensor, mins: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Min-max normalised maps in [0, 1], computed exactly as the kernel computes its taps."""
    return ((maps - mins[..., None, None]) * scales[..., None, None]).clamp(0.0, 1.0)


def otsu_from_histogram(hist: torch.Tensor, lo, hi) -> torch.Tensor:
    """Otsu's threshold from histograms [..., bins] of equal-width bins spanning [lo, hi].

    Returns the centre of the last bin of the lower class that maximises the between-class
    variance (first maximum), as `skimage.filters.threshold_otsu` does; the foreground is
    `value > threshold`. A histogram with a single occupied bin yields the first bin's centre.
    The sums are float64: scikit-image's are float32, so where two splits' variances agree to
    float32 precision it may return the neighbouring bin; this returns the exact first maximum.
    """
    bins = hist.shape[-1]
    hist = hist.to(torch.float64)
    lo = torch.as_tensor(lo, dtype=torch.float64, device=hist.device).expand(hist.shape[:-1])
    hi = torch.as_tensor(hi, dtype=torch.float64, device=hist.device).expand(hist.shape[:-1])
    width = (hi - lo) / bins
    steps = torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5
    centres = lo[..., None] + steps * width[..., None]
    w1 = hist.cumsum(-1)
    s1 = (hist * centres).cumsum(-1)
    w2 = w1[..., -1:] - w1
    s2 = s1[..., -1:] - s1
    m1 = s1 / w1.clamp_min(1.0)
    m2 = s2 / w2.clamp_min(1.0)
    between = (w1 * w2 * (m1 - m2) ** 2)[..., :-1]
    if bins == 1:
        return centres[..., 0].to(torch.float32)
    idx = between.argmax(-1, keepdim=True)
    return centres.gather(-1, idx).squeeze(-1).to(torch.float32)


def otsu_threshold(values: torch.Tensor, bins: int = HIST_BINS, value_range=None) -> torch.Tensor:
    """Otsu's threshold of each row of `values` [..., N] (batched over the leading dims).

    With `value_range=None` the histogram spans each row's own [min, max] (scikit-image's
    choice); a constant row yields its value. Otherwise it spans the given (lo, hi).
    """
    lead = values.shape[:-1]
    x = values.reshape(-1, values.shape[-1]).to(torch.float64)
    if value_range is None:
        lo, hi = x.amin(-1), x.amax(-1)
    else:
        lo = torch.full(x.shape[:1], float(value_range[0]), dtype=torch.float64, device=x.device)
        hi = torch.full(x.shape[:1], float(value_range[1]), dtype=torch.float64, device=x.device)
    span = hi - lo
    factor = torch.where(span > 0, bins / torch.where(span > 0, span, 1.0), 0.0)
    idx = ((x - lo[:, None]) * factor[:, None]).floor().clamp(0, bins - 1).long()
    hist = torch.zeros(x.shape[0], bins, dtype=torch.float64, device=x.device)
    hist.scatter_add_(1, idx, torch.ones_like(x))
    return otsu_from_histogram(hist, lo, hi).reshape(lead)


def histogram01(values: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """Counts [R, bins] of each row of `values` [R, N] (values in [0, 1]) in equal bins over
    [0, 1], the last bin closed; bin = min(floor(value * bins), bins - 1), as the kernel bins."""
    rows = values.shape[0]
    idx = (values * bins).floor().clamp(0, bins - 1).long()
    idx += bins * torch.arange(rows, device=values.device)[:, None]
    return torch.bincount(idx.reshape(-1), minlength=rows * bins).view(rows, bins)


def _segment_argmax(score, seg, n_seg, pix, n_pix):
    """Per segment: the first (raster order) pixel of maximal score, and that score.

    score, seg, pix: flat [B * N]; pixels with score -inf are never chosen. Returns (index within
    the image, or n_pix where the segment has no candidate; best score)."""
    top = torch.full((n_seg,), -math.inf, dtype=score.dtype, device=score.device)
    top = top.scatter_reduce(0, seg, score, "amax")
    cand = (score == top[seg]) & (score > -math.inf)
    first = torch.full((n_seg,), n_pix, dtype=torch.long, device=score.device)
    first = first.scatter_reduce(0, seg, torch.where(cand, pix, n_pix), "amin")
    return first, top


def sam_prompts(
    labels: torch.Tensor,
    best: torch.Tensor,
    coarse: torch.Tensor,
    valid: torch.Tensor,
    num_positive: int = 1,
    num_negative: int = 1,
) -> SamPrompts:
    """Boxes and points from a label map.

    labels [B, H, W] uint8; best [B, H, W] the winning class's normalised value at each labelled
    pixel; coarse [B, C, h, w] the normalised maps at map resolution; valid [B, C].

    Positive points: greedy non-maximum suppression on the winning value inside the class's
    region: take its maximum, blank a disc of radius POSITIVE_SPREAD * sqrt(area / pi) around it,
    repeat. This costs O(num_positive * B * H * W) whatever C is, needs only the [B, H, W]
    winning value (not the per-class upsampled maps), and unlike top-k after max-pool NMS it is
    not fooled by the flat-topped, exactly tied peaks that bilinear upsampling produces.

    Negative points, in this order of preference: the first positive point of every other class
    present in the image (most confident first), which tells SAM where the neighbouring objects
    are; then map cells whose centre pixel is background, lowest attention for this class first
    (cells on other classes' regions after those), spread at least NEGATIVE_SPREAD of the map's
    shorter side apart. A negative point is never on the class's own region.
    """
    device = labels.device
    B, H, W = labels.shape
    C, h, w = coarse.shape[1:]
    N = H * W
    S = C + 1  # segments per image; segment 0 is background
    P = num_positive + num_negative
    lab = labels.reshape(B, N).long()
    seg = (lab + S * torch.arange(B, device=device)[:, None]).reshape(-1)
    pix = torch.arange(N, device=device).repeat(B)
    ys, xs = pix // W, pix % W

    area = torch.bincount(seg, minlength=B * S)
    present = (area > 0).view(B, S)[:, 1:] & valid

    def per_segment(init, values, op):
        out = torch.full((B * S,), init, dtype=torch.long, device=device)
        return out.scatter_reduce(0, seg, values, op)

    x0, y0 = per_segment(W, xs, "amin"), per_segment(H, ys, "amin")
    x1, y1 = per_segment(-1, xs, "amax"), per_segment(-1, ys, "amax")
    boxes = torch.stack([x0, y0, x1 + 1, y1 + 1], -1).view(B, S, 4)[:, 1:].to(torch.float32)
    boxes = torch.where(present[..., None], boxes, torch.full_like(boxes, -1.0))

    points = torch.zeros(B, C, P, 2, dtype=torch.float32, device=device)
    point_labels = torch.full((B, C, P), -1, dtype=torch.long, device=device)

    # Positive points (also the first one per class feeds the negatives of the other classes).
    score = torch.where(lab.reshape(-1) > 0, best.reshape(-1).to(torch.float32), -math.inf)
    radius2 = (POSITIVE_SPREAD**2) * area.to(torch.float32) / math.pi
    pos_xy = torch.zeros(B, C, max(num_positive, 1), 2, dtype=torch.float32, device=device)
    pos_ok = torch.zeros(B, C, max(num_positive, 1), dtype=torch.bool, device=device)
    peak = torch.full((B, C), -math.inf, dtype=torch.float32, device=device)
    for j in range(max(num_positive, 1 if num_negative > 0 else 0)):
        first, top = _segment_argmax(score, seg, B * S, pix, N)
        found = first < N
        fy, fx = first // W, first % W
        pos_xy[:, :, j, 0] = fx.view(B, S)[:, 1:].float()
        pos_xy[:, :, j, 1] = fy.view(B, S)[:, 1:].float()
        pos_ok[:, :, j] = found.view(B, S)[:, 1:] & present
        if j == 0:
            peak = torch.where(present, top.view(B, S)[:, 1:], peak)
        if j + 1 < num_positive:
            d2 = ((ys - fy[seg]) ** 2 + (xs - fx[seg]) ** 2).to(torch.float32)
            score = torch.where(found[seg] & (d2 <= radius2[seg]), -math.inf, score)
    if num_positive > 0:
        ok, xy = pos_ok[:, :, :num_positive], pos_xy[:, :, :num_positive]
        points[:, :, :num_positive] = torch.where(ok[..., None], xy, 0.0)
        point_labels[:, :, :num_positive] = torch.where(ok, 1, -1)

    if num_negative > 0:
        # (a) other classes' strongest points, most confident class first.
        other = present[:, None, :] & ~torch.eye(C, dtype=torch.bool, device=device)[None]
        key = torch.where(other, peak[:, None, :], -math.inf)  # [B, C(self), C(other)]
        key, order = key.sort(dim=-1, descending=True, stable=True)
        take = min(num_negative, C)
        key, order = key[..., :take], order[..., :take]
        a_ok = key > -math.inf
        first_xy = pos_xy[:, :, 0]  # [B, C, 2]
        a_xy = first_xy[torch.arange(B, device=device)[:, None, None], order]  # [B, C, take, 2]

        # (b) low-attention map cells off the class's region, background cells first.
        iy = torch.arange(h, device=device)
        ix = torch.arange(w, device=device)
        cy = torch.clamp(((2 * iy + 1) * H) // (2 * h), max=H - 1)
        cx = torch.clamp(((2 * ix + 1) * W) // (2 * w), max=W - 1)
        cell_lab = labels[:, cy][:, :, cx].long().reshape(B, 1, h * w)  # label at each cell centre
        cls = torch.arange(1, C + 1, device=device).view(1, C, 1)
        cost = coarse.reshape(B, C, h * w).to(torch.float32) + 2.0 * (cell_lab != 0).float()
        cost = torch.where(cell_lab == cls, math.inf, cost)
        cell_y = iy.repeat_interleave(w)
        cell_x = ix.repeat(h)
        cell_r2 = float(max(1, round(NEGATIVE_SPREAD * min(h, w))) ** 2)
        b_xy = torch.zeros(B, C, num_negative, 2, dtype=torch.float32, device=device)
        b_ok = torch.zeros(B, C, num_negative, dtype=torch.bool, device=device)
        for j in range(num_negative):
            low, arg = cost.min(-1)
            b_ok[:, :, j] = low < math.inf
            b_xy[:, :, j, 0] = cx[cell_x[arg]].float()
            b_xy[:, :, j, 1] = cy[cell_y[arg]].float()
            if j + 1 < num_negative:
                d2 = (cell_y[None, None] - cell_y[arg][..., None]) ** 2 + (
                    cell_x[None, None] - cell_x[arg][..., None]
                ) ** 2
                cost = torch.where(d2 <= cell_r2, math.inf, cost)

        cand_xy = torch.cat([a_xy, b_xy], 2)
        cand_ok = torch.cat([a_ok, b_ok], 2) & present[..., None]
        # Move usable candidates to the front, keeping their order.
        order = (~cand_ok).to(torch.int8).argsort(dim=-1, stable=True)[..., :num_negative]
        neg_ok = cand_ok.gather(-1, order)
        neg_xy = cand_xy.gather(2, order[..., None].expand(-1, -1, -1, 2))
        points[:, :, num_positive:] = torch.where(neg_ok[..., None], neg_xy, 0.0)
        point_labels[:, :, num_positive:] = torch.where(neg_ok, 0, -1)

    return SamPrompts(boxes=boxes, points=points, point_labels=point_labels)


def _finish(labels, best, coarse, valid, thresholds, normalized, num_positive, num_negative):
    C = coarse.shape[1]
    classes = torch.arange(1, C + 1, dtype=torch.uint8, device=labels.device).view(1, C, 1, 1)
    class_masks = labels.unsqueeze(1) == classes
    prompts = sam_prompts(labels, best, coarse, valid, num_positive, num_negative)
    return ExtractedMasks(
        labels=labels,
        class_masks=class_masks,
        thresholds=thresholds,
        normalized=normalized,
        prompts=prompts,
    )


def _fixed_thresholds(valid: torch.Tensor, threshold: float) -> torch.Tensor:
    thr = torch.full(valid.shape, float(threshold), dtype=torch.float32, device=valid.device)
    return torch.where(valid, thr, INVALID_THRESHOLD)


# ----------------------------------------------------------------------------------------------
# Entry points


def extract_masks_reference(
    maps: torch.Tensor,
    valid: torch.Tensor,
    size,
    threshold: float | str = "otsu",
    num_positive: int = 1,
    num_negative: int = 1,
    return_normalized: bool = False,
) -> ExtractedMasks:
    """Plain torch: materialises the [B, C, H, W] upsampled maps."""
    maps, valid, H, W = _prepare(maps, valid, size, threshold, num_positive, num_negative)
    mins, scales = normalisation_params(maps)
    coarse = normalise_maps(maps, mins, scales)
    up = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    if threshold == "otsu":
        hist = histogram01(up.flatten(0, 1).flatten(1), HIST_BINS)
        thresholds = otsu_from_histogram(hist, 0.0, 1.0).view(valid.shape)
        thresholds = torch.where(valid, thresholds, INVALID_THRESHOLD)
    else:
        thresholds = _fixed_thresholds(valid, threshold)
    above = (up > thresholds[..., None, None]) & valid[..., None, None]
    scores = torch.where(above, up, -1.0)
    best = scores.amax(dim=1)
    winner = scores.argmax(dim=1)  # the first maximum: ties go to the lower class index
    any_above = above.any(dim=1)
    labels = torch.where(any_above, winner + 1, 0).to(torch.uint8)
    best = torch.where(any_above, best, -1.0)
    normalized = up if return_normalized else None
    return _finish(labels, best, coarse, valid, thresholds, normalized, num_positive, num_negative)


def extract_masks(
    maps: torch.Tensor,
    valid: torch.Tensor,
    size,
    threshold: float | str = "otsu",
    num_positive: int = 1,
    num_negative: int = 1,
    use_triton: bool | None = None,
    return_normalized: bool = False,
) -> ExtractedMasks:
    """Masks and prompts; steps 1-4 by the fused Triton kernel.

    maps [B, C, h, w]: finite attention values of any scale and float dtype (computed in
    float32); valid [B, C] bool; size (H, W) or an int. Same results as extract_masks_reference
    up to the rounding noted in the module docstring.

    use_triton=None runs Triton for CUDA tensors and the torch reference for CPU tensors (the
    faster choice there); use_triton=True on CPU tensors needs TRITON_INTERPRET=1.
    """
    if use_triton is None:
        use_triton = maps.is_cuda
    if not use_triton:
        return extract_masks_reference(
            maps, valid, size, threshold, num_positive, num_negative, return_normalized
        )
    if not maps.is_cuda and not _INTERPRETED:
        raise RuntimeError("the Triton kernels need CUDA tensors, "
                           "or TRITON_INTERPRET=1 set before this module is imported")
    maps, valid, H, W = _prepare(maps, valid, size, threshold, num_positive, num_negative)
    B, C, h, w = maps.shape
    device = maps.device
    mins, scales = normalisation_params(maps)
    scale_h, scale_w = h / H, w / W
    # A GPU wants many programs; the interpreter pays per program, so it gets few, large ones.
    block = 1024 if maps.is_cuda else min(65536, triton.next_power_of_2(H * W))
    n_blocks = triton.cdiv(H * W, block)

    if threshold == "otsu":
        hist = torch.zeros(B * C, HIST_BINS, dtype=torch.int32, device=device)
        map_ids = valid.reshape(-1).nonzero().squeeze(1).to(torch.int32)
        if map_ids.numel():
            _histogram_kernel[(map_ids.numel(), n_blocks)](
                maps, mins, scales, map_ids, hist, h, w, H, W, scale_h, scale_w,
                BINS=HIST_BINS, BLOCK=block,
            )
        thresholds = otsu_from_histogram(hist, 0.0, 1.0).view(B, C)
        thresholds = torch.where(valid, thresholds, INVALID_THRESHOLD).contiguous()
    else:
        thresholds = _fixed_thresholds(valid, threshold)

    labels = torch.empty(B, H, W, dtype=torch.uint8, device=device)
    best = torch.empty(B, H, W, dtype=torch.float32, device=device)
    normalized = (
        torch.empty(B, C, H, W, dtype=torch.float32, device=device) if return_normalized else best
    )
    valid_u8 = valid.to(torch.uint8).contiguous()
    _label_kernel[(B, n_blocks)](
        maps, mins, scales, thresholds, valid_u8, labels, best, normalized,
        C, h, w, H, W, scale_h, scale_w,
        WRITE_NORM=return_normalized, BLOCK=block,
    )
    coarse = normalise_maps(maps, mins, scales)
    normalized = normalized if return_normalized else None
    return _finish(labels, best, coarse, valid, thresholds, normalized, num_positive, num_negative)

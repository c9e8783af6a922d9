"""Python entry points to the C++ mask ops in magicseg_engine._C.

COCO RLE encode/decode/area, and mask cleanup and merging: remove_small_regions,
fill_small_holes, masks_to_boxes, mask_areas, merge_label_map (with merge_label_map_reference,
its plain numpy definition).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _extension_missing(err: BaseException) -> str:
    """What to run when _C cannot be loaded: the install that builds it, for this checkout or package."""
    root = Path(__file__).resolve().parents[2]
    source = (root / "CMakeLists.txt").is_file() and (root / "csrc").is_dir()
    text = str(err).strip().splitlines()
    why = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    if source:
        how = (f"build it by installing the package from its source folder: pip install -e {root} "
               "(a C++17 compiler and CMake >= 3.18 needed)")
    else:
        how = "reinstall the package: pip install --force-reinstall --no-deps magicseg-engine"
    if type(err).__name__ == "CalledProcessError":
        # An editable install made with editable.rebuild=true rebuilds _C on import; CMake's
        # output is printed above this error.
        why = "rebuilding it on import failed (CMake's output is above)"
    return f"magicseg_engine._C, the package's C++ extension, cannot be loaded ({why}); {how}"


try:
    from magicseg_engine import _C
except Exception as err:  # ImportError, or a failed rebuild of an editable install
    raise ImportError(_extension_missing(err)) from err

RLE = dict[str, Any]


def build_info() -> dict[str, Any]:
    """How the extension was built: CUDA ops compiled or not, compiler, default thread count."""
    return _C.build_info()


def _as_array(masks: Any) -> np.ndarray:
    # Look torch up only if the caller already imported it: this module must not pay
    # torch's import time just to recognise a tensor.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(masks, torch.Tensor):
        if masks.device.type != "cpu":
            raise ValueError(f"masks must be a CPU tensor, got one on {masks.device}; call .cpu() first")
        return masks.detach().numpy()  # shares memory and strides, no copy
    return np.asarray(masks)


def rle_encode(masks: Any, num_threads: int = 0) -> list[RLE]:
    """COCO compressed RLE of each mask, byte-identical to ``pycocotools.mask.encode``.

    ``masks`` is a numpy array or CPU torch tensor of shape (H, W) or (N, H, W), bool or
    integer; any nonzero value is foreground. Always returns a list, one
    ``{"size": [h, w], "counts": bytes}`` per mask. ``num_threads <= 0`` uses all cores.
    """
    arr = _as_array(masks)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim != 3:
        raise ValueError(f"masks must have shape (H, W) or (N, H, W), got shape {arr.shape}")
    if arr.dtype.kind not in "biu":
        raise ValueError(f"masks must be bool or integer, got dtype {arr.dtype}")
    if arr.dtype.itemsize != 1:
        # The C++ op reads one byte per pixel; wider integers are reduced here, once.
        arr = arr != 0
    h, w = int(arr.shape[1]), int(arr.shape[2])
    return [{"size": [h, w], "counts": c} for c in _C.rle_encode(arr, num_threads)]


def _size(rle: Any, i: int) -> tuple[int, int]:
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"rles[{i}] must be a dict with 'size' and 'counts', got {type(rle).__name__}")
    size = rle["size"]
    if len(size) != 2:
        raise ValueError(f"rles[{i}]['size'] must be [h, w], got {size!r}")
    return int(size[0]), int(size[1])


def _counts(rle: Mapping[str, Any], i: int) -> bytes:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        return counts
    if isinstance(counts, str):  # COCO json files hold counts as str
        try:
            return counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"rles[{i}]['counts'] has non-ASCII characters") from None
    if isinstance(counts, (bytearray, memoryview)):
        return bytes(counts)
    if isinstance(counts, (list, tuple)):
        raise ValueError(
            f"rles[{i}] is an uncompressed RLE (counts is a list); "
            "compress it first, e.g. with pycocotools.mask.frPyObjects"
        )
    raise ValueError(f"rles[{i}]['counts'] must be bytes or str, got {type(counts).__name__}")


def rle_decode(rles: RLE | Iterable[RLE], num_threads: int = 0) -> np.ndarray:
    """Masks from COCO compressed RLEs: (N, H, W) uint8 of 0/1, or (H, W) for a single dict.

    All RLEs of one call must have the same size. An empty list gives a (0, 0, 0) array.
    Raises ValueError for a malformed counts string or one that does not cover h*w pixels.
    """
    if isinstance(rles, Mapping):
        return rle_decode([rles], num_threads)[0]
    rles = list(rles)
    if not rles:
        return np.zeros((0, 0, 0), np.uint8)
    h, w = _size(rles[0], 0)
    for i, rle in enumerate(rles):
        if _size(rle, i) != (h, w):
            raise ValueError(
                f"rles[{i}] has size {list(_size(rle, i))} but rles[0] has {[h, w]}; "
                "decode masks of different sizes in separate calls"
            )
    return _C.rle_decode([_counts(r, i) for i, r in enumerate(rles)], h, w, num_threads)


def rle_area(rles: RLE | Iterable[RLE]) -> int | np.ndarray:
    """Foreground pixel count without decoding: an int for one dict, else an int64 array."""
    if isinstance(rles, Mapping):
        return int(rle_area([rles])[0])
    rles = list(rles)
    sizes = [_size(r, i) for i, r in enumerate(rles)]
    return _C.rle_area([_counts(r, i) for i, r in enumerate(rles)], sizes)


# --- mask cleanup and merging ------------------------------------------------------------


def _as_numpy(x: Any, name: str) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got one on {x.device}; call .cpu() first")
        return x.detach().numpy()  # shares memory and strides, no copy
    return np.asarray(x)


def _mask_bytes(masks: Any, ndims: tuple[int, ...], shape_text: str) -> np.ndarray:
    """masks as a bool/1-byte integer array of one of ``ndims`` dimensions, without a copy
    when it already is one (any strides); wider integers are reduced to ``!= 0`` here."""
    arr = _as_numpy(masks, "masks")
    if arr.ndim not in ndims:
        raise ValueError(f"masks must have shape {shape_text}, got shape {arr.shape}")
    if arr.dtype.kind not in "biu":
        raise ValueError(f"masks must be bool or integer, got dtype {arr.dtype}")
    if arr.dtype.itemsize != 1:
        arr = arr != 0
    return arr


def _batched(masks: Any) -> tuple[np.ndarray, bool]:
    arr = _mask_bytes(masks, (2, 3), "(H, W) or (N, H, W)")
    return (arr[None], True) if arr.ndim == 2 else (arr, False)


def _threshold(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _connectivity(connectivity: Any) -> int:
    if connectivity not in (4, 8) or isinstance(connectivity, bool):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    return int(connectivity)


def remove_small_regions(
    masks: Any, min_area: int, connectivity: int = 8, num_threads: int = 0
) -> np.ndarray:
    """Masks without their foreground connected components of fewer than ``min_area`` pixels.

    ``masks`` is a numpy array or CPU torch tensor of shape (N, H, W) or (H, W), bool or
    integer, any strides; any nonzero value is foreground. ``connectivity`` is 8 (pixels
    sharing an edge or a corner are connected) or 4 (an edge only). Returns uint8 0/1 masks of
    the input's shape. ``min_area <= 1`` removes nothing. ``num_threads <= 0`` uses all cores.
    """
    arr, single = _batched(masks)
    min_area = _threshold(min_area, "min_area")
    out = _C.remove_small_regions(arr, min_area, _connectivity(connectivity), num_threads)
    return out[0] if single else out


def fill_small_holes(masks: Any, max_area: int, connectivity: int = 8, num_threads: int = 0) -> np.ndarray:
    """Masks with every hole of at most ``max_area`` pixels filled.

    A hole is a connected component of background that does not touch the image border
    (background touching the border is outside the object, whatever its size). ``connectivity``
    is the foreground's, as in :func:`remove_small_regions`; holes use the complementary one:
    4-connected background for an 8-connected foreground (the default), 8-connected for a
    4-connected one. So with the default, a ring whose pixels meet only at corners still
    encloses its hole. Input as for :func:`remove_small_regions`; returns uint8 0/1 masks.
    """
    arr, single = _batched(masks)
    max_area = _threshold(max_area, "max_area")
    out = _C.fill_small_holes(arr, max_area, _connectivity(connectivity), num_threads)
    return out[0] if single else out


def masks_to_boxes(masks: Any, num_threads: int = 0) -> np.ndarray:
    """Bounding box of each mask's foreground: int32 (N, 4) rows (x0, y0, x1, y1).

    Ends are exclusive (x1 - x0 is the width), and an empty mask gets (-1, -1, -1, -1).
    A single (H, W) mask gives one (4,) box.
    """
    arr, single = _batched(masks)
    out = _C.masks_to_boxes(arr, num_threads)
    return out[0] if single else out


def mask_areas(masks: Any, num_threads: int = 0) -> np.ndarray | int:
    """Foreground pixel count of each mask: int64 (N,), or an int for a single (H, W) mask."""
    arr, single = _batched(masks)
    out = _C.mask_areas(arr, num_threads)
    return int(out[0]) if single else out


MERGE_RULES = ("score", "smaller")


def _merge_inputs(
    masks: Any, scores: Any, valid: Any, rule: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(B, C, H, W) masks, (B, C) float64 scores, (B, C) bool valid, whether one image was given."""
    arr = _mask_bytes(masks, (3, 4), "(C, H, W) or (B, C, H, W)")
    single = arr.ndim == 3
    if single:
        arr = arr[None]
    b, c = arr.shape[:2]
    if c > 254:
        raise ValueError(f"at most 254 classes fit a uint8 label map, got C={c}")
    if rule not in MERGE_RULES:
        raise ValueError(f"rule must be 'score' or 'smaller', got {rule!r}")
    want = (c,) if single else (b, c)
    sc = _as_numpy(scores, "scores")
    if sc.dtype.kind not in "biuf":
        raise ValueError(f"scores must be real numbers, got dtype {sc.dtype}")
    if valid is None:
        va = np.ones(want, bool)
    else:
        va = _as_numpy(valid, "valid")
        if va.dtype.kind not in "biu":
            raise ValueError(f"valid must be bool or integer, got dtype {va.dtype}")
    for name, x in (("scores", sc), ("valid", va)):
        if x.shape != want:
            given = arr.shape[1:] if single else arr.shape
            raise ValueError(f"{name} must have shape {want} to match masks of shape {given}, got {x.shape}")
    sc = np.asarray(sc, np.float64).reshape(b, c)
    va = (va != 0).reshape(b, c)
    if rule == "score" and np.isnan(sc[va]).any():
        raise ValueError("scores of valid classes must not be NaN")
    return arr, sc, va, single


def merge_label_map(
    masks: Any, scores: Any, valid: Any = None, rule: str = "score", num_threads: int = 0
) -> np.ndarray:
    """One uint8 label map per image from per-class masks: 0 is background, c + 1 is class c.

    ``masks`` is (B, C, H, W) (or (C, H, W) for one image, giving (H, W)), bool or integer,
    any strides, nonzero = foreground; numpy or CPU torch. ``scores`` is (B, C) float (or
    (C,)), ``valid`` (B, C) bool (None: all valid); invalid classes never appear. Where valid
    masks overlap, ``rule`` picks the class:

    * ``"score"``: the higher score (ties: the lower class index). NaN scores of valid
      classes are rejected.
    * ``"smaller"``: the class whose whole mask has fewer pixels, so a small object lying on a
      large one stays visible (ties: the lower class index). Scores are not used.

    C is at most 254. :func:`merge_label_map_reference` is the same definition in numpy.
    """
    arr, sc, va, single = _merge_inputs(masks, scores, valid, rule)
    out = _C.merge_label_map(arr, sc, va, rule, num_threads)
    return out[0] if single else out


def merge_label_map_reference(masks: Any, scores: Any, valid: Any = None, rule: str = "score") -> np.ndarray:
    """Plain numpy definition of :func:`merge_label_map` (same arguments and result), slow."""
    arr, sc, va, single = _merge_inputs(masks, scores, valid, rule)
    b, c, h, w = arr.shape
    out = np.zeros((b, h, w), np.uint8)
    index = np.arange(c)
    areas = (arr != 0).reshape(b, c, -1).sum(-1)
    for i in range(b):
        key = -sc[i] if rule == "score" else areas[i]
        # Priority order, winner first; lexsort's last key is the primary one.
        order = [k for k in np.lexsort((index, key)) if va[i, k]]
        for k in reversed(order):  # weakest first, so the winner paints last
            out[i][arr[i, k] != 0] = k + 1
    return out[0] if single else out

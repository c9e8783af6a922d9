"""Python entry points to the C++ mask ops in magicseg_engine._C (COCO RLE encode/decode/area)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from magicseg_engine import _C

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

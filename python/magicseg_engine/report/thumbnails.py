"""Small images of the chosen pairs: positive, negative and the mask laid over the positive.

Only the chosen samples' members are read, straight from their offsets in the shard (see
gather.py), so the cost does not depend on the size of the run.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from magicseg_engine.report.gather import SampleRef

THUMBNAIL_SIDE = 192  # longest side, in pixels: sharp in a 160 px grid cell on a 1.2x screen
IGNORE_LABEL = 255
IGNORE_COLOUR = (128, 128, 128)
OVERLAY_ALPHA = 0.6
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 weights: grey as the eye sees it


@dataclass(frozen=True)
class PairImages:
    """JPEG bytes of the three pictures of one pair; `overlay` is None for a sample without mask."""

    positive: bytes
    negative: bytes
    overlay: bytes | None


def class_colours(names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A distinct, stable colour per class: hues a golden-ratio step apart in name order, so
    neighbours in the list differ strongly and the same classes always get the same colours."""
    colours = {}
    for index, name in enumerate(sorted(set(names))):
        hue = (index * 0.618033988749895) % 1.0
        value = 0.95 if index % 2 == 0 else 0.75  # alternate brightness to separate close hues
        r, g, b = colorsys.hsv_to_rgb(hue, 0.8, value)
        colours[name] = (round(r * 255), round(g * 255), round(b * 255))
    return colours


def pair_images(ref: SampleRef, colours: dict[str, tuple[int, int, int]]) -> PairImages:
    """Thumbnails of one sample; ValueError names the member that cannot be read."""
    with open(ref.shard, "rb") as shard:
        positive = _decode(shard, ref, "pos.jpg", "RGB")
        negative = _decode(shard, ref, "neg.jpg", "RGB")
        labels = _decode(shard, ref, "mask.png", "L") if "mask.png" in ref.members else None
    positive = _fit(positive)
    overlay = None
    if labels is not None:
        labels = labels.resize(positive.size, Image.NEAREST)
        overlay = _jpeg(overlay_mask(np.asarray(positive), np.asarray(labels), ref.classes, colours))
    return PairImages(_jpeg(positive), _jpeg(_fit(negative)), overlay)


def overlay_mask(image: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 colours: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """`image` [H, W, 3] in grey, each class region tinted in its colour and outlined solidly.

    Label i is the i-th class of `classes` (1-based), 0 background, 255 ignore (grey). The
    picture under the tint is turned grey so that a region shows its class's legend colour,
    not a mix of that colour with the object's own (the positive beside it keeps its colours).
    """
    palette = np.zeros((256, 3), np.float32)
    painted = np.zeros(256, bool)
    for index, name in enumerate(classes, 1):
        if index < IGNORE_LABEL and name in colours:
            palette[index], painted[index] = colours[name], True
    palette[IGNORE_LABEL], painted[IGNORE_LABEL] = IGNORE_COLOUR, True
    grey = np.repeat((image.astype(np.float32) @ LUMA)[..., None], 3, axis=-1)
    tint = palette[labels]
    mask = painted[labels][..., None]
    out = np.where(mask, (1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * tint, grey)
    # Outline: pixels whose right or lower neighbour has another label, drawn in full colour.
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge &= painted[labels]
    out[edge] = tint[edge]
    return np.clip(out, 0, 255).astype(np.uint8)


def _decode(shard, ref: SampleRef, ext: str, mode: str) -> Image.Image:
    offset, size = ref.members[ext]
    shard.seek(offset)
    data = shard.read(size)
    try:
        with Image.open(BytesIO(data)) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{ref.key}.{ext} in {ref.shard.name} is not a readable image ({err})") from None


def _fit(image: Image.Image) -> Image.Image:
    """Shrink to THUMBNAIL_SIDE, or enlarge a small image by a whole factor without smoothing,
    so that the browser does not blur it and the mask outline stays one screen pixel thin."""
    factor = THUMBNAIL_SIDE // max(image.size)
    if factor >= 2:
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    image = image.copy()
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BICUBIC)
    return image


def _jpeg(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()

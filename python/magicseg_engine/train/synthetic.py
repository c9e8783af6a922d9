"""A synthetic run directory of coloured shapes, in the sample format generate writes.

The shapes, their colours and their drawing are the shapes world's (`world.shapes`). Each
class is a coloured shape ("red circle", "blue triangle"; a bare shape name takes that
shape's default colour). A sample shows one or two classes on a smooth, noisy, low-saturation
background; its twin is the same background without the shapes, its mask labels each shape's
pixels with the 1-based index of its class in the sample's "classes". Shapes are drawn without
anti-aliasing from the same footprint as the mask, so image and mask agree pixel for pixel
(up to JPEG). Everything is a function of the seed: the same call writes the same samples, a
held-out split is the same call with another seed.

`write_coordinate_run` writes a second kind, for checking that a loader keeps image, twin and
mask aligned: pixel values encode their own coordinates and the mask is a checkerboard.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from magicseg_engine.data.encoding import encode_jpeg, encode_png
from magicseg_engine.data.shards import ShardWriter, finished_keys, sample_key
from magicseg_engine.prompts.records import sample_seed
from magicseg_engine.world.shapes import ANY_FLOOR, COLOURS, SHAPES, caption, draw_scene, parse_class

__all__ = ["COLOURS", "SHAPES", "parse_class", "render_sample", "write_synthetic_run", "write_coordinate_run"]

MODEL_ID = "synthetic-shapes"
BACKGROUND_PROMPT = ANY_FLOOR
DEFAULT_CLASSES = ("red circle", "green square", "blue triangle", "yellow diamond")


def render_sample(rng: np.random.Generator, names: Sequence[str],
                  size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positive RGB, twin RGB, uint8 label map) of one sample showing the classes `names`."""
    return draw_scene(rng, names, size)


def write_synthetic_run(
    out_dir: Path | str,
    num_samples: int,
    size: int = 64,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    *,
    samples_per_shard: int = 64,
    masks: bool = True,
    max_classes: int = 2,
    jpeg_quality: int = 95,
    writer_id: str = "0",
    floors: Sequence[str] | None = None,
) -> list[str]:
    """Write `num_samples` shape samples into the run directory `out_dir`; return the class names.

    Samples are what generate writes: `pos.jpg`, `neg.jpg`, `mask.png` (left out when `masks`
    is False, like `--mask-source none`) and `json` with "classes", "prompt",
    "negative_prompt", "seed", "mask_source" and the rest of generate's metadata. Keys come from
    `sample_key`, so samples a directory already holds are not written again, and another
    seed (a held-out split, or more data in the same directory) gives other keys.

    `floors` draws each sample on one of the world's named floors ("grey floor"), captioned as
    the shapes world captions it; None keeps the one textured background of earlier runs.
    """
    names = [" ".join(c.strip().lower().split()) for c in classes]
    for name in names:
        parse_class(name)
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"classes must be distinct and non-empty, got {list(classes)}")
    if not 1 <= max_classes <= len(names):
        raise ValueError(f"max_classes must be in 1..{len(names)}, got {max_classes}")
    out_dir = Path(out_dir)
    done = finished_keys(out_dir)
    with ShardWriter(out_dir, samples_per_shard, writer_id, prefix="synthetic") as writer:
        for index in range(num_samples):
            item_seed = sample_seed(seed, index)
            rng = np.random.default_rng(item_seed)
            count = int(rng.integers(1, max_classes + 1))
            chosen = [names[i] for i in rng.choice(len(names), size=count, replace=False)]
            floor_name = floors[int(rng.integers(len(floors)))] if floors else ANY_FLOOR
            prompt, negative = caption(chosen, floor_name), caption([], floor_name)
            key = sample_key(MODEL_ID, prompt, negative if floors else BACKGROUND_PROMPT, item_seed)
            if key in done:
                continue
            image, twin, labels = draw_scene(rng, chosen, size, floor_name)
            files = {"pos.jpg": encode_jpeg(image, jpeg_quality), "neg.jpg": encode_jpeg(twin, jpeg_quality)}
            meta = {
                "key": key, "prompt_id": f"synthetic-{seed}-{index}", "classes": chosen,
                "prompt": prompt, "negative_prompt": negative if floors else BACKGROUND_PROMPT, "seed": item_seed,
                "model": MODEL_ID, "preset": "synthetic", "size": [size, size],
                "shared_noise": True, "mask_source": "synthetic" if masks else "none",
            }
            if masks:
                files["mask.png"] = encode_png(labels)
                meta["masks"] = {
                    "classes": [{"name": n, "found": True, "pixels": int((labels == i).sum())}
                                for i, n in enumerate(chosen, 1)],
                    "counterfactual": {"passed": True, "reason": None},
                }
            files["json"] = json.dumps(meta, sort_keys=True).encode()
            writer.add(key, files)
    return names


COORDINATE_CLASSES = ("even cell", "odd cell")
COORDINATE_CELL = 8  # checkerboard cell side in pixels


def coordinate_labels(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The coordinate run's label at integer pixel (x, y): a checkerboard of 1 and 2, and
    IGNORE (255) in the top-left cell, so that ignore labels are checked too."""
    cx, cy = x // COORDINATE_CELL, y // COORDINATE_CELL
    labels = (1 + (cx + cy) % 2).astype(np.uint8)
    return np.where((cx == 0) & (cy == 0), np.uint8(255), labels)


def write_coordinate_run(out_dir: Path | str, num_samples: int, size: int = 64, seed: int = 0,
                         *, samples_per_shard: int = 64) -> list[str]:
    """Samples whose pixels encode where they are: red = x, green = y (scaled to 0-255), blue
    200 in the positive and 0 in the twin; the mask is `coordinate_labels`.

    After any crop, flip or rescale, a loader output pixel's red and green say which source
    pixel it came from, so the mask label there must be that pixel's label and the twin's red
    and green must equal the image's. JPEG at quality 100 without chroma subsampling keeps the
    ramps within about one level. Returns the class names.
    """
    ys, xs = np.mgrid[0:size, 0:size]
    scale = 255.0 / (size - 1)
    ramp = np.stack([np.rint(xs * scale), np.rint(ys * scale)], axis=-1).astype(np.uint8)
    image = np.concatenate([ramp, np.full((size, size, 1), 200, np.uint8)], axis=-1)
    twin = np.concatenate([ramp, np.zeros((size, size, 1), np.uint8)], axis=-1)
    labels = coordinate_labels(xs, ys)

    def jpeg(pixels: np.ndarray) -> bytes:
        buf = BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=100, subsampling=0)
        return buf.getvalue()

    files = {"pos.jpg": jpeg(image), "neg.jpg": jpeg(twin), "mask.png": encode_png(labels)}
    classes = list(COORDINATE_CLASSES)
    out_dir = Path(out_dir)
    done = finished_keys(out_dir)
    with ShardWriter(out_dir, samples_per_shard, "0", prefix="coordinates") as writer:
        for index in range(num_samples):
            # Every sample has the same pixels; only its seed (and so its key and crop) differs.
            item_seed = sample_seed(seed, index)
            prompt = "a checkerboard"
            key = sample_key("synthetic-coordinates", prompt, "", item_seed)
            if key in done:
                continue
            meta = {"key": key, "prompt_id": f"coordinates-{seed}-{index}", "classes": classes,
                    "prompt": prompt, "negative_prompt": "", "seed": item_seed,
                    "model": "synthetic-coordinates", "size": [size, size], "mask_source": "synthetic"}
            writer.add(key, {**files, "json": json.dumps(meta, sort_keys=True).encode()})
    return classes

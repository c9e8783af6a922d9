"""The shapes world: solid-coloured shapes on muted floors, with captions and exact label maps.

Everything about the world lives here, so that training the `shapes` text-to-image model,
writing synthetic segmentation runs, checking generated images and evaluating pretrained
models all draw and read the same world:

- drawing: `draw_scene` puts one or two shapes on a floor; the label map is the footprint the
  shapes were filled from, so image and truth agree pixel for pixel.
- language: `caption` says what a scene shows ("a red circle and a blue star on a grey floor");
  "nothing" stands where a shape was removed, the way the engine writes counterfactual negatives.
- reading: `colour_masks` and `classify_shape` find the shapes in any image of the world,
  generated ones included. The palette is saturated and the floors are not, so a pixel's colour
  says which shape it belongs to; the footprint's best-matching template says which shape it is.

A class is "colour shape" ("red circle"); a bare shape name takes its default colour.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from magicseg_engine.errors import UsageError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 60, 230), "yellow": (235, 215, 20),
    "magenta": (210, 40, 200), "cyan": (20, 200, 210), "orange": (245, 130, 10), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star")
# Default colours of bare shape names: all different, so a bare vocabulary stays learnable by colour.
DEFAULT_COLOUR = {"circle": "red", "square": "green", "triangle": "blue", "diamond": "yellow",
                  "cross": "magenta", "ring": "cyan", "star": "orange"}

# The vocabulary the `shapes` text-to-image model is trained on: 6 x 6 = 36 classes. Orange and
# white are left out: orange sits between red and yellow, white next to the light floor.
WORLD_COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
WORLD_SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
# Floors by name: the range of their grey level. Named floors are plain (a soft gradient and a
# little grain), so that a model trained for minutes spends its capacity on the shapes.
FLOORS: dict[str, tuple[float, float]] = {"grey floor": (100.0, 140.0), "dark floor": (40.0, 70.0),
                                          "light floor": (170.0, 200.0)}
# The synthetic runs' floor: any grey, named by what it looks like.
ANY_FLOOR = "a textured background"
_ANY_FLOOR_RANGE = (70.0, 170.0)

# Shapes are drawn with radius r in [MIN_RADIUS, MAX_RADIUS] x image side (the synthetic runs'
# range; the world's scenes use WORLD_RADIUS, larger, so that a shape spans several latent
# pixels); a shape narrower than a few pixels cannot be told from another, so worlds smaller
# than MIN_SIZE are refused.
MIN_RADIUS, MAX_RADIUS = 0.14, 0.28
WORLD_RADIUS = (0.20, 0.30)
MIN_SIZE = 32


def world_classes(colours: Sequence[str] = WORLD_COLOURS, shapes: Sequence[str] = WORLD_SHAPES) -> list[str]:
    """Every "colour shape" class of the world, colours major."""
    return [f"{c} {s}" for c in colours for s in shapes]


def parse_class(name: str) -> tuple[str, tuple[int, int, int]]:
    """(shape, RGB colour) of a class name like "red circle" or "circle"; ValueError if unknown."""
    shape, colour = split_class(name)
    return shape, COLOURS[colour]


def split_class(name: str) -> tuple[str, str]:
    """(shape, colour name) of a class name; ValueError if it is not a class of the world."""
    words = name.strip().lower().split()
    if not words or words[-1] not in SHAPES or len(words) > 2:
        raise ValueError(f"unknown synthetic class {name!r}: use '[colour] shape' with shape in {SHAPES}")
    colour = words[0] if len(words) == 2 else DEFAULT_COLOUR[words[-1]]
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r} in {name!r}: choose from {sorted(COLOURS)}")
    return words[-1], colour


# --- drawing ------------------------------------------------------------------------------

def floor(rng: np.random.Generator, size: int, grey: tuple[float, float] = _ANY_FLOOR_RANGE) -> np.ndarray:
    """The synthetic runs' background: smooth blotches of muted colour plus pixel noise, texture
    without any saturated colour."""
    grid = 2 + int(rng.integers(0, 5))
    base = rng.uniform(grey[0], grey[1], size=(grid, grid, 1))
    tint = rng.uniform(-15, 15, size=(grid, grid, 3))
    coarse = Image.fromarray(np.clip(base + tint, 0, 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32)
    noise = rng.normal(0.0, 8.0, size=(size, size, 1)) + rng.normal(0.0, 3.0, size=(size, size, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def plain_floor(rng: np.random.Generator, size: int, grey: tuple[float, float]) -> np.ndarray:
    """A grey floor: one level from `grey`, a soft linear gradient and a little grain."""
    level = rng.uniform(grey[0], grey[1])
    gx, gy = rng.uniform(-8.0, 8.0, size=2)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    shade = level + gx * ramp[None, :] + gy * ramp[:, None]
    grain = rng.normal(0.0, 2.0, size=(size, size))
    return np.clip(np.repeat((shade + grain)[..., None], 3, axis=-1), 0, 255).astype(np.uint8)


def _polygon(cx: float, cy: float, r: float, angle: float, points: Sequence[tuple[float, float]]) -> list[tuple]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        theta = math.pi * k / points - math.pi / 2
        out.append((radius * math.cos(theta), radius * math.sin(theta)))
    return out


_UNIT_SHAPES = {
    "square": [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)],
    "triangle": [(0.0, -1.0), (0.87, 0.5), (-0.87, 0.5)],
    "diamond": [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)],
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "star": _star(),
}
# Rotations after which a shape looks the same: templates need only angles in [0, period).
_SYMMETRY = {"circle": 0.0, "ring": 0.0, "square": math.pi / 2, "cross": math.pi / 2,
             "triangle": 2 * math.pi / 3, "star": 2 * math.pi / 5, "diamond": math.pi}
RING_INNER = 0.55


def footprint(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean [size, size] pixels of one shape, drawn without anti-aliasing."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
        if shape == "ring":
            inner = RING_INNER * r
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon(_polygon(cx, cy, r, angle, _UNIT_SHAPES[shape]), fill=1)
    return np.asarray(canvas, dtype=bool)


def _place(rng: np.random.Generator, shape: str, size: int, taken: np.ndarray,
           radius: tuple[float, float] = (MIN_RADIUS, MAX_RADIUS)) -> np.ndarray:
    """A footprint that overlaps the shapes already placed as little as a few tries allow."""
    best = None
    for _ in range(30):
        r = rng.uniform(*radius) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        fp = footprint(shape, size, cx, cy, r, rng.uniform(0, 2 * math.pi))
        overlap = int((fp & taken).sum())
        if best is None or overlap < best[0]:
            best = (overlap, fp)
        if overlap == 0:
            break
    return best[1]


def draw_scene(rng: np.random.Generator, names: Sequence[str], size: int,
               floor_name: str = ANY_FLOOR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positive RGB, twin RGB, uint8 label map) of one scene showing the classes `names`.

    The twin is the same floor without the shapes; label i marks the pixels of `names[i-1]`.
    The synthetic runs' textured background (`ANY_FLOOR`) keeps their smaller shapes; named
    floors are the world's, plain, with larger shapes.
    """
    if floor_name == ANY_FLOOR:
        twin, radius = floor(rng, size), (MIN_RADIUS, MAX_RADIUS)
    else:
        twin, radius = plain_floor(rng, size, FLOORS[floor_name]), WORLD_RADIUS
    image = twin.copy()
    labels = np.zeros((size, size), dtype=np.uint8)
    for index, name in enumerate(names, 1):
        shape, colour = parse_class(name)
        fp = _place(rng, shape, size, labels > 0, radius)
        # A little shading noise so the class is a colour region, not one exact RGB value.
        shade = rng.normal(0.0, 6.0, size=(int(fp.sum()), 1))
        image[fp] = np.clip(np.asarray(colour, dtype=np.float64) + shade, 0, 255).astype(np.uint8)
        labels[fp] = index
    return image, twin, labels


# --- language -----------------------------------------------------------------------------

def caption(names: Sequence[str | None], floor_name: str = ANY_FLOOR) -> str:
    """What a scene shows: "a red circle and nothing on a grey floor"; None is a removed shape."""
    things = [f"a {n}" if n else "nothing" for n in names] or ["nothing"]
    where = floor_name if floor_name == ANY_FLOOR else f"a {floor_name}"
    return f"{' and '.join(things)} on {where}"


@dataclass(frozen=True)
class World:
    """Which scenes the world draws: its classes, floors, image side and shapes per scene.

    Two shapes in one scene never share a colour, so colour alone tells them apart in any
    image of the world.
    """

    classes: tuple[str, ...] = tuple(world_classes())
    floors: tuple[str, ...] = tuple(FLOORS)
    size: int = 32
    max_classes: int = 2
    # Scenes with no shape at all, captioned "nothing on a grey floor".
    empty_fraction: float = 0.15

    def check(self) -> World:
        """This world, or UsageError naming what makes it impossible to draw."""
        if not self.classes:
            raise UsageError("the world has no classes; name at least one 'colour shape' class")
        for name in self.classes:
            try:
                split_class(name)
            except ValueError as err:
                raise UsageError(f"the world cannot draw {err}") from None
        if len(set(self.classes)) != len(self.classes):
            raise UsageError("the world's classes must be distinct")
        if self.size < MIN_SIZE or self.size % 8:
            raise UsageError(f"world images must be a multiple of 8 and at least {MIN_SIZE} pixels wide "
                             f"for the shapes to be told apart, got {self.size}")
        bad = [f for f in self.floors if f not in FLOORS]
        if bad or not self.floors:
            raise UsageError(f"unknown floor {bad[0] if bad else '(none)'}; choose from {', '.join(FLOORS)}")
        colours = {split_class(c)[1] for c in self.classes}
        if not 1 <= self.max_classes <= min(len(colours), 2):
            raise UsageError(f"max_classes must be 1 or 2 and at most the number of colours ({len(colours)}), "
                             f"got {self.max_classes}")
        if not 0.0 <= self.empty_fraction < 1.0:
            raise UsageError(f"empty_fraction must lie in [0, 1), got {self.empty_fraction}")
        return self

    def choose(self, rng: np.random.Generator) -> tuple[list[str], str]:
        """The classes (distinct colours) and floor of one random scene."""
        floor_name = self.floors[int(rng.integers(len(self.floors)))]
        if rng.random() < self.empty_fraction:
            return [], floor_name
        count = int(rng.integers(1, self.max_classes + 1))
        chosen: list[str] = []
        for i in rng.permutation(len(self.classes)):
            name = self.classes[int(i)]
            if all(split_class(name)[1] != split_class(c)[1] for c in chosen):
                chosen.append(name)
            if len(chosen) == count:
                break
        return chosen, floor_name

    def training_caption(self, rng: np.random.Generator, names: Sequence[str], floor_name: str) -> str:
        """A caption of the scene, sometimes with "nothing" in a free slot: the engine's negatives
        replace each removed class by "nothing", so the model must learn that it draws nothing."""
        slots: list[str | None] = list(names)
        if len(slots) < self.max_classes and rng.random() < 0.5:
            slots.insert(int(rng.integers(0, len(slots) + 1)), None)
        return caption(slots, floor_name)


# --- reading ------------------------------------------------------------------------------

# A pixel belongs to a palette colour when it is nearer to it than to any other and within
# this RGB distance; floors are grey, so they are far from every world colour.
COLOUR_DISTANCE = 90.0
# A class is present when its colour covers at least this fraction of the image.
MIN_PRESENT_FRACTION = 0.006


def colour_masks(image: np.ndarray, colours: Sequence[str], palette: Sequence[str] = WORLD_COLOURS) -> np.ndarray:
    """[len(colours), H, W] bool: the pixels of `image` (RGB uint8) whose colour is each of `colours`."""
    names = list(dict.fromkeys([*palette, *colours]))
    ref = np.asarray([COLOURS[n] for n in names], dtype=np.float32)
    pixels = image.reshape(-1, 3).astype(np.float32)
    dist = np.linalg.norm(pixels[:, None, :] - ref[None], axis=-1)
    nearest = dist.argmin(axis=1)
    near = dist[np.arange(len(pixels)), nearest] < COLOUR_DISTANCE
    out = np.stack([(nearest == names.index(c)) & near for c in colours]) if colours else np.zeros((0, len(pixels)), bool)
    return out.reshape(len(colours), *image.shape[:2])


def truth_labels(image: np.ndarray, names: Sequence[str], palette: Sequence[str] = WORLD_COLOURS) -> np.ndarray:
    """uint8 label map of `image`: label i where the colour of `names[i-1]` is, 0 elsewhere."""
    masks = colour_masks(image, [split_class(n)[1] for n in names], palette)
    labels = np.zeros(image.shape[:2], dtype=np.uint8)
    for i, m in enumerate(masks, 1):
        labels[m] = i
    return labels


@functools.lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
    """Area of a shape of radius 1, measured on a large drawing."""
    r = 400.0
    return float(footprint(shape, 1000, 500, 500, r, 0.0).sum()) / r**2


# Templates are drawn this many times finer than the image and compared as pixel coverage:
# drawn at the image's own resolution, a template's rasterisation depends on where its centre
# falls within a pixel, and a true circle of the world then matched a square better 18% of the
# time; at 4x every drawn shape of the world is classified right.
TEMPLATE_SUPERSAMPLING = 4


def classify_shape(mask: np.ndarray, shapes: Sequence[str] = WORLD_SHAPES,
                   angles: int = 10) -> tuple[str | None, float]:
    """(shape, IoU) of the template that best fits the footprint `mask`; (None, 0) when empty.

    Each template is drawn at the footprint's centroid with the radius that gives it the same
    area, at `angles` rotations over its symmetry period, as the fraction of each pixel it
    covers; the best soft IoU (sum of minima over sum of maxima) wins.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None, 0.0
    ss = TEMPLATE_SUPERSAMPLING
    height, width = mask.shape
    size = max(height, width)
    # Pixel i covers [i, i + 1): the centroid of the pixels' indices plus one half is the
    # footprint's centre in those units.
    cx, cy, area = xs.mean() + 0.5, ys.mean() + 0.5, float(len(xs))
    target = mask.astype(np.float32)
    best: tuple[str | None, float] = (None, 0.0)
    for shape in shapes:
        r = math.sqrt(area / _unit_area(shape))
        period = _SYMMETRY[shape]
        for k in range(angles if period else 1):
            fine = footprint(shape, size * ss, cx * ss, cy * ss, r * ss, period * k / angles)
            cover = fine.reshape(size, ss, size, ss).mean(axis=(1, 3))[:height, :width]
            union = float(np.maximum(cover, target).sum())
            iou = float(np.minimum(cover, target).sum()) / union if union else 0.0
            if iou > best[1]:
                best = (shape, iou)
    return best


def find_class(image: np.ndarray, name: str, palette: Sequence[str] = WORLD_COLOURS,
               shapes: Sequence[str] = WORLD_SHAPES) -> tuple[bool, bool]:
    """(colour present, colour present and the right shape) for the class `name` in `image`."""
    shape, colour = split_class(name)
    mask = colour_masks(image, [colour], palette)[0]
    if mask.mean() < MIN_PRESENT_FRACTION:
        return False, False
    return True, classify_shape(mask, shapes)[0] == shape

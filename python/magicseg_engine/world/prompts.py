"""Prompts in the shapes world's own language, for the `shapes` preset's `world` prompt source.

The shapes text encoder knows only the words of the world's captions, so the scene descriptions
are captions: "a red circle and a blue star on a grey floor", the floor chosen per sample.
"""

from __future__ import annotations

import random

from magicseg_engine.errors import UsageError
from magicseg_engine.world.shapes import FLOORS, WORLD_COLOURS, WORLD_SHAPES, caption, split_class


def check_world_classes(classes: list[str] | tuple[str, ...]) -> None:
    """UsageError unless every class is a "colour shape" the shapes model was trained on."""
    for name in classes:
        try:
            shape, colour = split_class(name)
        except ValueError:
            shape, colour = "", ""
        if shape not in WORLD_SHAPES or colour not in WORLD_COLOURS or len(name.split()) != 2:
            raise UsageError(f"class {name!r} is not in the shapes world; use --classes shapes, or classes "
                             f"'colour shape' with colour in {', '.join(WORLD_COLOURS)} and shape in "
                             f"{', '.join(WORLD_SHAPES)}")


def describe_world(combos: list[tuple[str, ...]], seed: int) -> tuple[list[tuple[str, ...]], list[str]]:
    """(classes, caption) per sample. Classes of one colour never share a scene (the world never
    drew them together, and colour is how its images are read), so a second class with the
    first's colour is dropped from its sample."""
    check_world_classes(sorted({c for combo in combos for c in combo}))
    out_combos, captions = [], []
    floors = sorted(FLOORS)
    for i, combo in enumerate(combos):
        kept: list[str] = []
        for name in combo:
            if all(split_class(name)[1] != split_class(k)[1] for k in kept):
                kept.append(name)
        # One generator per sample: any sample can be rebuilt without the ones before it.
        floor_name = random.Random(f"{seed}/world/{i}").choice(floors)
        out_combos.append(tuple(kept))
        captions.append(caption(kept, floor_name))
    return out_combos, captions

"""The shapes world: drawing, captions, reading images back, and the world prompt source."""

import math

import numpy as np
import pytest

from magicseg_engine.errors import UsageError
from magicseg_engine.world.shapes import (
    COLOURS, FLOORS, WORLD_SHAPES, World, caption, classify_shape, colour_masks, draw_scene, find_class,
    footprint, truth_labels, world_classes,
)


def _scenes(count, seed=0, world=None):
    world = world or World()
    rng = np.random.default_rng(seed)
    for _ in range(count):
        names, floor_name = world.choose(rng)
        image, twin, labels = draw_scene(rng, names, world.size, floor_name)
        yield names, floor_name, image, twin, labels


def test_truth_maps_match_the_drawings_pixel_for_pixel():
    checked = 0
    for names, _, image, twin, labels in _scenes(60):
        # Outside the shapes the image is its twin, the floor, untouched.
        assert np.array_equal(image[labels == 0], twin[labels == 0])
        for i, name in enumerate(names, 1):
            colour = np.asarray(COLOURS[name.split()[0]], dtype=np.int16)
            inside = image[labels == i].astype(np.int16)
            assert len(inside) > 0
            # Shading noise has sigma 6: every pixel of the class stays near its colour.
            assert np.abs(inside - colour).max() < 40
        # Reading the colours back finds exactly the drawn footprints.
        assert np.array_equal(truth_labels(image, names), labels)
        checked += len(names)
    assert checked > 40


def test_a_scene_is_a_function_of_its_seed():
    a = list(_scenes(5, seed=3))
    b = list(_scenes(5, seed=3))
    c = list(_scenes(5, seed=4))
    assert all(np.array_equal(x[2], y[2]) and x[0] == y[0] for x, y in zip(a, b))
    assert not all(np.array_equal(x[2], y[2]) for x, y in zip(a, c))


def test_two_shapes_of_one_scene_never_share_a_colour_and_empty_scenes_occur():
    empty = 0
    for names, floor_name, *_ in _scenes(300, seed=1):
        assert floor_name in FLOORS
        colours = [n.split()[0] for n in names]
        assert len(set(colours)) == len(colours)
        empty += not names
    assert 20 < empty < 80  # empty_fraction 0.15 of 300


@pytest.mark.parametrize("shape", WORLD_SHAPES)
def test_the_shape_reader_names_every_shape_at_any_size_and_rotation(shape):
    rng = np.random.default_rng(0)
    for _ in range(12):
        r = rng.uniform(0.14, 0.28) * 64
        cx, cy = rng.uniform(r, 64 - r, size=2)
        mask = footprint(shape, 64, cx, cy, r, rng.uniform(0, 2 * math.pi))
        found, iou = classify_shape(mask)
        assert found == shape and iou > 0.7


def test_find_class_needs_the_colour_and_the_shape():
    rng = np.random.default_rng(5)
    image, twin, _ = draw_scene(rng, ["red circle", "blue star"], 64, "grey floor")
    assert find_class(image, "red circle") == (True, True)
    assert find_class(image, "blue star") == (True, True)
    assert find_class(image, "red square") == (True, False)  # right colour, wrong shape
    assert find_class(image, "green circle") == (False, False)
    assert find_class(twin, "red circle") == (False, False)


def test_floors_hold_no_world_colour():
    for names, _, image, twin, labels in _scenes(40, seed=2):
        assert not colour_masks(twin, ["red", "green", "blue", "yellow", "magenta", "cyan"]).any()


def test_captions_and_the_engines_negatives_speak_the_same_language():
    from magicseg_engine.prompts.counterfactual import make_negative

    assert caption(["red circle", "blue star"], "grey floor") == "a red circle and a blue star on a grey floor"
    assert caption([], "dark floor") == "nothing on a dark floor"
    # The engine's negative of a world caption is a caption the world trains on.
    negative = make_negative("a red circle and a blue star on a grey floor", ["red circle", "blue star"])
    assert negative == caption([None, None], "grey floor") == "nothing and nothing on a grey floor"
    world = World()
    rng = np.random.default_rng(0)
    seen = {world.training_caption(rng, ["red circle"], "grey floor") for _ in range(40)}
    assert seen == {"a red circle on a grey floor", "nothing and a red circle on a grey floor",
                    "a red circle and nothing on a grey floor"}


@pytest.mark.parametrize("world, message", [
    (World(classes=()), "no classes"),
    (World(size=24), "at least 32 pixels"),
    (World(size=60), "multiple of 8"),
    (World(classes=("red blob",)), "cannot draw"),
    (World(floors=("wooden floor",)), "unknown floor"),
    (World(classes=("red circle", "red star"), max_classes=2), "number of colours"),
])
def test_a_world_that_cannot_be_drawn_is_a_usage_error(world, message):
    with pytest.raises(UsageError, match=message):
        world.check()


def test_the_world_prompt_source_writes_captions_with_negatives(tmp_path):
    from magicseg_engine.config import load_preset
    from magicseg_engine.prompts import build_prompts
    from magicseg_engine.vocab import Vocabulary, load_vocabulary

    config = load_preset("shapes").prompts
    assert config.source == "world"
    vocab = load_vocabulary("shapes")
    assert list(vocab.classes) == world_classes() and len(vocab) == 36
    records = build_prompts(config, vocab=vocab, num=40).records
    assert len(records) == 40
    for r in records:
        assert r.prompt == caption(r.classes, r.prompt.split(" on a ")[-1])
        assert r.negative_prompt.startswith("nothing") and not any(c in r.negative_prompt for c in r.classes)
        assert len({c.split()[0] for c in r.classes}) == len(r.classes)
    # Two classes of one colour never share a pair: the second is dropped.
    same = build_prompts(config, vocab=Vocabulary("two", ("red circle", "red star")), num=6).records
    assert all(len(r.classes) == 1 for r in same)
    with pytest.raises(UsageError, match="not in the shapes world"):
        build_prompts(config, vocab=Vocabulary("voc", ("dog", "cat")), num=2)

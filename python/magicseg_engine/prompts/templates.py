"""Offline scene descriptions from a built-in bank of subjects, scenes, styles and viewpoints."""

from __future__ import annotations

import random
from collections.abc import Sequence

import inflect

from magicseg_engine.prompts.counterfactual import is_plural_name, mentions

_inflect = inflect.engine()

STYLES = (
    "a photo of", "a high-resolution photograph of", "a close-up photo of", "a wide-angle photo of",
    "a candid snapshot of", "a professional photograph of", "a DSLR photo of", "a film photograph of",
    "a realistic photo of", "a sharp, detailed photo of", "an amateur photo of", "a documentary photo of",
    "a travel photo of", "a smartphone photo of", "a color photograph of",
)

SCENES = (
    "in a city street", "in a park", "in a living room", "in a kitchen", "on a beach", "in a forest",
    "on a farm", "in a snowy field", "in an office", "in a garden", "in a parking lot", "at a harbour",
    "on a mountain trail", "in a backyard", "at a busy market", "in a quiet village", "on a country road",
    "in a classroom", "in a cafe", "in a warehouse", "by a lake", "in a meadow", "in a hallway",
    "on a rooftop", "in a desert", "at a campsite", "in a small apartment", "near a river",
    "in a school yard", "in a shop window", "on a wooden porch", "in a museum", "at a playground",
    "in an alley", "on a sunny terrace", "in a barn", "in a hotel lobby", "at a bus stop",
    "in a workshop", "on a balcony",
)

LIGHTING = (
    "", "at sunset", "in the morning light", "on a cloudy day", "at night", "in soft daylight",
    "under bright sunlight", "on a rainy afternoon", "at dusk", "in warm evening light", "on a foggy morning",
)

VIEWPOINTS = (
    "", "seen from above", "from a low angle", "at eye level", "from a distance", "in the foreground",
    "centered in the frame", "from the side",
)

RELATIONS = ("and", "next to", "near", "beside", "in front of", "behind", "with")

COUNTS = ("two", "three", "several", "a few")

# Names usually written without an article ("grass", not "a grass").
MASS_NOUNS = frozenset({
    "grass", "sky", "water", "snow", "sand", "dirt", "mud", "gravel", "fog", "moss", "straw",
    "metal", "plastic", "paper", "wood", "cloth", "textile", "food", "furniture", "pavement",
    "ground", "salad", "cardboard", "carpet", "sea", "solid material", "structure", "broccoli",
})


def noun_phrase(name: str, rng: random.Random) -> str:
    """`name` with an article or a count, varied: "a dog", "an apple", "three cats", "grass"."""
    if name.lower() in MASS_NOUNS or is_plural_name(name):
        return name
    if rng.random() < 0.2:
        return f"{rng.choice(COUNTS)} {_inflect.plural_noun(name)}"
    return _inflect.a(name)


def _pick(options: Sequence[str], rng: random.Random, avoid: Sequence[str]) -> str:
    """A random option that mentions none of `avoid` (so the scene cannot name a sample's class)."""
    allowed = [o for o in options if not any(mentions(o, c) for c in avoid)]
    return rng.choice(allowed or [""])


def describe_from_templates(classes: Sequence[str], rng: random.Random) -> str:
    """One scene description that mentions every class in `classes` once."""
    subjects = [noun_phrase(c, rng) for c in classes]
    subject = subjects[0]
    for other in subjects[1:]:
        subject = f"{subject} {rng.choice(RELATIONS)} {other}"
    parts = [
        f"{_pick(STYLES, rng, classes)} {subject} {_pick(SCENES, rng, classes)}".strip(),
        _pick(LIGHTING, rng, classes),
        _pick(VIEWPOINTS, rng, classes),
    ]
    return ", ".join(p for p in parts if p)

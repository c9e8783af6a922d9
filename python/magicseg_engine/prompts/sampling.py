"""Choose the classes of each sample so that every class appears about equally often."""

from __future__ import annotations

import random
from collections.abc import Sequence


def sample_class_combos(
    classes: Sequence[str], num: int, max_per_sample: int = 2, seed: int = 0
) -> list[tuple[str, ...]]:
    """`num` combinations of 1..max_per_sample distinct classes, deterministic for `seed`.

    Classes are dealt from a shuffled deck that is refilled when empty, so after any prefix
    of the output the per-class counts differ by at most about `max_per_sample`, whatever
    the mix of one- and two-class samples.
    """
    if num < 0:
        raise ValueError("num must be >= 0")
    if not classes:
        raise ValueError("need at least one class")
    rng = random.Random(seed)
    k_max = min(max_per_sample, len(classes))
    deck: list[str] = []
    combos = []
    for _ in range(num):
        k = rng.randint(1, k_max)
        chosen: list[str] = []
        while len(chosen) < k:
            if not any(c not in chosen for c in deck):
                fresh = list(classes)
                rng.shuffle(fresh)
                deck.extend(fresh)
            # Take the next card that is not already in this sample; it stays in deck order
            # otherwise, which keeps the counts level.
            i = next(i for i, c in enumerate(deck) if c not in chosen)
            chosen.append(deck.pop(i))
        combos.append(tuple(chosen))
    return combos

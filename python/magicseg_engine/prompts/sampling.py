"""Choose the classes of each sample so that every class appears about equally often, or as
often as its weight asks."""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence


def sample_class_combos(
    classes: Sequence[str], num: int, max_per_sample: int = 2, seed: int = 0,
    weights: Sequence[float] | None = None,
) -> list[tuple[str, ...]]:
    """`num` combinations of 1..max_per_sample distinct classes, deterministic for `seed`.

    Classes are dealt from a shuffled deck that is refilled when empty, so after any prefix
    of the output the per-class counts differ by at most about `max_per_sample`, whatever
    the mix of one- and two-class samples. With `weights`, each class's share of the draws
    follows its weight instead (`weighted_draws`); a class of weight 0 is never drawn.
    """
    if num < 0:
        raise ValueError("num must be >= 0")
    if not classes:
        raise ValueError("need at least one class")
    rng = random.Random(seed)
    if weights is not None:
        return _weighted_combos(classes, weights, num, max_per_sample, rng)
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


def _weighted_combos(classes: Sequence[str], weights: Sequence[float], num: int, max_per_sample: int,
                     rng: random.Random) -> list[tuple[str, ...]]:
    """Stride scheduling: each class is due again 1/weight after it was drawn, and the most
    overdue class not yet in the sample is drawn next. After any prefix, a class's count is
    within about `max_per_sample` of its weight's share; random first due times break ties."""
    if len(weights) != len(classes):
        raise ValueError(f"got {len(weights)} weights for {len(classes)} classes")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError("weights must be non-negative with at least one positive")
    drawn = [(rng.random() / w, i) for i, w in enumerate(weights) if w > 0]
    heapq.heapify(drawn)
    k_max = min(max_per_sample, len(drawn))
    combos = []
    for _ in range(num):
        k = rng.randint(1, k_max)
        picked = [heapq.heappop(drawn) for _ in range(k)]  # the k most overdue, all distinct
        for due, i in picked:
            heapq.heappush(drawn, (due + 1 / weights[i], i))
        combos.append(tuple(classes[i] for _, i in picked))
    return combos

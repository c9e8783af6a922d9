"""Choose which pairs the report shows: spread evenly over the classes, in one pass.

A run can hold millions of samples, so the choice cannot keep them all. Each class keeps a
uniform random sample of at most `limit` of the samples showing it (reservoir sampling,
seeded, so the same run gives the same page). The pairs are then dealt class by class, the
rarest class first, one pair per class per round, until `limit` pairs are chosen: every
class gets a pair before any class gets a second, and rare classes are not crowded out by
frequent ones.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")


class ClassBalancedPicker(Generic[Item]):
    def __init__(self, limit: int, seed: int = 0) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._rng = random.Random(seed)
        self._reservoirs: dict[Hashable, list[tuple[int, Item]]] = {}
        self._seen: dict[Hashable, int] = {}
        self._offered = 0

    def offer(self, item: Item, classes: Sequence[Hashable]) -> None:
        """Consider `item`, a sample showing `classes`, for the reservoir of each of them."""
        order = self._offered  # identifies the item, so a pair held by two classes is shown once
        self._offered += 1
        for cls in dict.fromkeys(classes):
            seen = self._seen.get(cls, 0) + 1
            self._seen[cls] = seen
            reservoir = self._reservoirs.setdefault(cls, [])
            if len(reservoir) < self.limit:
                reservoir.append((order, item))
            else:
                slot = self._rng.randrange(seen)
                if slot < self.limit:
                    reservoir[slot] = (order, item)

    def chosen(self) -> list[Item]:
        """Up to `limit` distinct items, dealt round-robin over classes from the rarest up."""
        queues = {cls: deque(sorted(res, key=lambda pair: pair[0])) for cls, res in self._reservoirs.items()}
        classes = sorted(queues, key=lambda cls: (self._seen[cls], str(cls)))
        picked: dict[int, Item] = {}
        while len(picked) < self.limit and any(queues[c] for c in classes):
            for cls in classes:
                queue = queues[cls]
                while queue and queue[0][0] in picked:
                    queue.popleft()
                if queue:
                    order, item = queue.popleft()
                    picked[order] = item
                    if len(picked) == self.limit:
                        break
        return list(picked.values())

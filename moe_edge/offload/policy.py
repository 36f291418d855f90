"""Replacement policies for one layer's slots: small objects, so they can be compared on
recorded routing traces (bench/trace.py).

The cache calls `touch(e)` when expert e is used or loaded for a use, `admit(e)` when a
prefetch loads it (a guess, not a use), `victim(candidates)` for the one to evict among the
unpinned residents, and `forget(e)` once e has left its slot.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from typing import Iterable


class LRU:
    """Evict the expert used longest ago."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def touch(self, expert: int) -> None:
        self._order.pop(expert, None)
        self._order[expert] = None

    def forget(self, expert: int) -> None:
        self._order.pop(expert, None)

    def admit(self, expert: int) -> None:
        """Resident without a use (a prefetch): ranked by its past uses alone and behind every
        equal one, so a guess that is never used goes before anything that was."""
        self._order[expert] = None
        self._order.move_to_end(expert, last=False)

    def victim(self, candidates: Iterable[int]) -> int | None:
        """The lowest-ranked candidate; ties (and LRU itself) go to the least recently used."""
        allowed = set(candidates)
        return min((e for e in self._order if e in allowed), key=self._order_key(), default=None)

    def ranked(self, candidates: Iterable[int]) -> list[int]:
        """The touched ones of `candidates`, in the order `victim` would take them (the next
        victim first)."""
        allowed = set(candidates)
        return sorted((e for e in self._order if e in allowed), key=self._order_key())

    def _order_key(self):
        """A key that orders experts as `rank` does (LRU: none, the order decides)."""
        return self.rank

    def rank(self, expert: int) -> float:
        return 0.0

    def order(self) -> list[int]:
        """Least recently used first."""
        return list(self._order)


class LFU(LRU):
    """Evict the expert used least often (ties: least recently). Counts outlive an eviction:
    a layer has few experts, and an expert's popularity is what predicts its return."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter[int] = Counter()

    def touch(self, expert: int) -> None:
        super().touch(expert)
        self.uses[expert] += 1

    def rank(self, expert: int) -> float:
        return self.uses[expert]


class LFUDA(LRU):
    """LFU with dynamic aging (Arlitt et al., "Evaluating content management techniques for
    Web proxy caches", 2000): key = uses while resident + L, where L becomes the evicted
    expert's key at each eviction, so experts that were hot long ago age out."""

    name = "lfuda"

    def __init__(self) -> None:
        super().__init__()
        self.age = 0.0  # L
        self.uses: Counter[int] = Counter()  # since the expert was loaded
        self.key: dict[int, float] = {}

    def touch(self, expert: int) -> None:
        super().touch(expert)
        self.uses[expert] += 1
        self.key[expert] = self.age + self.uses[expert]

    def admit(self, expert: int) -> None:
        super().admit(expert)
        self.key.setdefault(expert, self.age)

    def forget(self, expert: int) -> None:
        super().forget(expert)
        self.age = self.key.pop(expert, self.age)
        self.uses.pop(expert, None)

    def rank(self, expert: int) -> float:
        return self.key[expert]


class LRFU(LRU):
    """Frequency weighted by recency (LRFU: Lee et al., IEEE Trans. Computers 2001): each
    past use counts 2^(-age / half_life), age in touches of this layer; evict the smallest
    sum. A short half-life behaves like LRU, a long one like LFU; the default, 64 touches,
    is about 11 tokens at top-6. Scores outlive an eviction, as LFU's counts do."""

    name = "lrfu"

    def __init__(self, half_life: float = 64.0) -> None:
        super().__init__()
        self.rate, self.clock = 1.0 / half_life, 0
        # expert -> log2 of its sum as of clock 0: every sum decays at the same rate, so
        # rank = 2^(key - rate * clock) and the keys alone order the experts, never aging
        self.key: dict[int, float] = {}

    def touch(self, expert: int) -> None:
        super().touch(expert)
        self.clock += 1
        self.key[expert] = math.log2(1.0 + self.rank(expert)) + self.rate * self.clock

    def admit(self, expert: int) -> None:
        super().admit(expert)
        self.key.setdefault(expert, -math.inf)  # no past use: rank 0

    def rank(self, expert: int) -> float:
        key = self.key.get(expert)
        return 0.0 if key is None else 2.0 ** (key - self.rate * self.clock)

    def _order_key(self):
        return self.key.__getitem__  # a victim is resident, so touched


POLICIES = {"lru": LRU, "lfu": LFU, "lfuda": LFUDA, "lrfu": LRFU}
DEFAULT = "lrfu"  # fewest misses on recorded routing (docs/performance.md)

"""Replacement policies for one layer's slots: small objects, so they can be compared on
recorded routing traces."""

from __future__ import annotations

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

    def victim(self, candidates: Iterable[int]) -> int | None:
        allowed = set(candidates)
        return next((e for e in self._order if e in allowed), None)

    def order(self) -> list[int]:
        """Least recently used first."""
        return list(self._order)


class LFU(LRU):
    """Evict the expert used least often (ties: least recently)."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter[int] = Counter()

    def touch(self, expert: int) -> None:
        super().touch(expert)
        self.uses[expert] += 1

    def victim(self, candidates: Iterable[int]) -> int | None:
        allowed = set(candidates)
        ranked = [e for e in self._order if e in allowed]
        return min(ranked, key=lambda e: self.uses[e]) if ranked else None


POLICIES = {"lru": LRU, "lfu": LFU}

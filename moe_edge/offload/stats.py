"""Offload counters, per MoE layer and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class LayerStats:
    hits: int = 0  # requested experts already resident or already loading
    misses: int = 0  # requested experts that needed a load
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched experts later used by the layer
    prefetch_wasted: int = 0  # prefetched experts evicted before any use
    bytes_moved: int = 0
    stall_seconds: float = 0.0  # compute waiting on loads
    predicted: int = 0  # experts the prefetcher predicted for this layer
    predicted_correct: int = 0  # ... that the layer then used
    actual: int = 0  # experts the layer used on calls that had a prediction

    def add(self, other: "LayerStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.predicted_correct / self.predicted if self.predicted else 0.0

    @property
    def prefetch_recall(self) -> float:
        return self.predicted_correct / self.actual if self.actual else 0.0

    def summary(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "prefetch_precision": self.prefetch_precision,
                "prefetch_recall": self.prefetch_recall}


@dataclass
class OffloadStats:
    layers: dict[int, LayerStats]

    @property
    def total(self) -> LayerStats:
        total = LayerStats()
        for s in self.layers.values():
            total.add(s)
        return total

    def to_dict(self) -> dict:
        return {"total": self.total.summary(), "layers": {l: s.summary() for l, s in self.layers.items()}}

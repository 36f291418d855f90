"""How much goes where: the memory plan behind `load_offloaded(expert_cache=...)`."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import psutil
import torch

from ..errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'6GB', '512MB', '1.5GiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b?|b)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"expert cache size {text!r}: use a size like 6GB or 512MB, a percentage "
                          "like 50%, a number of slots per layer, or auto")
    unit = m[2] or ""
    unit = unit if unit.endswith("b") or unit == "" else unit + "b"
    return int(float(m[1]) * _UNITS[unit])


@dataclass(frozen=True)
class OffloadPlan:
    device: str
    slow_tier: str
    resident_bytes: int  # embeddings, attention, norms, routers, dense and shared MLPs
    kv_cache_bytes: int
    expert_bytes: int  # one routed expert in its kernel layout
    moe_layers: int
    experts_per_layer: int
    top_k: int
    slots_per_layer: int
    margin_bytes: int
    available_bytes: int | None  # what "auto" saw as free

    @property
    def cache_bytes(self) -> int:
        return self.slots_per_layer * self.moe_layers * self.expert_bytes

    @property
    def store_bytes(self) -> int:
        return self.experts_per_layer * self.moe_layers * self.expert_bytes

    @property
    def resident_fraction(self) -> float:
        return self.slots_per_layer / self.experts_per_layer

    def to_dict(self) -> dict:
        return {**asdict(self), "cache_bytes": self.cache_bytes, "store_bytes": self.store_bytes,
                "resident_fraction": self.resident_fraction}

    def describe(self) -> str:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        return (f"device {self.device}: dense part {mib(self.resident_bytes)}, KV cache "
                f"{mib(self.kv_cache_bytes)}, expert cache {self.slots_per_layer}/"
                f"{self.experts_per_layer} experts x {self.moe_layers} layers = {mib(self.cache_bytes)} "
                f"({self.resident_fraction:.0%}); every expert stored in {self.slow_tier} "
                f"({mib(self.store_bytes)})")


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def kv_cache_bytes(config, context: int, dtype: torch.dtype) -> int:
    """Keys and values for `context` tokens, every layer, batch 1."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * context * dtype.itemsize


def slots_for(expert_cache, *, device: torch.device, resident: int, kv: int, expert_bytes: int,
              moe_layers: int, experts: int, top_k: int,
              available: int | None = None) -> tuple[int, int, int | None]:
    """(slots per layer, margin bytes, available bytes) for an `expert_cache` setting.

    "auto" budgets `available` (free memory measured before anything was loaded; measured
    now when None) minus the dense part, the KV cache and a margin.
    """
    margin, seen = 0, None
    if isinstance(expert_cache, int):
        slots = expert_cache
    elif isinstance(expert_cache, str) and expert_cache.strip().endswith("%"):
        slots = round(experts * _percent(expert_cache) / 100)
    else:
        if expert_cache == "auto":
            seen = available_memory(device) if available is None else available
            margin = max(512 * 2**20, seen // 10)
            budget = seen - resident - kv - margin
        else:
            budget = parse_size(expert_cache)
        slots = min(experts, max(0, budget) // (expert_bytes * moe_layers))
    if slots < top_k:
        need = top_k * expert_bytes * moe_layers
        raise ConfigError(f"expert cache too small: {slots} slots per layer, but top-k is {top_k}; "
                          f"the minimum is {need / 2**20:,.1f} MiB ({top_k} experts x {moe_layers} "
                          "layers)" + (f"; {seen / 2**20:,.1f} MiB is free" if seen else ""))
    return min(slots, experts), margin, seen


def _percent(text: str) -> float:
    try:
        value = float(text.strip()[:-1])
    except ValueError:
        value = -1.0
    if not 0 < value <= 100:
        raise ConfigError(f"expert cache {text!r}: a percentage must be in (0, 100]")
    return value

"""How much goes where: the memory plan behind `load_offloaded(expert_cache=...)`."""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from ..errors import ConfigError

# Memory cgroups: v2 files under the unified mount, v1 ones under its memory/ controller.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_V2 = ("memory.max", "memory.current", "inactive_file")
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")  # total_: the subtree
_NO_LIMIT = 2**60  # v1 says "no limit" as its page counter's maximum (2^63 - 4096 with 4 KiB pages)

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
    kv_start_bytes: int | None = None  # "auto" on a CPU: the KV cache planned at load; beyond it
    # the expert cache gives slots up as the context grows (None: all of kv_cache_bytes planned)

    @property
    def slots_at_full_context(self) -> int:
        """Slots per layer left once the KV cache holds the whole context."""
        if self.kv_start_bytes is None:
            return self.slots_per_layer
        row = self.expert_bytes * self.moe_layers
        return self.slots_per_layer - -(-(self.kv_cache_bytes - self.kv_start_bytes) // row)

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
                "resident_fraction": self.resident_fraction, "slots_at_full_context": self.slots_at_full_context}

    def describe(self) -> str:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        kv = f"KV cache {mib(self.kv_cache_bytes)}"
        if self.kv_start_bytes is not None:
            kv = (f"KV cache {mib(self.kv_start_bytes)} at first, up to {mib(self.kv_cache_bytes)} "
                  f"taken from the expert cache as the context grows (down to "
                  f"{self.slots_at_full_context} slots per layer)")
        return (f"device {self.device}: dense part {mib(self.resident_bytes)}, {kv}, expert cache "
                f"{self.slots_per_layer}/{self.experts_per_layer} experts x {self.moe_layers} layers = "
                f"{mib(self.cache_bytes)} ({self.resident_fraction:.0%}); every expert stored in "
                f"{self.slow_tier} ({mib(self.store_bytes)})")


def available_memory(device: torch.device, cgroup_root: Path = CGROUP_ROOT,
                     proc_cgroup: Path = PROC_CGROUP) -> int:
    """Free bytes on `device`: free VRAM on CUDA; on the CPU the host's available memory, or
    less where this process's memory cgroup (Docker --memory, systemd, Kubernetes) leaves less.

    >>> available_memory(torch.device("cpu")) / 2**30  # inside `docker run --memory 2g`: < 2
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    host = psutil.virtual_memory().available
    room = cgroup_headroom(cgroup_root, proc_cgroup)
    return host if room is None else min(host, room)


def cgroup_headroom(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """Bytes this process's memory cgroup can still grow by: the least, over its group and
    every group above it (v1 or v2), of limit - usage; None where no group sets a limit."""
    rooms = [room for folder, files in _memory_groups(root, proc_cgroup)
             if (room := _group_headroom(folder, files)) is not None]
    return min(rooms, default=None)


def _memory_groups(root: Path, proc_cgroup: Path):
    """(folder, file names) for each memory cgroup holding this process, leaf to mount root.

    A container without a cgroup namespace sees its own group mounted at the root while
    /proc/self/cgroup names the host's path, so folders that are not there are skipped.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:  # not Linux, or no procfs
        return
    for line in lines:
        ident, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if ident == "0" and controllers == "":
            base, files = root, _V2
        elif "memory" in controllers.split(","):
            base, files = root / "memory", _V1
        else:
            continue
        folder = base / path.strip().lstrip("/")
        for group in [folder, *folder.parents]:
            if group.is_dir() and (group / files[0]).exists():
                yield group, files
            if group == base:
                break


def _group_headroom(folder: Path, files: tuple[str, str, str]) -> int | None:
    limit_file, usage_file, inactive_key = files
    text = _read(folder / limit_file)
    if text == "max":  # v2: no limit
        return None
    limit, usage = _int(folder / limit_file, text), _int(folder / usage_file, _read(folder / usage_file))
    if limit is None or usage is None or limit >= _NO_LIMIT:
        return None
    # The page cache the process fills (the checkpoint, the disk expert store) is charged to
    # the group; its inactive part is what the kernel reclaims first before an OOM kill, so
    # counting it as used would shrink the plan for memory that is in fact there (as
    # `docker stats` and the kubelet's working set do).
    usage -= min(usage, _stat(folder / "memory.stat", inactive_key))
    return max(0, limit - usage)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(path: Path, text: str | None) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        warnings.warn(f"{path}: no byte count in it ({text!r}); the memory plan leaves this "
                      "cgroup out", stacklevel=3)
        return None


def _stat(path: Path, key: str) -> int:
    """One field of a memory.stat file; 0 when it is missing or unreadable."""
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


# What "auto" keeps free beyond the plan: `available` is measured inside the process once the
# interpreter, torch and the tokenizer are loaded, so what is left is transient (activations,
# allocator slack; ~25 MiB on the 16B-sized demo under a 1.3 GiB cgroup), and under a
# container's limit every MiB held back is a MiB of experts read again from disk.
MARGIN_MIN = 256 * 2**20
# The KV cache "auto" plans at load on a CPU: a first reply's worth. Beyond it the expert cache
# gives up slots as the context grows (ExpertCache.give_up_slots); planning all of a 4,096-token
# context up front would hold back DeepSeek-MoE-16B's 0.88 GiB of experts for a cache that a
# short chat never fills.
KV_START_TOKENS = 512


def kv_cache_bytes(config, context: int, dtype: torch.dtype) -> int:
    """Keys and values for `context` tokens (at most the model's positions), every layer, batch 1."""
    context = min(context, config.max_position_embeddings)
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * context * dtype.itemsize


def kv_start_bytes(config, context: int, dtype: torch.dtype, device: torch.device) -> int | None:
    """The KV cache "auto" plans at load: KV_START_TOKENS on a CPU, where a slot given up returns
    its pages to the OS; None elsewhere (GPU slots are one allocation: all of `context` planned)."""
    return kv_cache_bytes(config, min(context, KV_START_TOKENS), dtype) if device.type == "cpu" else None


def slots_for(expert_cache, *, device: torch.device, resident: int, kv: int, expert_bytes: int,
              moe_layers: int, experts: int, top_k: int, available: int | None = None,
              kv_start: int | None = None) -> tuple[int, int, int | None]:
    """(slots per layer, margin bytes, available bytes) for an `expert_cache` setting.

    "auto" budgets `available` (free memory measured before anything was loaded; measured
    now when None) minus the dense part, the KV cache and a margin. With `kv_start` (less
    than `kv`), the KV cache of that size is planned and the slots it grows into later are
    lent to the experts until then; top-k slots must still be left at `kv`.
    """
    margin, seen = 0, None
    if isinstance(expert_cache, int):
        slots = expert_cache
    elif isinstance(expert_cache, str) and expert_cache.strip().endswith("%"):
        slots = round(experts * _percent(expert_cache) / 100)
    else:
        if expert_cache == "auto":
            seen = available_memory(device) if available is None else available
            margin = max(MARGIN_MIN, seen // 20)
            budget = seen - resident - kv - margin
        else:
            budget = parse_size(expert_cache)
        slots = min(experts, max(0, budget) // (expert_bytes * moe_layers))
        if slots >= top_k and expert_cache == "auto" and kv_start is not None and kv_start < kv:
            slots = min(experts, max(0, budget + kv - kv_start) // (expert_bytes * moe_layers))
    if slots < top_k:
        need = top_k * expert_bytes * moe_layers
        raise ConfigError(f"expert cache too small: {slots} slots per layer, but top-k is {top_k}; "
                          f"the minimum is {need / 2**20:,.1f} MiB ({top_k} experts x {moe_layers} "
                          "layers)" + (f"; {seen / 2**20:,.1f} MiB is free" if seen else ""))
    return min(slots, experts), margin, seen


def make_plan(expert_cache, *, device: torch.device, slow_tier: str, resident: int, kv: int,
              kv_start: int | None, expert_bytes: int, moe_layers: int, experts: int, top_k: int,
              available: int | None = None) -> OffloadPlan:
    """The plan for an `expert_cache` setting (see slots_for). What "auto" holds free beyond the
    slots, up to `kv`, is the KV cache's at load (`kv_start_bytes`); None where that is all of
    `kv` (nothing to take from the experts later)."""
    slots, margin, seen = slots_for(expert_cache, device=device, resident=resident, kv=kv,
                                    expert_bytes=expert_bytes, moe_layers=moe_layers, experts=experts,
                                    top_k=top_k, available=available, kv_start=kv_start)
    held = None
    if seen is not None and kv_start is not None:
        held = max(kv_start, seen - resident - margin - slots * expert_bytes * moe_layers)
        held = held if held < kv else None
    return OffloadPlan(str(device), slow_tier, resident, kv, expert_bytes, moe_layers, experts, top_k,
                       slots, margin, seen, held)


def _percent(text: str) -> float:
    try:
        value = float(text.strip()[:-1])
    except ValueError:
        value = -1.0
    if not 0 < value <= 100:
        raise ConfigError(f"expert cache {text!r}: a percentage must be in (0, 100]")
    return value

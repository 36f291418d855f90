"""What decode speed a plan can expect, before anything is downloaded or loaded: the
forecast `moe-edge info --forecast` prints, from tensor headers and two short probes.

A decode token reads every active weight once (memory-bound on a CPU) and, offloaded, pages
in the experts its router picks that are not cached. With routing that has no reuse (each
token's experts independent and uniform, the worst a trained router is near), an expert is
cached with probability slots/E, so a token misses top_k x moe_layers x (1 - slots/E) times,
each an expert-sized read from the slow tier. Trained routers reuse more (bench/trace.py), so
the forecast is a floor for the cache and a ceiling for the kernels (full memory bandwidth).

>>> f = measure_forecast(model_info("ckpt", expert_cache="50%"))
>>> f.no_reuse_tps, f.resident_tps  # what to expect lies between
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PROBE_BYTES = 64 * 2**20
# Per decoder layer and token, what a step costs beyond reading weights (Python dispatch, small
# ops): 1.2 ms for the demo's 4 layers on a 2-core AMD EPYC (bench/profile_decode.py); it
# dominates small models, and is noise beside a 16B layer's ~40 MB of weights.
STEP_SECONDS_PER_LAYER = 3e-4


@dataclass(frozen=True)
class Forecast:
    memory_gbps: float  # measured: one pass over a buffer larger than the caches
    storage_gbps: float | None  # measured: expert-sized random reads, uncached; None for a RAM tier
    active_bytes: int  # weight bytes one decode token reads
    misses_per_token: float  # slow-tier reads a token makes with no routing reuse
    miss_ms: float  # one expert read from the slow tier
    resident_tps: float  # the ceiling: every expert cached, weights read at full memory bandwidth
    no_reuse_tps: float  # the floor: the plan's cache, routing without reuse

    def to_dict(self) -> dict:
        return asdict(self)


def probe_memory(nbytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Bytes/s one pass of summing a buffer reads (best of `repeats`), all threads."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def probe_storage(folder: str | Path, record: int, reads: int = 4, nbytes: int = PROBE_BYTES) -> float:
    """Bytes/s of random `record`-sized positioned reads, `reads` in flight, from a scratch
    file written in `folder` (where the expert store goes), read as the store reads: around
    the page cache where the filesystem allows, else dropped from it first."""
    from .store import PAGE, open_direct, slot_buffers
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    record = max(PAGE, -(-record // PAGE) * PAGE)  # store records are page-aligned
    count = max(2 * reads, nbytes // record)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".moe-edge-probe-") as f:
        block = os.urandom(min(record, 2**20))
        for _ in range(-(-count * record // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        bufs = [memoryview(b.numpy()) for b in slot_buffers(record, reads, torch.device("cpu"))]
        order = random.Random(0).sample(range(count), count)

        def timed(fd: int) -> float:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(reads) as pool:
                list(pool.map(lambda j: os.preadv(fd, [bufs[j % reads]], order[j] * record), range(count)))
            return count * record / (time.perf_counter() - t0)
        direct = open_direct(Path(f.name))
        if direct is not None:
            try:
                return timed(direct)
            except OSError as e:  # as the store does: a device refusing direct reads is read buffered
                if e.errno != errno.EINVAL:
                    raise
            finally:
                os.close(direct)
        return timed(f.fileno())


def measure_forecast(info, offload_dir: str | Path | None = None, reads: int = 4) -> Forecast:
    """`forecast` with this machine's probes: memory, and where the disk store would go."""
    from .build import store_root
    storage = probe_storage(store_root(offload_dir), info.expert_bytes, reads) if info.plan.slow_tier == "disk" else None
    return forecast(info, probe_memory(), storage)


def forecast(info, memory_bps: float, storage_bps: float | None) -> Forecast:
    """The decode rates `info.plan` can expect (see the module docstring for the model)."""
    plan = info.plan
    compute_s = info.active_bytes / memory_bps + info.layers * STEP_SECONDS_PER_LAYER
    missing = 1 - plan.slots_per_layer / info.experts_per_layer
    misses = info.top_k * info.moe_layers * missing
    miss_s = info.expert_bytes / storage_bps if storage_bps else info.expert_bytes / memory_bps
    return Forecast(memory_bps / 1e9, storage_bps / 1e9 if storage_bps else None, info.active_bytes,
                    misses, miss_s * 1e3, 1 / compute_s, 1 / (compute_s + misses * miss_s))

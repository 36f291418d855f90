"""Prompt and decode throughput over expert-cache sizes and prefetch depths: `moe-edge bench`.

Each setting loads the model offloaded, warms the cache, then `repeats` times prefills a
held-out prompt and decodes the text after it one token per step (following the text, so
that routing is that of real text: evaluate.forced_decode); rows report medians, beside the
range `moe-edge info --forecast` gives for that plan (offload/forecast.py, probed once).

>>> rows = sweep("model-gptq-w4g128", caches=["25%", "100%"], depths=[0, 1])
"""

from __future__ import annotations

import gc
import statistics
from pathlib import Path
from typing import Callable, Sequence

import psutil
import torch

from .api import load_offloaded, resolve_device, resolve_dtype
from .evaluate import forced_decode, heldout_ids
from .info import model_info
from .memory import trim_heap
from .offload.build import store_root
from .offload.forecast import forecast, probe_memory, probe_storage


def sweep(path: str | Path, caches: Sequence[str] = ("25%", "50%", "100%"),
          depths: Sequence[int] = (0, 1, 2), prompt_tokens: int = 128, new_tokens: int = 64,
          repeats: int = 3, device: str = "auto", dtype=None, slow_tier: str = "auto",
          offload_dir=None, progress: Callable[[dict], None] | None = None) -> list[dict]:
    rows, probes = [], None
    for cache in caches:
        info = _plan(path, cache, device, dtype, prompt_tokens + new_tokens + 8, slow_tier)
        probes = probes or _probes(info, offload_dir)
        expect = forecast(info, *probes) if info.plan else None
        for depth in depths:
            row = _measure(path, cache, depth, prompt_tokens, new_tokens, repeats, device, dtype,
                           slow_tier, offload_dir)
            if expect:
                row.update(forecast_no_reuse_tps=expect.no_reuse_tps, forecast_resident_tps=expect.resident_tps)
            rows.append(row)
            if progress:
                progress(row)
    return rows


def _plan(path, cache, device, dtype, context: int, slow_tier: str):
    """The plan `load_offloaded` will make, from headers (model_info)."""
    dev = resolve_device(device)
    tier = None if slow_tier == "auto" else slow_tier
    return model_info(path, dev, resolve_dtype(dtype, dev), cache, context, slow_tier=tier)


def _probes(info, offload_dir) -> tuple[float, float | None]:
    disk = info.plan is not None and info.plan.slow_tier == "disk"
    return probe_memory(), probe_storage(store_root(offload_dir), info.expert_bytes) if disk else None


def _measure(path, cache, depth, prompt_tokens, new_tokens, repeats, device, dtype, slow_tier,
             offload_dir) -> dict:
    lm = load_offloaded(path, device, cache, prefetch_depth=depth, dtype=dtype, slow_tier=slow_tier,
                        context=prompt_tokens + new_tokens + 8, offload_dir=offload_dir)
    try:
        text = _text(lm.tokenizer, prompt_tokens + new_tokens)
        forced_decode(lm.model, text[:prompt_tokens + 4], prompt_tokens)  # warm the cache
        lm.reset_offload_stats()
        if lm.model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs = [forced_decode(lm.model, text, prompt_tokens) for _ in range(repeats)]
        total = lm.offload_stats().total
        plan = lm.offload.plan
        memory = (torch.cuda.max_memory_allocated() if lm.model.device.type == "cuda"
                  else psutil.Process().memory_info().rss)
        return {"expert_cache": cache, "slots_per_layer": plan.slots_per_layer,
                "experts_per_layer": plan.experts_per_layer, "prefetch_depth": depth,
                "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
                "prompt_tps": prompt_tokens / statistics.median(p for p, _ in runs),
                "decode_tps": new_tokens / statistics.median(d for _, d in runs),
                "hit_rate": total.hit_rate, "prefetch_recall": total.prefetch_recall,
                "bytes_paged": total.bytes_moved // repeats,
                "stall_seconds": total.stall_seconds / repeats, "peak_bytes": memory}
    finally:
        lm.offload.close()
        del lm
        gc.collect()
        trim_heap()


def _text(tokenizer, n: int) -> list[int]:
    """n tokens of held-out text (repeated if the text is shorter)."""
    ids = heldout_ids(tokenizer, max_tokens=n).tolist()
    return (ids * (n // len(ids) + 1))[:n]

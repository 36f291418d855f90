"""This machine's memory read bandwidth, the ceiling for decode: prints JSON.

    python bench/bandwidth.py

Sums a 2 GiB tensor (far larger than any cache) with 1 thread and with every core, best of
five passes each; decode tokens/s x bytes read per token is compared against this.
"""

from __future__ import annotations

import json
import time

import torch
from _machine import machine  # bench/ is on sys.path when a script runs


def read_gbps(x: torch.Tensor, threads: int, passes: int = 5) -> float:
    torch.set_num_threads(threads)
    x.sum()  # touch every page once
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def main() -> None:
    cores = torch.get_num_threads()
    x = torch.ones(2**29)  # 2 GiB of fp32
    result = {f"read_gb_per_s_{t}_thread{'s' if t > 1 else ''}": round(read_gbps(x, t), 2)
              for t in sorted({1, cores})}
    print(json.dumps({**result, "bytes": x.numel() * 4, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()

"""This machine's memory read bandwidth, the ceiling for decode, and with --storage the
disk's, the ceiling for an offloaded model's misses: prints JSON.

    python bench/bandwidth.py
    python bench/bandwidth.py --storage ~/.cache/moe-edge --record 4.4MiB --reads 1,4

Sums a 2 GiB tensor (far larger than any cache) with 1 thread and with every core, best of
five passes each, on 4 KiB pages and on transparent huge pages (madvised, as moe-edge's
expert slots and int8 head are: where the system's setting is `madvise` an ordinary
allocation gets 4 KiB pages, whose every page boundary stops the hardware prefetchers);
decode tokens/s x bytes read per token is compared against this. Storage:
random positioned reads of `--record` bytes (an expert), each number of reads in flight,
around the page cache where the filesystem allows: as the disk expert store reads
(moe_edge.offload.forecast.probe_storage, 256 MiB from a scratch file in that folder).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _machine import emit, machine  # bench/ is on sys.path when a script runs

from moe_edge.memory import huge_pages
from moe_edge.offload.forecast import probe_storage
from moe_edge.offload.plan import parse_size


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", default=None, help="a folder on the disk to measure (where the store goes)")
    ap.add_argument("--record", default="4.4MiB", help="bytes per read (one expert)")
    ap.add_argument("--reads", default="1,4", help="comma-separated reads in flight")
    args = ap.parse_args()
    cores = torch.get_num_threads()
    x = torch.ones(2**29)  # 2 GiB of fp32
    result = {f"read_gb_per_s_{t}_thread{'s' if t > 1 else ''}": round(read_gbps(x, t), 2)
              for t in sorted({1, cores})}
    result["bytes"] = x.numel() * 4
    del x
    x = torch.empty(2**29)
    if huge_pages(x):
        x.fill_(1)
        result.update({f"huge_pages_read_gb_per_s_{t}_thread{'s' if t > 1 else ''}": round(read_gbps(x, t), 2)
                       for t in sorted({1, cores})})
    del x
    if args.storage:
        record = parse_size(args.record)
        result["storage"] = {"folder": args.storage, "record_bytes": record, **{
            f"read_gb_per_s_{n}_in_flight": round(probe_storage(args.storage, record, n, 256 * 2**20) / 1e9, 2)
            for n in map(int, args.reads.split(","))}}
    emit({**result, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
          "command": " ".join(["python", *sys.argv])})


if __name__ == "__main__":
    main()

"""Offloaded decode against fully resident, on one checkpoint, in one run. Prints JSON.

    python bench/offload.py moe_edge/demo/deepseek-moe-tiny-gptq --slow-tier disk

For each expert-cache size (100%, 50%, 25%, top-k slots), prefetch setting (off; next
layer, top-k wide; next layer, 2 x top-k wide; auto, the default: 1x while it measures
faster) and number of loads in flight it
decodes the same held-out text (a prompt, then one token per step following the text:
routing is that of real text, not of a greedy loop; see evaluate.forced_decode) and
reports tokens/s, its ratio to the resident model, hit rate, prefetch precision and
recall, bytes paged in and time stalled. Runs alternate with the resident baseline so that
noise on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch
from _machine import commit, emit, machine  # bench/ is on sys.path when a script runs

from moe_edge.api import load, load_offloaded
from moe_edge.evaluate import forced_decode, heldout_ids


def decode_tps(lm, text: list[int], prompt_tokens: int) -> float:
    """Decode tokens/s while following held-out text (see evaluate.forced_decode)."""
    _, seconds = forced_decode(lm.model, text, prompt_tokens)
    return (len(text) - prompt_tokens) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--slow-tier", default="disk", choices=["disk", "ram"])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--caches", default="100%,50%,25%,topk",
                    help="comma-separated cache sizes: a share (50%%), slots per layer (35), a size, topk")
    ap.add_argument("--prefetch", default="0,1x,2x",
                    help="comma-separated: 0 (off), 1x (next layer, top-k wide), 2x (2 x top-k wide), "
                         "each every step; auto (1x while it measures faster: the default)")
    ap.add_argument("--offload-dir", default=None, help="where the disk expert store is cached")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--reads", default="4", help="comma-separated loads in flight (load_offloaded(reads=))")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    resident = load(args.model, device="cpu")
    text = heldout_ids(resident.tokenizer, max_tokens=args.prompt_tokens + args.new_tokens).tolist()
    prompt = text[:args.prompt_tokens]
    E, k = resident.config.num_experts, resident.config.top_k
    rows = []
    settings = {"0": (0, None, "always"), "1x": (1, k, "always"), "2x": (1, 2 * k, "always"),
                "auto": (1, k, "auto")}
    for cache in [k if c == "topk" else int(c) if c.isdigit() else c for c in args.caches.split(",")]:
        for (depth, width, mode), reads in itertools.product((settings[p] for p in args.prefetch.split(",")),
                                                       map(int, args.reads.split(","))):
            lm = load_offloaded(args.model, device="cpu", expert_cache=cache, prefetch_depth=depth,
                                prefetch_width=width, slow_tier=args.slow_tier,
                                offload_dir=args.offload_dir, reads=reads, prefetch=mode)
            decode_tps(lm, text[:args.prompt_tokens + 8], args.prompt_tokens)  # warm-up
            lm.reset_offload_stats()
            base, off = [], []
            for _ in range(args.repeats):
                base.append(decode_tps(resident, text, args.prompt_tokens))
                off.append(decode_tps(lm, text, args.prompt_tokens))
            s = lm.offload_stats().total
            rows.append({"expert_cache": cache if isinstance(cache, str) else f"{cache} slots" + " (top-k)" * (cache == k),
                         "slots_per_layer": lm.offload.plan.slots_per_layer, "prefetch_depth": depth, "prefetch": mode, "reads": reads,
                         "prefetch_width": lm.offload.prefetcher.width if lm.offload.prefetcher else 0,
                         "decode_tps": round(statistics.median(off), 1),
                         "resident_tps": round(statistics.median(base), 1),
                         "ratio": round(statistics.median(off) / statistics.median(base), 3),
                         "hit_rate": round(s.hit_rate, 3),
                         "prefetch_precision": round(s.prefetch_precision, 3),
                         "prefetch_recall": round(s.prefetch_recall, 3),
                         "mib_paged": round(s.bytes_moved / 2**20, 1),
                         "stall_s": round(s.stall_seconds, 3),
                         "governor": lm.offload.prefetcher.governor.summary()
                         if lm.offload.prefetcher and lm.offload.prefetcher.governor else None})
            lm.offload.close()
    emit({
        "model": args.model, "slow_tier": args.slow_tier, "experts": E, "top_k": k,
        "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
        "results": rows,
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "commit": commit(),
        "command": " ".join(["python", *sys.argv]),
    }, args.out)


if __name__ == "__main__":
    main()

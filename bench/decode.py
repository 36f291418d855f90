"""Prefill and decode throughput of a checkpoint, fully resident. Prints one JSON object.

    python bench/decode.py moe_edge/demo/deepseek-moe-tiny --prompt-tokens 128 --new-tokens 64

Greedy decoding with EOS disabled, so every run generates exactly --new-tokens tokens.
The median of --repeats runs is reported, after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import psutil
import torch
from _machine import machine  # bench/ is on sys.path when a script runs

from moe_edge.api import load_model, resolve_device
from moe_edge.generation import SamplingParams, generate_ids


def run_once(model, prompt: list[int], new_tokens: int) -> dict:
    timings: dict = {}
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, eos_token_ids=())
    t0 = time.perf_counter()
    n = sum(1 for _ in generate_ids(model, prompt, params, context=len(prompt) + new_tokens, timings=timings))
    total = time.perf_counter() - t0
    return {"prefill_tps": len(prompt) / timings["prompt_seconds"],
            "decode_tps": (n - 1) / timings["decode_seconds"], "total_s": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lm-head", choices=["auto", "int8", "stored"], default="auto",
                    help="the lm_head as load_model takes it (see quant/int8.py)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, resolve_device(args.device), args.dtype, lm_head=args.lm_head)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, model.config.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
    run_once(model, prompt[:16], 4)  # warm-up
    runs = [run_once(model, prompt, args.new_tokens) for _ in range(args.repeats)]
    print(json.dumps({
        "model": args.model, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "lm_head_int8": model.lm_head_int8,
        "prefill_tps": round(statistics.median(r["prefill_tps"] for r in runs), 1),
        "decode_tps": round(statistics.median(r["decode_tps"] for r in runs), 1),
        "rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
        "machine": machine(),
    }))


if __name__ == "__main__":
    main()

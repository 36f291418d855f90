"""Prefill and decode throughput of a checkpoint, fully resident. Prints one JSON object.

    python bench/decode.py moe_edge/demo/deepseek-moe-tiny --prompt-tokens 128 --new-tokens 64

Greedy decoding with EOS disabled, so every run generates exactly --new-tokens tokens.
The median of --repeats runs is reported, after one warm-up run.

    python bench/decode.py build/deepseek-16b-synthetic-gptq --kernels bf16,int8,int8:65536

--kernels alternates the native int4 kernel's variants in one process, each repeat running
each in turn (the machines drift: compare within a run): dot products (bf16, int8), and
after a colon the bytes it prefetches ahead (default: this CPU's choice, quant/native.py).
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
    ap.add_argument("--kernels", default=None, help="native kernel variants to alternate, e.g. bf16,int8:0")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, resolve_device(args.device), args.dtype, lm_head=args.lm_head)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, model.config.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
    run_once(model, prompt[:16], 4)  # warm-up
    if args.kernels:
        print(json.dumps({"model": args.model, "threads": torch.get_num_threads(),
                          "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                          "kernels": alternated(model, prompt, args), "machine": machine()}))
        return
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


def alternated(model, prompt: list[int], args) -> dict:
    """Decode and prefill tok/s (median, and every run) of each --kernels variant, alternated."""
    from moe_edge.quant import native
    assert native.available(), "the native kernel does not run here"
    variants = args.kernels.split(",")
    runs: dict[str, list] = {v: [] for v in variants}
    try:
        for _ in range(args.repeats):
            for v in variants:
                dots, _, ahead = v.partition(":")
                native.configure(dots, int(ahead) if ahead else None)
                runs[v].append(run_once(model, prompt, args.new_tokens))
    finally:
        native.configure()
    return {v: {"decode_tps": round(statistics.median(r["decode_tps"] for r in rs), 2),
                "decode_runs": [round(r["decode_tps"], 2) for r in rs],
                "prefill_tps": round(statistics.median(r["prefill_tps"] for r in rs), 1)}
            for v, rs in runs.items()}


if __name__ == "__main__":
    main()

"""Where one decode step's time goes, fully resident. Prints one JSON object.

    python bench/profile_decode.py moe_edge/demo/deepseek-moe-tiny-gptq --new-tokens 64

Greedy decode of --new-tokens after a 32-token prompt, once timed plainly and once under
torch.profiler. Per token: the wall time (plain run), the self time of each group of aten
ops (profiled run), and what is left over: Python, nn.Module dispatch and the profiler's own
cost, which the profiled run's total minus its op time estimates.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from _machine import machine  # bench/ is on sys.path when a script runs
from torch.profiler import ProfilerActivity, profile

from moe_edge.api import load_model
from moe_edge.generation import SamplingParams, generate_ids

GROUPS = {  # aten op -> what it is in this model
    "aten::_weight_int4pack_mm_for_cpu": "int4 matmuls", "aten::_weight_int4pack_mm": "int4 matmuls",
    "moe_edge::int4_mm": "int4 matmuls", "moe_edge::int4_mm_cat": "int4 matmuls",
    "moe_edge::mlps": "int4 matmuls",  # its own time is its two int4_mm_cat calls; silu etc. are nested ops
    "aten::mm": "dense matmuls (lm_head, routers)", "aten::addmm": "dense matmuls (lm_head, routers)",
    "aten::linear": "dense matmuls (lm_head, routers)",
    "aten::_weight_int8pack_mm": "dense matmuls (lm_head, routers)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA)",
    "aten::_to_copy": "dtype casts and copies", "aten::copy_": "dtype casts and copies",
    "aten::empty_strided": "allocations", "aten::empty": "allocations",
    "aten::topk": "routing (softmax, top-k)", "aten::_softmax": "routing (softmax, top-k)",
    "aten::_local_scalar_dense": "routing (softmax, top-k)",
    "aten::_fused_rms_norm": "norms", "aten::rms_norm": "norms",
}


def decode(model, prompt: list[int], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, eos_token_ids=())
    timings: dict = {}
    for _ in generate_ids(model, prompt, params, context=len(prompt) + new_tokens, timings=timings):
        pass
    return timings["decode_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu")
    prompt = torch.randint(2, model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    decode(model, prompt, 8)  # warm-up
    steps = args.new_tokens - 1  # the first new token comes from the prefill
    wall = decode(model, prompt, args.new_tokens) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        decode(model, [prompt[0]], args.new_tokens)  # a 1-token prompt: nearly all decode
        profiled = (time.perf_counter() - t0) / args.new_tokens
    groups: dict[str, float] = defaultdict(float)
    calls = 0
    for e in prof.key_averages():
        groups[GROUPS.get(e.key, "other small ops")] += e.self_cpu_time_total / 1e3 / args.new_tokens
        calls += e.count
    ops = sum(groups.values())
    print(json.dumps({
        "model": args.model, "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
        "decode_ms_per_token": round(wall * 1e3, 3), "decode_tps": round(1 / wall, 1),
        "profiled_ms_per_token": round(profiled * 1e3, 3),
        "aten_ops_per_token": round(calls / args.new_tokens),
        "op_self_ms_per_token": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "outside_ops_ms_per_token": round(profiled * 1e3 - ops, 3),
        "machine": machine(),
    }, indent=1))


if __name__ == "__main__":
    main()

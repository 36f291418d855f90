"""4-bit vs fp32 vs bf16 matmul time on DeepSeek-MoE expert shapes. Prints one JSON object.

    python bench/kernels.py [--threads 2] [--device cpu|cuda]

For each shape (N out x K in) and token count it times y = x @ W.T four ways, in one run,
interleaved (the machines are shared: read the ratios): QuantLinear as it runs (GPTQ w4
g128, act-order; the int4 kernel, or for many tokens on the CPU the dequantised bf16 GEMM of
quant/int4_cpu.py), QuantLinear held to the int4 kernel, F.linear in fp32 and in bf16.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _machine import machine  # bench/ is on sys.path when a script runs
import torch.nn.functional as F

from moe_edge.quant import int4_cpu
from moe_edge.quant.qlinear import QuantLinear
from moe_edge.testing import gptq_layer

SHAPES = [(1408, 2048), (2048, 1408)]  # gate/up projection, down projection of one expert


def best_time(fn, x, repeats: int, sync) -> float:
    fn(x)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            fn(x)
        sync()
        best = min(best, (time.perf_counter() - t0) / 10)
    return best


def kernel_only(q: QuantLinear):
    """q with the dequantised prefill path off: the int4 kernel for any number of rows."""
    def run(x):
        saved, int4_cpu.MIN_ROWS = int4_cpu.MIN_ROWS, 10**9
        try:
            return q(x)
        finally:
            int4_cpu.MIN_ROWS = saved
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    act = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for N, K in SHAPES:
        w = torch.randn(N, K) * 0.02
        q = QuantLinear.from_gptq(gptq_layer(w, 128, act_order=True), False, device, act)
        w32, w16 = w.to(device), w.to(device, torch.bfloat16)
        for tokens in (1, 64, 512):
            x = torch.randn(tokens, K, device=device)
            x_act, x16 = x.to(act), x.to(torch.bfloat16)
            t_int4 = best_time(q, x_act, args.repeats, sync)
            t_kernel = best_time(kernel_only(q), x_act, args.repeats, sync)
            t_fp32 = best_time(lambda v: F.linear(v, w32), x, args.repeats, sync)
            t_bf16 = best_time(lambda v: F.linear(v, w16), x16, args.repeats, sync)
            rows.append({"shape": f"{N}x{K}", "tokens": tokens, "kernel": q.kernel,
                         "int4_ms": round(t_int4 * 1e3, 4), "int4_kernel_ms": round(t_kernel * 1e3, 4),
                         "fp32_ms": round(t_fp32 * 1e3, 4),
                         "bf16_ms": round(t_bf16 * 1e3, 4),
                         "fp32_over_int4": round(t_fp32 / t_int4, 2),
                         "bf16_over_int4": round(t_bf16 / t_int4, 2)})
    print(json.dumps({
        "device": str(device), "threads": torch.get_num_threads(), "results": rows,
        "machine": machine(),
    }))


if __name__ == "__main__":
    main()

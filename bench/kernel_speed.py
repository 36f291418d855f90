"""4-bit vs fp32 vs bf16 matmul time on DeepSeek-MoE expert shapes. Prints one JSON object.

    python bench/kernel_speed.py [--threads 2] [--device cpu|cuda]

"results": one weight over and over (it stays in the caches). "streaming" (CPU): decode as
it happens, one row through ~1 GiB of distinct expert weights (more than the caches hold),
read at GB/s: PyTorch's kernel and moe-edge's own (quant/native.py) one weight per call,
and the own kernel six experts per call, as a MoE layer runs them; rounds interleaved.

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
    out = {"device": str(device), "threads": torch.get_num_threads(), "results": rows}
    if device.type == "cpu":
        out["streaming"] = streaming()
    print(json.dumps({**out, "machine": machine()}))


def streaming(total_bytes: float = 2**30, rounds: int = 3) -> list[dict]:
    """GB/s of one-row matmuls over distinct weights (see the module docstring)."""
    from moe_edge.quant import native
    rows = []
    for N, K in [(2816, 2048), (2048, 1408)]:  # fused gate+up, down of a DeepSeek-16B expert
        count = int(total_bytes // (N * K // 2)) // 6 * 6
        q = torch.randint(0, 16, (N, K), dtype=torch.int32)
        layers = []
        for _ in range(count):  # distinct buffers, same values (the values do not matter here)
            layer = QuantLinear(K, N, "int4-cpu")
            layer.group, layer.perm, layer.bias = 128, None, None
            layer.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
            layer.register_buffer("scale_zeros", (torch.rand(K // 128, N, 2) * 0.01).bfloat16())
            layers.append(layer)
        x = torch.randn(1, K).bfloat16()
        ways = {"pytorch_kernel": lambda l: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, l.packed, 128, l.scale_zeros)}
        if native.available():
            ways["moe_edge_kernel"] = lambda l: native.int4_mm(l, x)
            ways["moe_edge_kernel_6_per_call"] = None
        seconds = {name: [] for name in ways}
        for _ in range(rounds):
            for name, fn in ways.items():
                t0 = time.perf_counter()
                if fn is None:
                    for i in range(0, count, 6):
                        native.int4_mm_cat(layers[i:i + 6], [x])
                else:
                    for layer in layers:
                        fn(layer)
                seconds[name].append(time.perf_counter() - t0)
        row = {"shape": f"{N}x{K}", "weights": count, "bytes_each": N * K // 2}
        for name, times in seconds.items():
            row[f"{name}_gb_per_s"] = round(count * N * K / 2 / sorted(times)[len(times) // 2] / 1e9, 2)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()

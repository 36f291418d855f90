"""Everything only a CUDA machine can show, in one run of under five minutes. Prints JSON.

    python bench/gpu_check.py [--layers 6] [--expert-cache 2GB] [--work DIR]

1. The CUDA tests (`pytest -m cuda`): offloaded == resident on the GPU, the tinygemm int4
   kernel (`_weight_int4pack_mm`) against a dequantised matmul.
2. DeepSeek-MoE-16B's shape (bench/synthetic.py, `--layers` of its 28, random GPTQ weights):
   fully resident on the GPU, then offloaded with `--expert-cache` of VRAM slots and the
   experts in pinned host memory (side-stream copies), prefetch auto and off; decode tok/s,
   hit rate, bytes paged, stall time, and whether the greedy tokens equal resident's.

Without a GPU it exits 2 at once with a one-line reason, so CI and CPU machines never wait.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"  # --device cpu: a dry run of this script's own logic on a CPU machine
sys.path.insert(0, str(ROOT / "bench"))


def cuda_tests() -> dict:
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                          str(ROOT / "tests")], capture_output=True, text=True, cwd=ROOT)
    tail = run.stdout.strip().splitlines()[-1:] or [""]
    return {"returncode": run.returncode, "summary": tail[0], "seconds": round(time.perf_counter() - t0, 1),
            "failures": [l for l in run.stdout.splitlines() if l.startswith(("FAILED", "ERROR"))][:10]}


def warm_up(lm, prompt: list[int]) -> None:
    """The same prompt's code paths once (kernels, allocator) before anything is timed."""
    from moe_edge.generation import SamplingParams, generate_ids
    list(generate_ids(lm.model, prompt, SamplingParams(temperature=0.0, max_new_tokens=16)))


def greedy(lm, prompt: list[int], new_tokens: int) -> dict:
    """Greedy decode, timed; its tokens for the equality check."""
    from moe_edge.generation import SamplingParams, generate_ids
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    timings: dict = {}
    tokens = list(generate_ids(lm.model, prompt, params, timings=timings))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    steps = len(tokens) - 1
    return {"tokens": tokens, "decode_tps": round(steps / timings["decode_seconds"], 2),
            "prompt_tps": round(len(prompt) / timings["prompt_seconds"], 1)}


def offloaded(path: Path, cache: str, prefetch_depth: int, prompt, new_tokens: int, reference) -> dict:
    import moe_edge
    lm = moe_edge.load_offloaded(path, device=DEVICE, expert_cache=cache, prefetch_depth=prefetch_depth)
    try:
        warm_up(lm, prompt)
        lm.reset_offload_stats()
        run = greedy(lm, prompt, new_tokens)
        total = lm.offload_stats().total
        plan = lm.offload.plan
        return {"expert_cache": cache, "prefetch_depth": prefetch_depth, "slots_per_layer": plan.slots_per_layer,
                "slow_tier": plan.slow_tier, "decode_tps": run["decode_tps"], "prompt_tps": run["prompt_tps"],
                "ratio": round(run["decode_tps"] / reference["decode_tps"], 3),
                "hit_rate": round(total.hit_rate, 3), "mib_paged": round(total.bytes_moved / 2**20, 1),
                "stall_s": round(total.stall_seconds, 3), "tokens_equal_resident": run["tokens"] == reference["tokens"]}
    finally:
        lm.offload.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6, help="decoder layers of the 16B shape (layer 0 dense)")
    ap.add_argument("--expert-cache", default="2GB")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", default=None, help="where the synthetic checkpoint goes (default: a temp dir)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        sys.exit(2)
    import moe_edge
    from synthetic import write
    out = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "cuda_tests": cuda_tests() if DEVICE == "cuda" else None}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        path = Path(tmp) / "deepseek-16b-shape-gptq"
        t0 = time.perf_counter()
        write(path, args.layers)
        out["checkpoint"] = {"layers": args.layers, "write_seconds": round(time.perf_counter() - t0, 1),
                             "gib": round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30, 2)}
        prompt = torch.randint(2, 100000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        lm = moe_edge.load(path, device=DEVICE)
        warm_up(lm, prompt)
        reference = greedy(lm, prompt, args.new_tokens)
        del lm
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        out["resident"] = {k: v for k, v in reference.items() if k != "tokens"}
        out["offloaded"] = [offloaded(path, args.expert_cache, depth, prompt, args.new_tokens, reference)
                            for depth in (1, 0)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

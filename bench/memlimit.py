""""Larger than memory" under a real memory limit: each engine, with its defaults, in its own
subprocess and its own cgroup v1 memory group (bench/_cgroup.py; needs root), page cache
charged to the group, caches dropped before every run, engines alternated across repeats.
Prints JSON (and writes it with --out).

    python bench/memlimit.py --shape small --repeats 1 --out build/memlimit_small.json
    flock /tmp/moe-edge-heavy.lock python bench/memlimit.py --shape 16b --limit dense+50%,dense+25% \\
        --repeats 2 --out bench/results/memlimit.json

The model is bench/_baseline_model.py's random Qwen2-MoE in DeepSeek-MoE's shapes, bf16 on
disk (written under build/memlimit/ once). Engines:

- moe-edge: `load_offloaded(path, device="cpu")`, every setting default (`expert_cache="auto"`
  plans the cache from the memory it sees: the JSON records what it saw, `auto_saw_limit`).
- moe-edge-sized: the same with `expert_cache` the limit less the allowance and the dense
  part, i.e. what "auto" gives once it plans inside the limit.
- resident: `load(path, device="cpu")`, fully resident and never limited: the bar.
- naive: moe-edge's dense part and disk store, no expert cache (bench/offload_baselines.py).
- accelerate: transformers + accelerate disk offload, bf16, `max_memory` the limit less the
  allowance. A `deepseek` checkpoint (no transformers class) runs as its Qwen2-MoE form
  (bench/as_qwen2moe.py: the same function, GPTQ dequantized to bf16), written under --work
  once, before the runs and outside any limit, and reused while the source is unchanged.
- llama.cpp:FORMAT[:no-repack] (FORMAT Q4_0 or Q4_K_M): llama-cpp-python (`pip install
  .[llamacpp]`: an sdist, a C++ build), mmap on, in bench/_llama_worker.py (no torch in its
  process). Q4_0 is bench/_gguf.py's re-rounding of the same weights; Q4_K_M, the format users
  download, is llama.cpp's own quantizer run on an F16 GGUF of them. By default its CPU
  backend repacks weights into anonymous memory at load; `no-repack` keeps them file pages.
  Per limit, `llama.cpp best` is the fastest of these that finished. `deepseek` checkpoints
  only (bench/_gguf.py's converter), e.g. the 16B-sized demo (bench/inflate.py); use its
  `--repeat 3` copy for a model larger than the limits for llama.cpp too (its runtime is ~60
  MiB against moe-edge's ~450, so the 1x copy's 0.98 GiB file fits them).

`--limit` takes bytes or a size ("4GiB"), "none", or "dense+P%": the dense part plus P% of
the routed experts, both as moe-edge holds them at runtime (moe_edge.info.model_info, from
the checkpoint's headers), plus `--allowance` for the interpreter, torch, activations and
the KV cache. Several limits, comma-separated, run one after another.

Per run: decode and prompt tokens/s, bytes read from storage (/proc/self/io read_bytes: the
whole process, and the decode steps alone), the group's peak memory (memory.max_usage_in_bytes,
page cache included: without a limit nothing makes the kernel drop the checkpoint's pages, so
compare peak_rss_mib, the process's own), failcnt (times the limit was hit: reclaim, not
necessarily a kill), OOM kills, moe-edge's expert hit rate, and the greedy tokens. Per engine
and limit: medians, and whether its greedy tokens equal the resident model's.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _cgroup import run_limited  # bench/ is on sys.path when a script runs
from _machine import commit, emit, machine
from as_qwen2moe import converted
from offload_baselines import (Accelerate, MoeEdge, bench_parser, measure, parse_or_work, random_prompt,
                               rotated, worker_cmd)

from moe_edge.info import model_info
from moe_edge.offload.plan import parse_size

LLAMA = ("llama.cpp:Q4_0", "llama.cpp:Q4_0:no-repack", "llama.cpp:Q4_K_M", "llama.cpp:Q4_K_M:no-repack")
ENGINES = ("moe-edge", "moe-edge-sized", "resident", "naive", "accelerate", *LLAMA)
UNLIMITED = {"resident"}  # the bar runs with every weight in RAM


# --- the worker (one engine, one run, inside its memory group) -------------------------------
def open_engine(name: str, model: Path, budget: int | None, work: Path, tmp: Path, options: dict,
                hf_model: Path | None = None):
    """moe-edge keeps its default store ($MOE_EDGE_CACHE or ~/.cache/moe-edge), naive one in
    `work` (both built by the first run, reused); accelerate loads `hf_model` (default `model`)
    and offloads to `tmp`. `options`: load_offloaded keywords for the moe-edge engine
    (--moe-edge-options; default none)."""
    from moe_edge.api import load, load_offloaded
    if name == "moe-edge":
        return MoeEdge(load_offloaded(model, device="cpu", **options))
    if name == "moe-edge-sized":  # the cache a plan that sees the limit would give
        cache = (budget or 2**50) - model_info(model, "cpu").dense_bytes
        return MoeEdge(load_offloaded(model, device="cpu", expert_cache=f"{cache}B"))
    if name == "resident":
        return MoeEdge(load(model, device="cpu"))
    if name == "naive":
        return MoeEdge.open(model, 0.0, work / "store", cached=False)
    hf_model = hf_model or model
    cfg = json.loads((hf_model / "config.json").read_text())
    return Accelerate(hf_model, budget or 2**50, tmp, False, cfg, "bfloat16")


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="memlimit-", dir=args.work) as tmp:
        t0 = time.perf_counter()
        engine = open_engine(args.worker, args.model, args.budget or None, args.work, Path(tmp),
                             args.moe_edge_options, args.hf_model)
        load_s = time.perf_counter() - t0
        print(f"loaded in {load_s:.1f} s; decoding", file=sys.stderr, flush=True)  # how far an OOM-killed run got
        r = measure(engine, prompt_ids(args, vocab), args.new_tokens, random_prompt(vocab, 16, seed=1))
    return {"engine": args.worker, "load_s": round(load_s, 1), **r}


def prompt_ids(args, vocab: int) -> list[int]:
    """The prompt: random ids, or held-out text (`--text heldout`: a trained model's routing
    meets real text; moe_edge/data/demo_heldout.jsonl, never trained on)."""
    if args.text == "random":
        return random_prompt(vocab, args.prompt_tokens)
    from moe_edge.evaluate import heldout_ids
    from moe_edge.tokenizer import load_tokenizer
    return heldout_ids(load_tokenizer(args.model), max_tokens=args.prompt_tokens).tolist()


def accelerate_checkpoint(args) -> Path:
    """What the accelerate engine loads: the model, or a deepseek model's Qwen2-MoE form."""
    if json.loads((args.model / "config.json").read_text())["model_type"] != "deepseek":
        return args.model
    dst = args.work / f"{args.model.resolve().name}-qwen2moe-bf16"
    print(f"[{time.strftime('%H:%M:%S')}] accelerate: {args.model} as Qwen2-MoE in {dst} ...",
          file=sys.stderr, flush=True)
    return converted(args.model, dst)


# --- limits ----------------------------------------------------------------------------------
def parse_limit(text: str, info, allowance: int) -> tuple[int | None, str]:
    """(bytes or None, the rule that gave them)."""
    text = text.strip().lower()
    if text in ("none", "0"):
        return None, "no limit"
    m = re.fullmatch(r"dense\s*\+\s*([0-9.]+)%", text)
    if not m:
        return parse_size(text), "given"
    experts = info.expert_bytes * info.moe_layers * info.experts_per_layer
    share = float(m[1]) / 100
    return (int(info.dense_bytes + share * experts + allowance),
            f"dense {info.dense_bytes} + {share:g} x experts {experts} + allowance {allowance} bytes")


# --- llama.cpp -------------------------------------------------------------------------------
def llama_skipped(args) -> dict[str, str]:
    """Why the llama.cpp engines cannot run here, if they cannot."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        reason = "llama-cpp-python is not installed (pip install .[llamacpp])"
    else:
        model_type = json.loads((args.model / "config.json").read_text())["model_type"]
        reason = None if model_type == "deepseek" else f"bench/_gguf.py writes deepseek checkpoints, not {model_type}"
    return {e: reason for e in LLAMA if e in args.engines and reason}


def llama_cmd(args, engine: str) -> list[str]:
    """bench/_llama_worker.py for `engine`, its GGUF written first (build/gguf/, reused)."""
    from compare_llamacpp import ensure_gguf
    _, fmt, *rest = engine.split(":")
    gguf = ensure_gguf(str(args.model), fmt)
    prompts = args.work / "prompts.json"
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    prompts.write_text(json.dumps({"prompt": prompt_ids(args, vocab), "warmup": random_prompt(vocab, 16, seed=1)}))
    return [sys.executable, str(Path(__file__).with_name("_llama_worker.py")), "--gguf", str(gguf),
            "--prompts", str(prompts), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
            *(["--no-repack"] if rest == ["no-repack"] else [])]


# --- the driver ------------------------------------------------------------------------------
def run_engine(args, engine: str, limit: int | None) -> dict:
    limit = None if engine in UNLIMITED else limit
    budget = limit - args.allowance if limit else 0
    cmd = llama_cmd(args, engine) if engine in LLAMA else worker_cmd(
        __file__, args, engine, "--budget", str(budget), "--text", args.text,
        "--moe-edge-options", json.dumps(args.moe_edge_options),
        *(["--hf-model", str(args.hf_model)] if engine == "accelerate" else []))
    print(f"[{time.strftime('%H:%M:%S')}] {engine}, limit {f'{limit / 2**30:.2f} GiB' if limit else 'none'} ...",
          file=sys.stderr, flush=True)
    r = {"engine": engine, "limit_bytes": limit, **run_limited(cmd, limit, "memlimit", args.run_timeout)}
    if "error" not in r:
        print(f"    {r['decode_tps']:.2f} tok/s decode, {r['prompt_tps']:.1f} prompt, peak "
              f"{r['cgroup'].get('peak_bytes', 0) / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return r


def engine_summary(mine: list[dict], new_tokens: int, bar: list[int] | None) -> dict:
    ok = [r for r in mine if "error" not in r]
    groups = [r["cgroup"] for r in mine]
    out = {"runs": len(mine), "oom_killed": sum(g["oom_killed"] for g in groups),
           "peak_mib": round(max(g.get("peak_bytes", 0) for g in groups) / 2**20, 1),
           "failcnt": [g.get("failcnt") for g in groups]}
    if not ok:
        return {**out, "error": mine[0]["error"], "stderr_tail": mine[0]["stderr_tail"]}
    med = lambda key: statistics.median(r[key] for r in ok)
    last = ok[-1]
    out.update({
        "decode_tps": round(med("decode_tps"), 3), "decode_tps_runs": [round(r["decode_tps"], 3) for r in ok],
        "prompt_tps": round(med("prompt_tps"), 2), "load_s": med("load_s"),
        "peak_rss_mib": round(max(r["peak_rss_bytes"] for r in ok) / 2**20, 1),
        "storage_read_mib_total": round(med("total_read_bytes") / 2**20, 1),
        "storage_read_mib_per_decode_token": round(med("storage_read_bytes") / (new_tokens - 1) / 2**20, 1),
        **({"faults_per_decode_token": {k: round(med(f"{k}_faults") / (new_tokens - 1), 1) for k in ("minor", "major")}}
           if "minor_faults" in last else {}),
        "tokens": last["tokens"], "same_tokens_as_resident": None if bar is None else last["tokens"] == bar,
        **{k: last[k] for k in ("hit_rate", "prefetch_precision", "prefetch_recall", "stall_s", "plan", "dtype")
           if k in last},
    })
    plan = last.get("plan", {})
    if mine[0]["limit_bytes"] and plan.get("available_bytes") is not None:  # "auto" planned it
        out["auto_saw_limit"] = plan["available_bytes"] <= mine[0]["limit_bytes"]
    return out


def ratios(results: dict) -> dict:
    """moe-edge's decode tok/s over each other engine's under the same limit (and over the
    resident bar); `llama.cpp best` is the fastest llama.cpp configuration that finished."""
    tps = {e: r["decode_tps"] for e, r in results.items() if r.get("decode_tps")}
    if "moe-edge" not in tps:
        return {}
    out = {f"vs {e}": round(tps["moe-edge"] / t, 2) for e, t in tps.items() if e != "moe-edge"}
    llama = {e: t for e, t in tps.items() if e in LLAMA}
    if llama:
        best = max(llama, key=llama.get)
        out.update({"vs llama.cpp best": round(tps["moe-edge"] / llama[best], 2), "llama.cpp best is": best})
    return out


def summarise(runs: list[dict], args, info) -> dict:
    bar = next((r["tokens"] for r in runs if r["engine"] == "resident" and "error" not in r), None)
    limits = []
    for text, limit, rule in args.limits:
        mine = [r for r in runs if r["limit_text"] == text]
        results = {e: engine_summary([r for r in mine if r["engine"] == e], args.new_tokens, bar)
                   for e in args.engines}
        limits.append({"limit": text, "limit_bytes": limit, "rule": rule, "results": results,
                       "moe_edge_ratios": ratios(results)})
    keep = ("checkpoint_bytes", "dense_bytes", "expert_bytes", "moe_layers", "experts_per_layer", "top_k")
    return {"model": str(args.model), "shape": args.shape, "model_info": {k: getattr(info, k) for k in keep},
            "allowance_bytes": args.allowance, "moe_edge_options": args.moe_edge_options,
            "accelerate_checkpoint": args.hf_model and str(args.hf_model),
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "threads": args.threads, "unlimited": sorted(UNLIMITED & set(args.engines)),
            "order": "engines rotated each repeat, one subprocess and memory cgroup per run, caches dropped first",
            "limits": limits, "skipped": args.skipped, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "commit": commit(), "command": " ".join(["python", *sys.argv]),
            "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs]}


def main() -> None:
    ap = bench_parser(__doc__, ENGINES, "build/memlimit", repeats=2, prompt_tokens=64)
    ap.add_argument("--limit", default="dense+50%", help="bytes, a size, none, or dense+P%%; comma-separated")
    ap.add_argument("--allowance", default="768MiB", help="runtime memory a dense+P%% limit adds")
    ap.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--hf-model", type=Path, default=None, help=argparse.SUPPRESS)  # the accelerate engine's
    ap.add_argument("--run-timeout", type=float, default=600, help="seconds before a run is killed (and says so)")
    ap.add_argument("--text", choices=["random", "heldout"], default="random",
                    help="prompt: random ids, or the demo's held-out text (trained models)")
    ap.add_argument("--moe-edge-options", type=json.loads, default={},  # a bad value fails here, not per run
                    help='load_offloaded keywords for the moe-edge engine, as JSON (e.g. \'{"prefetch_depth": 0}\'); '
                         "default none: every setting default")
    if not (args := parse_or_work(ap, worker)):
        return
    args.allowance = parse_size(args.allowance)
    info = model_info(args.model, "cpu")
    args.limits = [(t, *parse_limit(t, info, args.allowance)) for t in args.limit.split(",")]
    args.skipped = llama_skipped(args)
    args.engines = [e for e in args.engines if e not in args.skipped]
    args.hf_model = accelerate_checkpoint(args) if "accelerate" in args.engines else None
    runs = [{"limit_text": text, **run_engine(args, engine, limit)}
            for text, limit, _ in args.limits for engine in rotated(args.engines, args.repeats)]
    emit(summarise(runs, args, info), args.out)


if __name__ == "__main__":
    main()

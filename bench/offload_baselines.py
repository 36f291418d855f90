"""moe-edge's expert offloading against what users otherwise run: same model, same memory
budget, CPU only, slow tier on disk. Prints JSON (and writes it with --out).

    python bench/offload_baselines.py --shape small --repeats 3 --out build/bench_baselines_small.json
    flock /tmp/moe-edge-heavy.lock python bench/offload_baselines.py --shape 16b --repeats 3 \\
        --out build/bench_baselines_16bshape.json

The model is a random Qwen2-MoE in DeepSeek-MoE's shapes (bench/_baseline_model.py), bf16 on
disk. moe-edge computes in fp32 and, on a CPU with native bf16, keeps the bf16 weights bf16
(`bf16_weights`); transformers runs in `--hf-dtype` (default float32). The budget is the
dense part plus `--fraction` of the routed experts, in fp32 bytes, unless `--budget` is given. Engines, each in its own subprocess (so resident memory is its own), alternated
within every repeat:

- moe-edge: `load_offloaded(expert_cache=fraction, prefetch_depth=1, slow_tier="disk")`.
- naive: the same dense part and the same disk store, no cache: every routed expert is read
  from the store each time a token uses it (one scratch buffer, pages dropped after each read).
- accelerate: transformers + accelerate, `device_map="auto"`, `max_memory={"cpu": budget}`,
  `offload_folder` (what does not fit goes to memory-mapped files on disk).
- accelerate-experts (optional): an explicit device_map that keeps every dense module in RAM
  and puts the expert modules of the last MoE layers on disk, as many as the budget needs:
  the best placement accelerate can do at its granularity (one fused tensor per layer).

--ram-limit BYTES makes the budget real: each run gets its own cgroup v1 memory group of BYTES
(bench/_cgroup.py; root), which charges the engine's memory and the page cache it fills
(checkpoint reads, memory-mapped files); an engine that needs more is OOM-killed and reported
so. Caches are dropped before every run. Under a limit moe-edge sizes its cache itself
(`expert_cache="auto"`, what a user gets); `--hf-dtype auto` gives transformers its own
default for the checkpoint (bf16 here), as moe-edge keeps bf16 weights bf16.
bench/memlimit.py runs the engines with their defaults under such limits.

Reported per engine: decode tokens/s (median of repeats), load seconds, resident memory after
decoding (RSS, anonymous part) and peak, bytes the process read from storage (/proc/self/io
read_bytes) and in total through read() (rchar), and the engine's own count of expert bytes
moved, all over the decode steps only (after the prompt's prefill), like tokens/s. Ratios are
of medians, moe-edge over each baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from _baseline_model import sizes, write_model  # bench/ is on sys.path when a script runs
from _cgroup import run_limited
from _machine import emit, machine

ENGINES = ("moe-edge", "naive", "accelerate", "accelerate-experts")


# --- engines (run inside a worker subprocess) ------------------------------------------------
class UncachedExperts:
    """ExpertProvider with no cache: each routed expert is read from the slow tier every time
    it is used, into one scratch buffer shared by all layers (the block computes an expert
    before asking for the next, so one buffer is enough)."""

    def __init__(self, store, layouts, index_of, layer: int, hidden: int, width: int, scratch, counter):
        self.store, self.layouts, self.index_of, self.layer = store, layouts, index_of, layer
        self.hidden, self.width, self.scratch, self.counter = hidden, width, scratch, counter

    def experts_for(self, ids, hold: bool = False, routing=None):
        from moe_edge.offload.store import expert_from_buffer
        if hold:
            raise ValueError("one scratch buffer cannot hold experts")
        for e in ids:
            self.store.read_into(self.index_of(self.layer, e), self.scratch)
            self.counter["bytes"] += self.store.stride
            yield e, expert_from_buffer(self.layouts[(self.layer, e)], self.scratch, self.hidden, self.width)

    def start(self, ids: list[int]) -> None:
        pass  # reads on demand only

    def apply(self, inputs, ids: list[int]) -> torch.Tensor:
        return torch.cat([inputs(expert) for _, expert in self.experts_for(ids)])  # [A, D], each before the next read


class MoeEdge:
    """moe-edge's own decoder around a LoadedModel (offloaded or resident); `cached` False
    swaps the expert cache for UncachedExperts."""

    def __init__(self, lm, cached: bool = True):
        self.lm, self.model, self.counter, self.cached = lm, lm.model, {"bytes": 0}, cached
        if not cached:
            cache, cfg = lm.offload.cache, lm.model.config
            cache.close()  # its loader thread; the store stays open
            from moe_edge.offload.store import slot_buffers
            scratch = slot_buffers(cache.store.stride, 1, torch.device("cpu"))[0]  # read as the cache reads
            for layer, block in self.model.moe_blocks().items():
                block.experts = UncachedExperts(cache.store, cache.layouts, cache.index_of, layer,
                                                cfg.hidden_size, cfg.moe_intermediate_size, scratch, self.counter)

    @classmethod
    def open(cls, path: Path, fraction: float, store_dir: Path, cached: bool, auto: bool = False) -> MoeEdge:
        """This benchmark's settings: prefetch depth 1, the store in `store_dir`; uncached:
        top-k slots that are never touched (so never resident), only the store is used."""
        from moe_edge.api import load_offloaded
        from moe_edge.config import load_config
        cache = ("auto" if auto else f"{fraction * 100:g}%") if cached else load_config(path).top_k
        lm = load_offloaded(path, device="cpu", expert_cache=cache, prefetch_depth=1 if cached else 0,
                            slow_tier="disk", offload_dir=store_dir)
        return cls(lm, cached)

    def info(self) -> dict:
        if self.lm.offload is None:
            return {"dtype": str(self.model.dtype).removeprefix("torch.")}
        plan = self.lm.offload.plan.to_dict()
        keep = ("resident_bytes", "kv_cache_bytes", "expert_bytes", "slots_per_layer", "cache_bytes", "store_bytes",
                "resident_fraction", "available_bytes", "kv_start_bytes", "slots_at_full_context") if self.cached else ("resident_bytes", "expert_bytes", "store_bytes")
        return {"plan": {k: plan[k] for k in keep}, "dtype": str(self.model.dtype).removeprefix("torch.")}

    def reset(self) -> None:
        if self.lm.offload is not None:
            self.lm.reset_offload_stats()
        self.counter["bytes"] = 0

    def generate(self, prompt: list[int], new_tokens: int, after_prefill=None) -> tuple[list[int], float, float]:
        """Greedy tokens, decode tokens/s, prompt tokens/s."""
        from moe_edge.generation import SamplingParams, generate_ids
        timings: dict = {}
        params = SamplingParams(temperature=0, max_new_tokens=new_tokens, eos_token_ids=())
        tokens = []
        for token in generate_ids(self.model, prompt, params, len(prompt) + new_tokens, timings):
            tokens.append(token)
            if len(tokens) == 1 and after_prefill:
                after_prefill()
        return tokens, (len(tokens) - 1) / timings["decode_seconds"], len(prompt) / timings["prompt_seconds"]

    def moved(self) -> dict:
        if self.lm.offload is None:
            return {}
        if not self.cached:
            return {"expert_bytes_read": self.counter["bytes"]}
        s = self.lm.offload_stats().total
        return {"expert_bytes_read": s.bytes_moved, "hit_rate": round(s.hit_rate, 3),
                "prefetch_precision": round(s.prefetch_precision, 3),
                "prefetch_recall": round(s.prefetch_recall, 3), "stall_s": round(s.stall_seconds, 3)}


class Accelerate:
    """transformers' Qwen2MoeForCausalLM placed by accelerate (RAM, and disk for the rest)."""

    def __init__(self, path: Path, budget: int, offload_dir: Path, experts_only: bool, cfg: dict,
                 dtype: str = "float32"):
        from transformers import Qwen2MoeForCausalLM
        kw = {"device_map": "auto", "max_memory": {"cpu": budget}}
        if experts_only:
            kw = {"device_map": experts_device_map(cfg, budget)}
        self.model = Qwen2MoeForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                                                          offload_folder=str(offload_dir), **kw).eval()
        self.offload_dir = offload_dir

    def info(self) -> dict:
        dm = getattr(self.model, "hf_device_map", {}) or {}
        placed = {}
        for name, dev in dm.items():
            placed.setdefault(str(dev), []).append(name)
        disk_bytes = sum(f.stat().st_size for f in self.offload_dir.rglob("*") if f.is_file())
        params = {n: p for n, p in self.model.named_parameters()}
        cpu_bytes = sum(p.numel() * p.element_size() for p in params.values() if p.device.type == "cpu")
        return {"device_map_counts": {d: len(v) for d, v in placed.items()},
                "device_map": {d: _compact(v) for d, v in placed.items()},
                "offload_folder_bytes": disk_bytes, "dtype": str(self.model.dtype).removeprefix("torch."),
                "params_on_cpu_bytes": cpu_bytes}

    def reset(self) -> None:
        pass

    def generate(self, prompt: list[int], new_tokens: int, after_prefill=None) -> tuple[list[int], float, float]:
        from transformers import LogitsProcessor, LogitsProcessorList

        class Stamp(LogitsProcessor):  # called once per new token, right after its forward
            def __init__(self):
                self.times = []

            def __call__(self, input_ids, scores):
                if not self.times and after_prefill:
                    after_prefill()
                self.times.append(time.perf_counter())
                return scores

        stamp = Stamp()
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=1,
                                      logits_processor=LogitsProcessorList([stamp]))
        t = stamp.times
        return out[0, len(prompt):].tolist(), (len(t) - 1) / (t[-1] - t[0]), len(prompt) / (t[0] - t0)

    def moved(self) -> dict:
        return {}


def experts_device_map(cfg: dict, budget: int) -> dict:
    """Everything in RAM except the fused expert modules of the last MoE layers, on disk, as
    few layers as the budget allows (accelerate cannot split one layer's fused experts)."""
    s = sizes(cfg)
    per_layer = s["routed_expert_bytes"] // s["moe_layers"]
    fit = max(0, (budget - s["dense_bytes"]) // per_layer)
    moe = [l for l in range(cfg["num_hidden_layers"]) if l not in cfg["mlp_only_layers"]]
    on_disk = set(moe[int(fit):])
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        if l not in on_disk:
            dm[p] = "cpu"
            continue
        for child in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp.gate",
                      "mlp.shared_expert", "mlp.shared_expert_gate"):
            dm[f"{p}.{child}"] = "cpu"
        dm[f"{p}.mlp.experts"] = "disk"
    return dm


def _compact(names: list[str]) -> list[str]:
    return names if len(names) <= 12 else names[:6] + [f"... {len(names) - 12} more ..."] + names[-6:]


def _io() -> dict:
    """The process's I/O counters and page faults so far (major: read from storage)."""
    with open("/proc/self/io") as f:
        io = {k: int(v) for k, v in (line.split(": ") for line in f)}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {**io, "minor_faults": usage.ru_minflt, "major_faults": usage.ru_majflt}


def measure(engine, prompt: list[int], new_tokens: int, warmup: list[int]) -> dict:
    """A warm-up (8 tokens after `warmup`, filling caches the way a conversation would), then one
    greedy decode of `new_tokens` after `prompt`. Counters cover the decode steps only (after
    the prompt's prefill), as tokens/s does; `total_read_bytes` is the whole process's."""
    rss_loaded = psutil.Process().memory_info().rss
    engine.generate(warmup, 8)
    io0 = {}

    def after_prefill():
        engine.reset()
        io0.update(_io())

    tokens, tps, prompt_tps = engine.generate(prompt, new_tokens, after_prefill)
    io1 = _io()
    mem = psutil.Process().memory_info()
    return {"decode_tps": tps, "prompt_tps": prompt_tps, "tokens": tokens, "rss_loaded_bytes": rss_loaded,
            "rss_bytes": mem.rss, "rss_anon_bytes": mem.rss - mem.shared,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "storage_read_bytes": io1["read_bytes"] - io0["read_bytes"], "total_read_bytes": io1["read_bytes"],
            "rchar_bytes": io1["rchar"] - io0["rchar"], "minor_faults": io1["minor_faults"] - io0["minor_faults"],
            "major_faults": io1["major_faults"] - io0["major_faults"], **engine.moved(), **engine.info()}


def random_prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    cfg = json.loads((args.model / "config.json").read_text())
    prompt = random_prompt(cfg["vocab_size"], args.prompt_tokens)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf-offload-", dir=args.work) as tmp:
        if args.worker in ("moe-edge", "naive"):
            engine = MoeEdge.open(args.model, args.fraction, args.work / "store", cached=args.worker == "moe-edge",
                                  auto=bool(args.ram_limit))
        else:
            engine = Accelerate(args.model, args.budget, Path(tmp), args.worker == "accelerate-experts", cfg,
                                args.hf_dtype)
        load_s = time.perf_counter() - t0
        return {"engine": args.worker, "load_s": round(load_s, 1), **measure(engine, prompt, args.new_tokens, prompt)}


# --- the driver ------------------------------------------------------------------------------
def bench_parser(doc: str, engines: tuple[str, ...], work: str, repeats: int, prompt_tokens: int):
    """The options this script and bench/memlimit.py share."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["small", "16b"], default="small")
    ap.add_argument("--model", type=Path, default=None, help=f"checkpoint folder (default {work}/<shape>)")
    ap.add_argument("--work", type=Path, default=Path(work), help="stores and offload folders")
    ap.add_argument("--engines", default=",".join(engines))
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", choices=engines, help=argparse.SUPPRESS)
    return ap


def parse_or_work(ap: argparse.ArgumentParser, worker):
    """The driver's arguments (the model written, engines split); in a worker subprocess
    (--worker), runs `worker` and prints its JSON line instead, returning None."""
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(worker(args)))
        return None
    args.model = args.model or write_model(args.work / args.shape, args.shape)
    args.engines = args.engines.split(",")
    return args


def worker_cmd(script: str, args, engine: str, *extra: str) -> list[str]:
    return [sys.executable, script, "--worker", engine, "--model", str(args.model), "--work", str(args.work),
            "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
            "--new-tokens", str(args.new_tokens), *extra]


def rotated(engines: list[str], repeats: int):
    """Every engine once a repeat, each repeat starting one engine further on."""
    for i in range(repeats):
        yield from engines[i % len(engines):] + engines[:i % len(engines)]


def run_engine(args, engine: str) -> dict:
    cmd = worker_cmd(__file__, args, engine, "--budget", str(args.budget), "--fraction", str(args.fraction),
                     "--ram-limit", str(args.ram_limit or 0), "--hf-dtype", args.hf_dtype)
    print(f"[{time.strftime('%H:%M:%S')}] {engine} ...", file=sys.stderr, flush=True)
    r = {"engine": engine, **run_limited(cmd, args.ram_limit or None, "offload-baselines")}
    if "error" not in r:
        print(f"    {r['decode_tps']:.2f} tok/s, rss {r['rss_bytes'] / 2**30:.2f} GiB, load {r['load_s']} s",
              file=sys.stderr, flush=True)
    return r


def summarise(runs: list[dict], args, cfg: dict, s: dict) -> dict:
    out, first = {}, {}
    for engine in args.engines:
        mine = [r for r in runs if r["engine"] == engine]
        ok = [r for r in mine if "error" not in r]
        if not ok:
            out[engine] = {"error": mine[0]["error"], "stderr_tail": mine[0]["stderr_tail"]}
            continue
        last = ok[-1]
        first[engine] = ok[0]["tokens"]
        n = args.new_tokens
        out[engine] = {
            "decode_tps": round(statistics.median(r["decode_tps"] for r in ok), 3),
            "decode_tps_runs": [round(r["decode_tps"], 3) for r in ok],
            "load_s": statistics.median(r["load_s"] for r in ok),
            **{k: round(statistics.median(r[k] for r in ok) / 2**20, 1) for k in
               ("rss_loaded_bytes", "rss_bytes", "rss_anon_bytes", "peak_rss_bytes")},
            "storage_read_mib_per_token": round(statistics.median(r["storage_read_bytes"] for r in ok) / (n - 1) / 2**20, 1),
            "rchar_mib_per_token": round(statistics.median(r["rchar_bytes"] for r in ok) / (n - 1) / 2**20, 1),
            **({"expert_mib_read_per_token": round(statistics.median(r["expert_bytes_read"] for r in ok) / (n - 1) / 2**20, 1)}
               if "expert_bytes_read" in last else {}),
            **{k: v for k, v in last.items() if k in ("hit_rate", "prefetch_precision", "prefetch_recall",
                                                       "stall_s", "plan", "dtype", "device_map_counts",
                                                       "device_map", "offload_folder_bytes", "params_on_cpu_bytes")},
        }
        out[engine] = {k.replace("_bytes", "_mib") if k.startswith(("rss", "peak")) else k: v
                       for k, v in out[engine].items()}
    ratios = {}
    if "decode_tps" in out.get("moe-edge", {}):
        for other in args.engines:
            if other != "moe-edge" and "decode_tps" in out[other]:
                ratios[f"moe-edge/{other}"] = round(out["moe-edge"]["decode_tps"] / out[other]["decode_tps"], 2)
    same = {f"moe-edge=={o}": first["moe-edge"] == t for o, t in first.items() if o != "moe-edge"} if "moe-edge" in first else {}
    return {"model": str(args.model), "shape": args.shape, "config": {k: cfg[k] for k in (
                "hidden_size", "num_hidden_layers", "num_experts", "moe_intermediate_size", "num_experts_per_tok",
                "shared_expert_intermediate_size", "num_attention_heads", "vocab_size")},
            "fp32_sizes": s, "budget_bytes": args.budget, "budget_rule": f"dense + {args.fraction:g} x routed experts (fp32)",
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "threads": args.threads, "ram_limit_bytes": args.ram_limit or None, "hf_dtype": args.hf_dtype,
            "cgroup_peak_bytes": [r.get("cgroup", {}).get("peak_bytes") for r in runs],
            "order": "engines alternated, rotated each repeat, one subprocess and memory cgroup per run",
            "results": out, "ratios": ratios, "same_greedy_tokens": same, "machine": machine()}


def main() -> None:
    ap = bench_parser(__doc__, ENGINES, "build/baselines", repeats=3, prompt_tokens=32)
    ap.add_argument("--fraction", type=float, default=0.5, help="routed experts the budget holds")
    ap.add_argument("--budget", type=int, default=None, help="bytes (default: dense + fraction x experts, fp32)")
    ap.add_argument("--ram-limit", type=int, default=0,
                    help="bytes the engine and its page cache may use in all (a memory cgroup of this size)")
    ap.add_argument("--hf-dtype", default="float32", help="transformers' dtype: float32, bfloat16 or auto")
    if not (args := parse_or_work(ap, worker)):
        return
    cfg = json.loads((args.model / "config.json").read_text())
    s = sizes(cfg)
    args.budget = args.budget or int(s["dense_bytes"] + args.fraction * s["routed_expert_bytes"])
    runs = [run_engine(args, engine) for engine in rotated(args.engines, args.repeats)]
    emit(summarise(runs, args, cfg, s), args.out)


if __name__ == "__main__":
    main()

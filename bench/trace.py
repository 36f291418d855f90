"""Expert-cache policies replayed on a recorded routing trace, beside Belady's optimum.
Prints JSON (and writes it with --out).

    python bench/trace.py --out bench/results/trace_policies.json

Records, per token and per MoE layer, the top-k expert ids the routers pick over held-out
text (default: the bundled demo model on moe_edge/data/demo_heldout.jsonl, documents from
the split the demo was not trained on), by a forward hook on each MoE block's router during
prefill passes of --window tokens (per-token routing is the same as decoding's). Then, at
each cache size, every policy in moe_edge.offload.policy.POLICIES replays the trace as
ExpertCache runs a decode step: a layer's k experts for a token are requested together,
resident ones first, and none of them is evicted for another (they are pinned). Beside
them: LRU over one cache shared by all layers with the same total slots (not a runtime
option: ExpertCache has a fixed pool per layer), and Belady's optimum (evict the expert
whose next use is furthest away) per layer and shared. Miss rate = loads / requests,
the first load of each expert included.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

from moe_edge.offload.policy import LRU, POLICIES

Step = Sequence[Hashable]  # the distinct experts one token needs in one layer (or, shared, one layer's)


def record(path: str | Path, tokens, window: int) -> dict[int, list[tuple[int, ...]]]:
    """Layer -> per-token top-k expert ids, over `tokens` in prefill windows of `window`."""
    import torch

    from moe_edge.api import load
    lm = load(path, device="cpu")
    trace: dict[int, list[tuple[int, ...]]] = {l: [] for l in lm.config.moe_layer_ids}
    hooks = [lm.model.model.layers[l].mlp.gate.register_forward_hook(
        lambda _m, _x, out, l=l: trace[l].extend(map(tuple, out[1].tolist())))  # out: (weights, ids [N, A])
        for l in trace]
    try:
        with torch.inference_mode():
            for i in range(0, len(tokens), window):
                lm.model(torch.as_tensor(tokens[i:i + window]).reshape(1, -1), last_only=True)
    finally:
        for h in hooks:
            h.remove()
    return trace


def replay(steps: Sequence[Step], policy, slots: int) -> int:
    """Misses of `policy` with `slots` slots over `steps`, as ExpertCache.experts_for orders
    them: the step's resident experts are touched first, then each missing one is loaded into
    a free slot or over the policy's victim among residents the step does not use."""
    resident: set = set()
    misses = 0
    for step in steps:
        needed = set(step)
        if len(needed) > slots:
            raise ValueError(f"{len(needed)} experts in one step need more than {slots} slots")
        for e in step:
            if e in resident:
                policy.touch(e)
        for e in step:
            if e in resident:
                continue
            if len(resident) >= slots:
                out = policy.victim(resident - needed)
                resident.discard(out)
                policy.forget(out)
            resident.add(e)
            policy.touch(e)
            misses += 1
    return misses


def belady(steps: Sequence[Step], slots: int) -> int:
    """Fewest misses any policy can have (each step's experts resident together, loads on
    demand): on a miss evict the resident whose next use is furthest away (Belady, 1966)."""
    following: list[dict] = [{} for _ in steps]  # step -> expert -> the next step using it
    seen: dict = {}
    for t in range(len(steps) - 1, -1, -1):
        following[t] = {e: seen.get(e, float("inf")) for e in steps[t]}
        seen.update((e, t) for e in steps[t])
    next_use: dict = {}  # resident -> its next use
    misses = 0
    for t, step in enumerate(steps):
        for e in step:
            if e not in next_use:
                misses += 1
                if len(next_use) >= slots:
                    del next_use[max((r for r in next_use if r not in following[t]), key=next_use.get)]
            next_use[e] = following[t][e]
    return misses


def shared_steps(trace: dict[int, list[tuple[int, ...]]]) -> list[list[tuple[int, int]]]:
    """The trace in the order one cache shared by all layers sees it: token by token, layer
    by layer, experts named (layer, id)."""
    layers = sorted(trace)
    return [[(l, e) for e in trace[l][t]] for t in range(len(trace[layers[0]])) for l in layers]


def compare(trace: dict[int, list[tuple[int, ...]]], sizes: list[int]) -> dict:
    """{slots: {policy: misses}} summed over layers, for each per-layer slot count in `sizes`."""
    shared = shared_steps(trace)
    out = {}
    for slots in sizes:
        row = {name: sum(replay(steps, make(), slots) for steps in trace.values())
               for name, make in POLICIES.items()}
        row["lru-shared"] = replay(shared, LRU(), slots * len(trace))
        row["belady"] = sum(belady(steps, slots) for steps in trace.values())
        row["belady-shared"] = belady(shared, slots * len(trace))
        out[slots] = row
    return out


def _slots(spec: str, experts: int, top_k: int) -> int:
    if spec == "topk":
        return top_k
    return round(experts * float(spec[:-1]) / 100) if spec.endswith("%") else int(spec)


def main() -> None:
    from _machine import commit, emit, machine  # bench/ is on sys.path when a script runs

    from moe_edge.evaluate import HELDOUT, heldout_ids
    from moe_edge.hub import DEMO
    from moe_edge.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO), help="checkpoint folder (default: the bundled demo)")
    ap.add_argument("--text", default=str(HELDOUT), help='JSONL, {"text": ...} per line')
    ap.add_argument("--max-tokens", type=int, default=None, help="default: all of --text")
    ap.add_argument("--window", type=int, default=512, help="tokens per prefill pass")
    ap.add_argument("--caches", default="25%,50%,75%", help="comma-separated: N%%, slots, or topk")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    tokens = heldout_ids(load_tokenizer(args.model), args.text, args.max_tokens).tolist()
    t0 = time.perf_counter()
    trace = record(args.model, tokens, args.window)
    first = next(iter(trace.values()))
    experts, top_k = _model_sizes(args.model)
    sizes = [_slots(s, experts, top_k) for s in args.caches.split(",")]
    misses = compare(trace, sizes)
    requests = len(first) * top_k * len(trace)
    result = {
        "model": _shown(args.model), "text": _shown(args.text), "tokens": len(first), "window": args.window,
        "moe_layers": len(trace), "experts": experts, "top_k": top_k, "requests": requests,
        "miss_rate": {f"{s}/{experts}": {p: round(m / requests, 4) for p, m in row.items()}
                      for s, row in misses.items()},
        "misses": {f"{s}/{experts}": row for s, row in misses.items()},
        "seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d"),
        "commit": commit(), "machine": machine(),
        "command": shlex.join(["python", "bench/trace.py", *sys.argv[1:]]),
    }
    emit(result, args.out)


def _shown(path: str) -> str:
    """`path` relative to the repository when it is inside it."""
    root = Path(__file__).resolve().parents[1]
    full = Path(path).resolve()
    return str(full.relative_to(root)) if full.is_relative_to(root) else path


def _model_sizes(path: str) -> tuple[int, int]:
    from moe_edge.config import load_config
    config = load_config(Path(path))
    return config.num_experts, config.top_k


if __name__ == "__main__":
    main()

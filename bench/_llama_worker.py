"""One llama.cpp run for bench/memlimit.py, in its own process (and memory cgroup), without
torch or moe_edge imported, so the group's memory is llama.cpp's alone. Prints one JSON line.

    python bench/_llama_worker.py --gguf F.gguf --prompts P.json --new-tokens 48 --threads 2 [--no-repack]

mmap is on (llama.cpp's default): the weights are read from the file as pages are touched,
and the page cache they occupy is charged to the group. By default llama.cpp's CPU backend
repacks Q4_0 into its interleaved layout in anonymous memory at load (`use_extra_bufts`);
`--no-repack` turns that off so every weight stays a file-backed page.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from compare_llamacpp import llama_greedy, llama_open, memory  # bench/ is on sys.path


def _io() -> dict:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts", required=True, help='JSON {"prompt": [...], "warmup": [...]}')
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-repack", action="store_true")
    args = ap.parse_args()
    prompts = json.loads(Path(args.prompts).read_text())
    prompt, warmup = prompts["prompt"], prompts["warmup"]
    t0 = time.perf_counter()
    llm = llama_open(args.gguf, len(prompt) + args.new_tokens + 8, args.threads, mmap=True,
                     repack=not args.no_repack)
    load_s = time.perf_counter() - t0
    llama_greedy(llm, warmup, 8)
    io0: dict = {}
    tokens, p_s, d_s = llama_greedy(llm, prompt, args.new_tokens, lambda: io0.update(_io()))
    io1 = _io()
    print(json.dumps({
        "load_s": round(load_s, 1), "decode_tps": (len(tokens) - 1) / d_s, "prompt_tps": len(prompt) / p_s,
        "tokens": tokens, "storage_read_bytes": io1["read_bytes"] - io0["read_bytes"],
        "total_read_bytes": io1["read_bytes"], "rchar_bytes": io1["rchar"] - io0["rchar"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "repack": not args.no_repack, **memory()}))


if __name__ == "__main__":
    main()

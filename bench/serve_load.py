"""A bounded load test of `moe-edge serve` on loopback. Prints one JSON object.

    python bench/serve_load.py --out bench/results/serve_load.json
    python bench/serve_load.py --model moe_edge/demo/deepseek-moe-tiny-gptq

Starts `moe-edge serve` on a free 127.0.0.1 port, asks each distinct prompt alone (greedy,
one request at a time: the reference texts), then sends --requests requests from --clients
threads at once, mixed streaming and not, every --cancel-every-th a stream closed after two
chunks; a request answered 429 is sent again after a short pause. Checks: every accepted request that was not cancelled returns its prompt's reference
text; no error but 429 (the queue, --queue-size, is smaller than the clients); the server's
resident memory (RSS) before and after the run. Exits 1 when a check fails.

Default model: the demo before quantization in fp32, whose reused prefixes round exactly as
fresh prefills do; with int4 kernels and a bf16 KV cache a greedy near-tie can resolve
differently after reuse (counted as `mismatched`, see tests/test_prefix_reuse.py).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from _machine import commit, emit, machine  # bench/ is on sys.path when a script runs

FP_DEMO = "moe_edge/demo/deepseek-moe-tiny"
SYSTEM = "You answer questions about Python."
QUESTIONS = ["What is a list?", "What is a dict?", "How do I open a file?", "Explain generators.",
             "What does asyncio do?", "How do I sort a list?", "What is a tuple?", "What is a set?"]
RETRIES = 100
COMPLETIONS = ["def fibonacci(n):", "class Queue:", "import os\n", "The list type"]


def start_server(args) -> tuple[subprocess.Popen, str]:
    moe_edge = str(Path(sys.executable).parent / "moe-edge")
    cmd = [moe_edge, "serve", args.model, "--port", "0", "--queue-size", str(args.queue_size),
           "-c", "1024", *(["--dtype", args.dtype] if args.dtype else [])]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = [""]
    while "listening" not in lines[-1]:
        lines.append(proc.stderr.readline())
        if not lines[-1]:
            raise SystemExit(f"the server did not start: {' '.join(cmd)}\n{''.join(lines)}")
    line = lines[-1]
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain its log
    return proc, line.split()[1].removesuffix("/v1")


def prompts() -> list[tuple[str, dict]]:
    """(route, body) of each distinct request: chat turns sharing a system prompt, and completions."""
    chats = [("/v1/chat/completions", {"messages": [{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": q}]}) for q in QUESTIONS]
    return chats + [("/v1/completions", {"prompt": p}) for p in COMPLETIONS]


def ask(client: httpx.Client, route: str, body: dict, stream: bool, cancel: bool) -> tuple[int, str | None]:
    """(status, text); text None for a cancelled stream."""
    body = {**body, "temperature": 0, "max_tokens": ARGS.max_tokens, "stream": stream}
    if not stream:
        r = client.post(route, json=body)
        if r.status_code != 200:
            return r.status_code, r.text
        choice = r.json()["choices"][0]
        return 200, choice["message"]["content"] if "message" in choice else choice["text"]
    with client.stream("POST", route, json=body) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()
        text, chunks = [], 0
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks += 1
            if cancel and chunks == 2:
                return 200, None  # leaving the block closes the connection mid-stream
            choice = json.loads(line[6:])["choices"][0]
            text.append((choice["delta"].get("content") or "") if "delta" in choice else choice["text"])
        return 200, "".join(text)


def run_load(url: str, references: list[str]) -> dict:
    rng = random.Random(0)
    jobs = [(rng.randrange(len(references)), rng.random() < 0.5, i % ARGS.cancel_every == 0)
            for i in range(ARGS.requests)]
    jobs = [(p, stream or cancel, cancel) for p, stream, cancel in jobs]
    counts, mismatched, errors = Counter(), [], []
    lock, rng_pause = threading.Lock(), random.Random(1)
    specs = prompts()

    def one(job):
        p, stream, cancel = job
        with httpx.Client(base_url=url, timeout=300) as client:
            t0 = time.perf_counter()
            for _ in range(RETRIES):  # a 429 is retried after a pause, as a client would
                status, text = ask(client, *specs[p], stream, cancel)
                if status != 429:
                    break
                with lock:
                    counts["rejected_429"] += 1
                time.sleep(rng_pause.uniform(0.05, 0.3))
            seconds = time.perf_counter() - t0
        with lock:
            if status != 200:
                errors.append(f"{status}: {text[:200]}")
            elif cancel:
                counts["cancelled"] += 1
            else:
                counts["completed"] += 1
                counts["streamed" if stream else "whole"] += 1
                if text != references[p]:
                    mismatched.append({"prompt": p, "stream": stream, "got": text, "expected": references[p]})
            counts["seconds_total"] += seconds

    t0 = time.perf_counter()
    with ThreadPoolExecutor(ARGS.clients) as pool:
        list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    return {"wall_seconds": round(wall, 2), "counts": {k: v for k, v in counts.items() if k != "seconds_total"},
            "mean_request_seconds": round(counts["seconds_total"] / len(jobs), 3),
            "mismatched": mismatched, "errors": errors}


def wait_idle(url: str) -> dict:
    while (m := httpx.get(f"{url}/metrics").json())["requests"]["running"]:
        time.sleep(0.1)
    return m


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=FP_DEMO)
    ap.add_argument("--dtype", default=None, help="default: float32 for the fp demo, else the server's")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--queue-size", type=int, default=4)
    ap.add_argument("--cancel-every", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path)
    ARGS = args = ap.parse_args()
    args.dtype = args.dtype or ("float32" if args.model == FP_DEMO else None)
    proc, url = start_server(args)
    try:
        server = psutil.Process(proc.pid)
        with httpx.Client(base_url=url, timeout=300) as client:
            references = [ask(client, route, body, False, False)[1] for route, body in prompts()]
            again = [ask(client, route, body, True, False)[1] for route, body in prompts()]
        rss_before = server.memory_info().rss
        load = run_load(url, references)
        metrics = wait_idle(url)
        rss_after = server.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(30)
    ok = not load["mismatched"] and not load["errors"] and again == references
    out = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "machine": machine(),
           "command": "python " + " ".join(sys.argv), "model": args.model, "dtype": args.dtype,
           "requests": args.requests, "clients": args.clients, "queue_size": args.queue_size,
           "max_tokens": args.max_tokens, "references_stable": again == references, **load,
           "server_metrics": metrics, "rss_before_mib": round(rss_before / 2**20, 1),
           "rss_after_mib": round(rss_after / 2**20, 1), "ok": ok}
    emit(out, args.out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

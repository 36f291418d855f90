"""Time to first token of each turn of a scripted 10-turn conversation through
`moe-edge serve`, with prefix reuse and without. Prints one JSON object.

    python bench/serve_turns.py --out bench/results/serve_turns_demo.json
    python bench/serve_turns.py --model build/demo-16b-gptq --out bench/results/serve_turns_16b.json

The server runs in this process on a free 127.0.0.1 port; the openai client streams each
turn (greedy, --max-tokens) and takes the time to its first piece of text; the median of
--repeats conversations is reported per turn. With reuse the
conversation's KV cache stays from turn to turn; without, the server's PrefixCache is cleared
before the turn, so it prefills its whole history. Both send the same messages (the history
goes on with the reuse turn's reply), alternating turn by turn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import openai
import torch
from _machine import commit, emit, machine  # bench/ is on sys.path when a script runs

from moe_edge.api import load_auto
from moe_edge.hub import DEMO
from moe_edge.info import physical_cores
from moe_edge.serve import ServerThread, create_app

SYSTEM = "You are a helpful assistant who answers questions about Python."
TURNS = ["What is a list?", "How do I add an item to it?", "And remove one?", "What is a dict?",
         "How do I loop over its keys?", "What is a generator?", "When should I use one?",
         "What does yield do?", "How do I read a file line by line?", "Thanks. Summarise all of that."]


def turn(client, messages: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=max_tokens,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            first = first or time.perf_counter() - t0
            pieces.append(text)
    return {"ttft_s": round(first, 4), "total_s": round(time.perf_counter() - t0, 4),
            "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.prompt_tokens_details.cached_tokens,
            "text": "".join(pieces)}


def conversation(client, engine, max_tokens: int) -> dict:
    """Each turn with reuse (the cache as the previous turn left it), then the same messages
    with the cache cleared first; the history goes on with the reuse turn's reply."""
    engine.cache.clear()
    messages = [{"role": "system", "content": SYSTEM}]
    cached, fresh = [], []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        cached.append(turn(client, messages, max_tokens))
        engine.cache.clear()
        fresh.append(turn(client, messages, max_tokens))  # the whole history prefilled
        messages.append({"role": "assistant", "content": cached[-1]["text"]})
    return {"reuse": cached, "no_reuse": fresh,
            "same_replies": [a["text"] == b["text"] for a, b in zip(cached, fresh)]}


MODES = ("reuse", "no_reuse")


def ttft(runs: list[dict], mode: str) -> list[float]:
    """Each turn's median time to first token over the conversations."""
    return [statistics.median(r[mode][i]["ttft_s"] for r in runs) for i in range(len(TURNS))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO))
    ap.add_argument("--expert-cache", default="50%")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3, help="conversations; each turn's median is reported")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(physical_cores())
    lm = load_auto(args.model, device="cpu", expert_cache=args.expert_cache, context=args.ctx_size)
    app = create_app(lm, "m", args.ctx_size)
    running = ServerThread(app)
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0, timeout=600)
        turn(client, [{"role": "user", "content": "warm up"}], 4)
        runs = [conversation(client, app.state.engine, args.max_tokens) for _ in range(args.repeats)]
    finally:
        running.stop()
    out = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "machine": machine(),
           "command": "python " + " ".join(sys.argv), "model": args.model, "expert_cache": args.expert_cache,
           "max_tokens": args.max_tokens, "turns": len(TURNS),
           "repeats": args.repeats, "ttft_s": {mode: ttft(runs, mode) for mode in MODES},
           "prompt_tokens": [t["prompt_tokens"] for t in runs[0]["reuse"]],
           "cached_tokens": [t["cached_tokens"] for t in runs[0]["reuse"]],
           "turn_10_ttft_s": {mode: ttft(runs, mode)[-1] for mode in MODES},
           "same_replies": [all(r["same_replies"][i] for r in runs) for i in range(len(TURNS))]}
    emit(out, args.out)


if __name__ == "__main__":
    main()

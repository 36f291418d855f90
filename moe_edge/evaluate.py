"""Held-out perplexity: the quality number the demo model's data card and the quantizer's
tests report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

HELDOUT = Path(__file__).resolve().parent / "data" / "demo_heldout.jsonl"


def heldout_ids(tokenizer, path: str | Path = HELDOUT, max_tokens: int | None = None) -> torch.Tensor:
    """Documents of a JSONL file ({"text": ...} per line) as one token stream, EOS-separated."""
    ids: list[int] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids.extend(tokenizer(json.loads(line)["text"])["input_ids"])
            ids.append(tokenizer.eos_token_id)
    stream = torch.tensor(ids, dtype=torch.long)
    return stream[:max_tokens] if max_tokens else stream


@torch.no_grad()
def mean_nll(model, stream: torch.Tensor, seq_len: int = 256, batch: int = 8) -> float:
    """Mean next-token negative log-likelihood over non-overlapping windows of `stream`."""
    n = (len(stream) - 1) // seq_len
    if n == 0:
        raise ValueError(f"need more than {seq_len} tokens to evaluate, got {len(stream)}")
    x = stream[: n * seq_len].view(n, seq_len)
    y = stream[1: n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, batch):
        logits = model(x[i:i + batch].to(model.device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten().to(logits.device),
                                 reduction="sum").item()
    return total / (n * seq_len)


def perplexity(model, stream: torch.Tensor, seq_len: int = 256, batch: int = 8) -> float:
    return math.exp(mean_nll(model, stream, seq_len, batch))


@torch.inference_mode()
def forced_decode(model, ids, prompt_tokens: int) -> tuple[float, float]:
    """Prefill `ids[:prompt_tokens]`, then feed the rest one token per step through the KV
    cache, as decoding does, but following real text. -> (prefill seconds, decode seconds).

    Offload benchmarks use this instead of greedy generation: a small model's greedy output
    soon repeats itself, and a loop reuses the same experts (the demo's greedy continuation
    showed a 0.93 expert-cache hit rate at 50% where real text gives 0.63).
    """
    import time
    ids = torch.as_tensor(ids, device=model.device).reshape(1, -1)
    cache = model.new_cache(batch=1, capacity=ids.shape[1])
    t0 = time.perf_counter()
    model(ids[:, :prompt_tokens], cache, last_only=True)
    t1 = time.perf_counter()
    for i in range(prompt_tokens, ids.shape[1]):
        model(ids[:, i:i + 1], cache, last_only=True)
    return t1 - t0, time.perf_counter() - t1

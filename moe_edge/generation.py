"""Sampling, stop conditions and streaming text generation over a causal LM with a KV cache
kept from one generation to the next (PrefixCache)."""
# V=vocab

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import ConfigError
from .memory import trim_heap
from .tokenizer import IncrementalDetokenizer

# Prompts this long leave their temporaries (every token's activations, dequantised prefill
# weights) in glibc's heap: hand them back before decoding, for the memory a user budgets.
TRIM_AFTER_PROMPT = 64


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 is greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 turns it off)"),
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def with_(self, **changes) -> "SamplingParams":
        """A copy with some fields changed; None values are ignored."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def read_generation_config(folder: str | Path, eos_token_ids: Sequence[int] = ()) -> SamplingParams:
    """Defaults from the model's generation_config.json (greedy when do_sample is false)."""
    from .config import read_generation_json
    raw = read_generation_json(Path(folder) / "generation_config.json")  # fields typed, or one line naming them
    eos = raw.get("eos_token_id", list(eos_token_ids))
    eos = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()
    sampled = raw.get("do_sample", True)
    return SamplingParams(
        temperature=float(raw.get("temperature", 0.7)) if sampled else 0.0,
        top_k=int(raw.get("top_k") or 0) if sampled else 0,
        top_p=float(raw.get("top_p") or 1.0) if sampled else 1.0,
        min_p=float(raw.get("min_p") or 0.0) if sampled else 0.0,
        repetition_penalty=float(raw.get("repetition_penalty") or 1.0),
        max_new_tokens=int(raw.get("max_new_tokens") or 256),
        eos_token_ids=tuple(sorted(set(eos) | set(eos_token_ids))),
    )


def sample(logits: torch.Tensor, params: SamplingParams, history: Sequence[int] | torch.Tensor,
           generator: torch.Generator | None) -> int:
    """One token from logits [V]: repetition penalty (over the ids in `history`), temperature,
    top-k, top-p, min-p (the order transformers applies them)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and len(history):
        history = torch.as_tensor(history, dtype=torch.long)
        seen = logits[history]
        logits[history] = torch.where(seen > 0, seen / params.repetition_penalty,
                                      seen * params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens ranked before it already reach top_p
        drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= params.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    prompt_seconds: float
    decode_seconds: float
    finish_reason: str  # "eos", "stop" (a stop string), "length" or "interrupted"
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the PrefixCache
    extra: dict = field(default_factory=dict)

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens run through the model per second (the cached ones were not)."""
        fed = self.prompt_tokens - self.cached_tokens
        return fed / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes from the prefill; decode rate counts the steps after it
        steps = max(0, self.generated_tokens - 1)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(prompt_tps=self.prompt_tps, decode_tps=self.decode_tps)
        return d


class PrefixCache:
    """A KV cache kept from one generation to the next, with the tokens it holds.

    A prompt that starts with cached tokens prefills only the rest: the longest common
    prefix is kept and the cache cut where the two diverge, so a conversation's next turn
    (or a server's next request with the same system prompt) runs only its new tokens, and
    a history edited anywhere (/clear, dropped exchanges) is recomputed from the first token
    that changed. The last prompt token is always fed again when the whole prompt is cached
    (its logits are not kept). One generation at a time: not for concurrent use.

    >>> cache = PrefixCache(lm.model)
    >>> logits, reused = cache.prefill(prompt_ids)   # [V] after the last prompt token
    >>> logits = cache.step(token)                   # one decode step
    """

    def __init__(self, model, context: int | None = None):
        self.model = model
        self.context = context or model.config.max_position_embeddings
        self.kv = None  # allocated by the first prefill, grown by reserve
        self.ids: list[int] = []  # the tokens whose keys and values kv holds, in order

    def clear(self) -> None:
        """Forget the cached tokens (the memory stays for the next prefill)."""
        self.ids = []
        if self.kv is not None:
            self.kv.truncate(0)

    def common_prefix(self, prompt_ids: Sequence[int]) -> int:
        """How many of `prompt_ids` a prefill would take from the cache."""
        n, limit = 0, min(len(self.ids), len(prompt_ids) - 1)  # the last token is always fed
        while n < limit and self.ids[n] == prompt_ids[n]:
            n += 1
        return n

    def prefill(self, prompt_ids: Sequence[int], extra: int = 0) -> tuple[torch.Tensor, int]:
        """(logits [V] after the last prompt token, prompt tokens reused from the cache); the
        cache then has room for `extra` more positions, so decoding allocates nothing."""
        reused = self.common_prefix(prompt_ids)
        if self.kv is None:
            self.kv = self.model.new_cache(batch=1, capacity=len(prompt_ids) + extra)
            self.kv.limit = self.context
        self.ids = self.ids[:reused]
        self.kv.truncate(reused)  # also drops positions of a step that failed halfway
        self.kv.reserve(len(prompt_ids) + extra)
        return self._feed(list(prompt_ids[reused:])), reused

    def step(self, token: int) -> torch.Tensor:
        """Logits [V] after feeding one more token."""
        return self._feed([token])

    def _feed(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        logits = self.model(x, self.kv, last_only=True)[0, -1].cpu()  # [V]
        self.ids.extend(ids)  # only once the model has run: a failed step leaves no trace
        return logits


def generate_ids(model, prompt_ids: Sequence[int], params: SamplingParams,
                 context: int | None = None, timings: dict | None = None,
                 cache: PrefixCache | None = None) -> Iterator[int]:
    """Yields new token ids, one per step, until EOS, max_new_tokens or a full context.

    Prefill runs the prompt once (only the part `cache` does not hold already; a fresh cache
    when none is given); each further step feeds one token through the cache. The last token
    yielded is never fed, so it is not in the cache.
    """
    cache = cache if cache is not None else PrefixCache(model, context)
    context = min(context or cache.context, cache.context)
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= context:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the context holds {context}; "
                         "shorten it or raise the context size")
    budget = min(params.max_new_tokens, context - len(prompt_ids))
    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    history = list(prompt_ids)  # a tensor only where a repetition penalty needs one
    timings = timings if timings is not None else {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        for step in range(budget):
            if step == 0:
                logits, timings["cached_tokens"] = cache.prefill(prompt_ids, budget)
                if len(prompt_ids) - timings["cached_tokens"] >= TRIM_AFTER_PROMPT:
                    trim_heap()  # the prompt's temporaries: 0.8 GiB on the 16B shape at 512 tokens, 30-45 ms
            else:
                logits = cache.step(token)
            token = sample(logits, params, history, generator)
            timings["prompt_seconds" if step == 0 else "decode_seconds"] = time.perf_counter() - t0
            if step == 0:
                t0 = time.perf_counter()
            history.append(token)
            yield token
            if token in params.eos_token_ids:
                return


class TextStream:
    """Iterate for text pieces as they are generated; `.result` holds the summary afterwards.

    >>> stream = TextStream(model, tokenizer, prompt_ids, params)
    >>> for piece in stream: print(piece, end="", flush=True)
    >>> stream.result.decode_tps

    `cache`: a PrefixCache to prefill from and leave the conversation in (default: a fresh
    one). `cancel`: an event (threading.Event) another thread sets to stop at the next token.
    """

    def __init__(self, model, tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 context: int | None = None, cache: PrefixCache | None = None, cancel=None):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prompt_ids, self.context = list(prompt_ids), context
        self.cache, self.cancel = cache, cancel
        self.result: GenerationResult | None = None
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._iter

    def __next__(self) -> str:
        return next(self._iter)

    def close(self) -> None:
        """Stop early (e.g. Ctrl-C); the result keeps what was generated."""
        self._iter.close()

    def _run(self) -> Iterator[str]:
        detok, timings = IncrementalDetokenizer(self.tokenizer), {}
        tokens: list[int] = []
        text, emitted, reason = "", 0, "length"
        try:
            for token in generate_ids(self.model, self.prompt_ids, self.params, self.context,
                                      timings, self.cache):
                if self.cancel is not None and self.cancel.is_set():
                    reason, text = "interrupted", text[:emitted]
                    break
                tokens.append(token)
                if token in self.params.eos_token_ids:
                    reason = "eos"
                    break
                text += detok.add(token)
                cut = _find_stop(text, self.params.stop)
                if cut is not None:
                    text, reason = text[:cut], "stop"
                    break
                safe = len(text) - _held_back(text, self.params.stop)
                if safe > emitted:
                    piece, emitted = text[emitted:safe], safe  # counted before the consumer sees it
                    yield piece
            if reason not in ("stop", "interrupted"):
                text += detok.flush()
            if emitted < len(text):
                piece, emitted = text[emitted:], len(text)
                yield piece
        except (GeneratorExit, KeyboardInterrupt):  # closed early, or Ctrl-C inside the model
            reason = "interrupted"
            text = text[:emitted]
            raise
        finally:
            self.result = GenerationResult(
                text=text, token_ids=tokens, prompt_tokens=len(self.prompt_ids),
                generated_tokens=len(tokens), prompt_seconds=timings.get("prompt_seconds", 0.0),
                decode_seconds=timings.get("decode_seconds", 0.0), finish_reason=reason,
                cached_tokens=timings.get("cached_tokens", 0))


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best

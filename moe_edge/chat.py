"""A conversation with a loaded model: history, settings, context fitting, transcripts.

The library side of `moe-edge chat`; it never prints (the REPL in cli_chat.py does).

>>> session = ChatSession(lm, system="You are terse.")
>>> reply = session.ask("What is a mixture of experts?")
>>> for piece in reply: print(piece, end="")
>>> reply.result.decode_tps
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, MoeEdgeError
from .generation import GenerationResult, PrefixCache, SamplingParams, TextStream
from .tokenizer import format_chat

# /set NAME -> (SamplingParams field, parser); "system" is handled apart.
SETTINGS = {"temp": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
            "min_p": ("min_p", float), "max_tokens": ("max_new_tokens", int), "seed": ("seed", int)}


class Reply:
    """The streamed answer to one turn; iterate for text pieces. When the iteration ends,
    is closed, or is interrupted (Ctrl-C), the text so far joins the history."""

    def __init__(self, session: "ChatSession", prompt_ids: list[int], dropped_turns: int):
        self.session, self.dropped_turns = session, dropped_turns
        lm = session.lm
        self.stream = TextStream(lm.model, lm.tokenizer, prompt_ids, session.params, session.context,
                                 session.cache)
        self.result: GenerationResult | None = None
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._iter

    def close(self) -> None:
        self._iter.close()

    def _run(self) -> Iterator[str]:
        try:
            yield from self.stream
        finally:
            self.stream.close()
            self.result = self.stream.result
            self.session.messages.append({"role": "assistant", "content": self.result.text})


class ChatSession:
    """History (system prompt apart), sampling settings, a context budget, and the
    conversation's KV cache: each turn prefills only what the previous one did not leave in
    `cache` (a PrefixCache cuts itself where a prompt diverges, so /clear, a new system
    prompt or dropped exchanges need nothing more than the next prompt)."""

    def __init__(self, lm, system: str | None = None, context: int | None = None,
                 params: SamplingParams | None = None, cache: PrefixCache | None = None):
        self.lm, self.system = lm, system
        self.params = params or lm.defaults
        limit = lm.config.max_position_embeddings
        self.context = min(context or limit, limit)
        self.cache = cache if cache is not None else PrefixCache(lm.model, self.context)
        self.messages: list[dict] = []  # user and assistant turns, alternating

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def ask(self, text: str) -> Reply:
        """Start the reply to `text`; oldest turns are dropped when the history outgrows
        the context (`reply.dropped_turns` says how many)."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids, dropped = self._fit()
        except MoeEdgeError:
            self.messages.pop()
            raise
        return Reply(self, ids, dropped)

    def regenerate(self) -> Reply:
        """A new answer to the last message (the previous answer is discarded)."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ConfigError("nothing to regenerate yet; send a message first")
        self.messages.pop()
        return self.ask(self.messages.pop()["content"])

    def clear(self) -> None:
        """Forget the conversation; the system prompt and settings stay."""
        self.messages.clear()

    def set(self, name: str, value: str) -> None:
        """/set NAME VALUE, validated: temp, top_p, top_k, min_p, max_tokens, seed, system."""
        if name == "system":
            self.system = value or None
            return
        if name not in SETTINGS:
            raise ConfigError(f"unknown setting {name!r}; use one of {', '.join([*SETTINGS, 'system'])}")
        field, parse = SETTINGS[name]
        try:
            parsed = parse(value)
        except ValueError:
            raise ConfigError(f"{name} needs a{'n integer' if parse is int else ' number'}, "
                              f"not {value!r}") from None
        self.params = self.params.with_(**{field: parsed})  # validates, e.g. temp >= 0

    def settings(self) -> dict:
        return {"system": self.system, "context": self.context,
                **{name: getattr(self.params, field) for name, (field, _) in SETTINGS.items()},
                "repetition_penalty": self.params.repetition_penalty}

    def save(self, file: str | Path, overwrite: bool = False) -> Path:
        """The transcript and settings as JSON; an existing file only with `overwrite`."""
        file = Path(file).expanduser()
        doc = {"model": str(self.lm.path), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "settings": self.settings(), "messages": self.conversation()}
        try:
            with file.open("w" if overwrite else "x", encoding="utf-8") as f:  # x: never clobber
                f.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        except FileExistsError:
            raise MoeEdgeError(f"{file} exists; pick another name, or /save! {file} to "
                               "overwrite it") from None
        except OSError as e:
            raise MoeEdgeError(f"{file}: cannot write the transcript ({e.strerror})") from None
        return file

    def _fit(self) -> tuple[list[int], int]:
        dropped = 0
        while True:
            ids = format_chat(self.lm.tokenizer, self.conversation())
            room = self.context - len(ids)
            if room >= min(self.params.max_new_tokens, self.context // 4) or len(self.messages) <= 1:
                break
            del self.messages[:2]  # the oldest user turn and its answer
            dropped += 1
        if room < 1:
            raise ConfigError(f"this message is {len(ids)} tokens with the system prompt, but the "
                              f"context holds {self.context}; shorten it or raise --ctx-size")
        return ids, dropped


"""Tokenizers from the model folder, chat formatting, and incremental detokenisation."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .chat_template import render_chat
from .errors import ChatTemplateError, CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


def load_tokenizer(folder: str | Path):
    """transformers' AutoTokenizer from local files only; never runs code from the folder."""
    folder = Path(folder)
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no tokenizer files (tokenizer.json or tokenizer.model); "
                              "copy them from the original model folder")
    from transformers import AutoTokenizer
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # it warns about model types it has no class for (deepseek)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                             trust_remote_code=False)
    except Exception as e:  # untrusted files fail transformers in many ways: one line each
        raise CheckpointError(_tokenizer_failure(folder, e)) from None
    finally:
        logging.set_verbosity(level)


def _tokenizer_failure(folder: Path, e: Exception) -> str:
    """Our own line for a tokenizer that will not load; never transformers' advice to pass
    trust_remote_code=True (moe-edge never runs code from a checkpoint)."""
    if "trust_remote_code" in str(e) or "custom code" in str(e):
        return (f"{folder}: tokenizer_config.json names a custom tokenizer class whose code ships "
                "with the checkpoint; moe-edge never runs checkpoint code - use a checkpoint "
                "with a standard tokenizer.json")
    first = (str(e).splitlines() or [""])[0][:300]
    return f"{folder}: the tokenizer cannot be loaded ({type(e).__name__}: {first})"


def format_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation, via the tokenizer's chat template (rendered in a bounded
    worker process: see chat_template.py).

    Without a template, DeepSeek-MoE-chat's format: BOS, system text, then
    `User: ...\\n\\n` and `Assistant: ...<eos>` turns, ending in `Assistant:`.
    """
    if getattr(tokenizer, "chat_template", None):
        text = render_chat(_template_of(tokenizer), list(messages), add_generation_prompt,
                           tokenizer.special_tokens_map, source=tokenizer.name_or_path or "tokenizer")
    else:
        text = deepseek_chat_text(tokenizer, messages, add_generation_prompt)
    # The template already wrote BOS; encoding with special tokens would add a second one.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _template_of(tokenizer) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError as e:  # several named templates and no default
        raise ChatTemplateError(f"{tokenizer.name_or_path}: {str(e).splitlines()[0]}") from None


def deepseek_chat_text(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    parts = [tokenizer.bos_token or ""]
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            parts.append(content + "\n\n")
        elif role == "user":
            parts.append(f"User: {content}\n\n")
        elif role == "assistant":
            parts.append(f"Assistant: {content}{tokenizer.eos_token or ''}")
        else:
            raise ValueError(f"unknown chat role {role!r}; use system, user or assistant")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character.

    Decodes a short window (the previous piece's tokens plus the new ones) and emits the text
    the new tokens added; while the window ends in an incomplete character it waits. The
    window also keeps tokenizers that strip a leading space at the start of a decode honest.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens before this were already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]

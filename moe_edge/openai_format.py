"""OpenAI's request and response formats for `moe-edge serve`: validation of
/v1/chat/completions and /v1/completions bodies into token ids and SamplingParams, the
error body, and the completion objects and stream chunks built from a GenerationResult.

Pure functions of their inputs (no model, no HTTP), so serve.py only routes.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from .errors import ConfigError, MoeEdgeError
from .generation import GenerationResult, SamplingParams
from .tokenizer import format_chat

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # as OpenAI's API


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Request:
    """A validated completion request."""

    chat: bool  # /v1/chat/completions (else /v1/completions)
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


# --- fields ----------------------------------------------------------------------------------

TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
              list: "an array", dict: "an object"}


def _get(body: dict, name: str, kinds: tuple, param: str | None = None):
    """body[name] if it is one of `kinds` (None when absent or null), else a 422 naming it."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        wanted = " or ".join(TYPE_NAMES[k] for k in kinds if k in TYPE_NAMES)
        raise ApiError(422, f"'{param or name}' must be {wanted}, not {type(value).__name__}",
                       param=param or name, code="invalid_type")
    return value


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ApiError(400, message, param=param, code="invalid_value")


def _stops(body: dict) -> tuple[str, ...]:
    stop = _get(body, "stop", (str, list))
    stops = [stop] if isinstance(stop, str) else stop or []
    for i, s in enumerate(stops):
        _check(isinstance(s, str), f"stop[{i}]", f"'stop[{i}]' must be a string")
    _check(len(stops) <= MAX_STOPS, "stop", f"'stop' takes at most {MAX_STOPS} strings")
    return tuple(s for s in stops if s)


def _unsupported(body: dict) -> None:
    """Features this server does not have, refused rather than ignored."""
    n = _get(body, "n", (int,))
    _check(n in (None, 1), "n", "only 'n': 1 is supported (one choice per request)")
    for name in ("frequency_penalty", "presence_penalty"):
        _check(not _get(body, name, (int, float)), name, f"'{name}' is not supported; leave it 0")
    for name in ("tools", "functions", "logprobs", "echo", "suffix"):
        _check(not body.get(name), name, f"'{name}' is not supported by moe-edge serve")


def sampling(body: dict, defaults: SamplingParams) -> SamplingParams:
    """SamplingParams from OpenAI's fields; what a request leaves out, the model's defaults."""
    _unsupported(body)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, (int,))
    _check(max_tokens is None or max_tokens >= 1, name, f"'{name}' must be >= 1")
    temperature = _get(body, "temperature", (int, float))
    _check(temperature is None or 0 <= temperature <= 2, "temperature", "'temperature' must be in [0, 2]")
    top_p = _get(body, "top_p", (int, float))
    _check(top_p is None or 0 < top_p <= 1, "top_p", "'top_p' must be in (0, 1]")
    changes = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                   seed=_get(body, "seed", (int,)), stop=_stops(body))
    try:
        return defaults.with_(**changes)
    except ConfigError as e:
        raise ApiError(400, str(e), code="invalid_value") from None


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = bool(_get(body, "stream", (bool,)))
    options = _get(body, "stream_options", (dict,)) or {}
    usage = _get(options, "include_usage", (bool,), "stream_options.include_usage")
    return stream, bool(usage)


# --- prompts ---------------------------------------------------------------------------------

def _content(message: dict, i: int) -> str:
    """A message's text: a string, or an array of text parts."""
    content = _get(message, "content", (str, list), f"messages[{i}].content")
    _check(content is not None, f"messages[{i}].content", f"'messages[{i}].content' is missing")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        _check(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str),
               where, f"'{where}' must be a text part ({{\"type\": \"text\", \"text\": ...}})")
        texts.append(part["text"])
    return "".join(texts)


def messages(body: dict) -> list[dict]:
    raw = _get(body, "messages", (list,))
    _check(raw is not None, "messages", "'messages' is required")
    _check(len(raw) > 0, "messages", "'messages' must not be empty")
    out = []
    for i, m in enumerate(raw):
        _check(isinstance(m, dict), f"messages[{i}]", f"'messages[{i}]' must be an object")
        role = _get(m, "role", (str,), f"messages[{i}].role")
        _check(role in ROLES, f"messages[{i}].role",
               f"'messages[{i}].role' must be one of {', '.join(ROLES)}, not {role!r}")
        out.append({"role": ROLES[role], "content": _content(m, i)})
    return out


def prompt_ids(body: dict, tokenizer) -> list[int]:
    """/v1/completions' prompt: a string, an array holding one string, or token ids."""
    prompt = _get(body, "prompt", (str, list))
    _check(prompt is not None, "prompt", "'prompt' is required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    vocab = len(tokenizer)
    _check(all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt),
           "prompt", f"'prompt' must be a string or an array of token ids in [0, {vocab})")
    return list(prompt)


def _chat_ids(tokenizer, conversation: list[dict]) -> list[int]:
    try:
        return format_chat(tokenizer, conversation)
    except MoeEdgeError as e:  # the template refused these messages, or ran past its bounds
        raise ApiError(400, f"the chat template failed on these messages: {e}", param="messages",
                       code="chat_template_error") from None


def read_request(body: dict, chat: bool, tokenizer, defaults: SamplingParams, context: int) -> Request:
    """The validated request, its prompt tokenized (with the chat template for chat)."""
    _get(body, "model", (str,))
    params = sampling(body, defaults)
    stream, include_usage = _stream_options(body)
    ids = _chat_ids(tokenizer, messages(body)) if chat else prompt_ids(body, tokenizer)
    _check(len(ids) > 0, "prompt", "the prompt is empty")
    if len(ids) >= context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens but the context holds {context} "
                       "(with room for at least one new token); shorten it or start the server "
                       "with a larger --ctx-size", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    return Request(chat, ids, params, stream, include_usage)


# --- responses -------------------------------------------------------------------------------

def finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"  # eos or a stop string


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
            "total_tokens": result.prompt_tokens + result.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def _head(req: Request, model: str, chunk: bool) -> dict:
    kind = ("chat.completion" if req.chat else "text_completion") + (".chunk" if chunk and req.chat else "")
    return {"id": ("chatcmpl-" if req.chat else "cmpl-") + req.id, "object": kind,
            "created": req.created, "model": model}


def completion(req: Request, model: str, result: GenerationResult) -> dict:
    """The whole answer, for a request without `stream`."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "logprobs": None, "finish_reason": finish_reason(result)}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish_reason(result)}
    return {**_head(req, model, False), "choices": [choice], "usage": usage(result)}


def chunk(req: Request, model: str, text: str | None = None, result: GenerationResult | None = None,
          first: bool = False) -> dict:
    """One stream chunk: a piece of text, or (with `result`) the end of the choice."""
    reason = finish_reason(result) if result is not None else None
    if req.chat:
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    out = {**_head(req, model, True), "choices": [choice]}
    return {**out, "usage": None} if req.include_usage else out


def usage_chunk(req: Request, model: str, result: GenerationResult) -> dict:
    """The last chunk with stream_options.include_usage: no choices, the usage."""
    return {**_head(req, model, True), "choices": [], "usage": usage(result)}


def sse(obj: dict | str) -> str:
    """A server-sent event carrying `obj` as JSON (or the literal [DONE])."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"

"""Chat templates rendered in a worker process, under a time, a memory and an output bound.

A chat template comes with the checkpoint, so it is untrusted code. Jinja's sandbox (which
transformers renders in) stops attribute tricks, but not a template that loops for ever or
one that builds a huge string in C (`'x' * 10**10`, `'%*s' % (10**10, '')`), where no check
in Python can interrupt it. A separate process can be bounded by the OS whatever the
template does: an address-space limit (RLIMIT_AS) for memory, a kill after `timeout`
seconds for time. One worker serves every render of a process: it starts on the first
(~1.5 s, importing transformers' renderer, not counted against the timeout), then a
render costs a pipe round trip; a worker killed for time is replaced on the next render.
The worker renders with transformers' own `render_jinja_template`, so the text is what
`tokenizer.apply_chat_template` gives.

>>> render_chat(template, [{"role": "user", "content": "hi"}], True, {"bos_token": "<s>"})
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

from .errors import ChatTemplateError

TIMEOUT_S = 5.0  # a real template renders in milliseconds
MAX_CHARS = 4_000_000  # far beyond any context window
MEMORY_BYTES = 1 << 30  # address space the worker may map beyond what its imports took
START_TIMEOUT_S = 120.0


class TemplateWorker:
    """A child process that renders chat templates, one request at a time."""

    def __init__(self, timeout: float = TIMEOUT_S, max_chars: int = MAX_CHARS,
                 memory: int = MEMORY_BYTES):
        self.timeout, self.max_chars, self.memory = timeout, max_chars, memory
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.lock = threading.Lock()

    def render(self, template: str, messages: list, add_generation_prompt: bool,
               variables: dict, source: str) -> str:
        request = {"template": template, "messages": messages, "variables": variables,
                   "add_generation_prompt": add_generation_prompt, "max_chars": self.max_chars}
        try:
            line = json.dumps(request) + "\n"
        except (TypeError, ValueError) as e:
            raise ChatTemplateError(f"{source}: chat messages must be JSON data ({e})") from None
        with self.lock:
            self._send(line, source)
            reply = self._reply(self.timeout)
        if reply is None:
            raise ChatTemplateError(f"{source}: the chat template did not finish within "
                                    f"{self.timeout:g} s (a loop that never ends?); fix or remove it")
        if "error" in reply:
            raise ChatTemplateError(f"{source}: {_explain(reply, self)}")
        return reply["text"]

    def _send(self, line: str, source: str) -> None:
        for attempt in range(2):  # a worker that died since the last render is replaced once
            if self.proc is None or self.proc.poll() is not None:
                self._start(source)
            try:
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
                return
            except OSError:
                self.close()
                if attempt:
                    raise ChatTemplateError(f"{source}: the chat template worker exited; run "
                                            "again with -v for details") from None

    def _start(self, source: str) -> None:
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                              os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "moe_edge.chat_template", str(self.memory)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     text=True, encoding="ascii",  # JSON lines, ASCII-escaped
                                     start_new_session=os.name == "posix")  # no terminal Ctrl-C
        self.lines = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        if self._reply(START_TIMEOUT_S) != {"ready": True}:
            raise ChatTemplateError(f"{source}: the chat template worker did not start (exit "
                                    f"status {self.proc.poll()}); run again with -v for details")

    def _reply(self, timeout: float) -> dict | None:
        """The worker's next line, or None (and the worker killed) after `timeout` seconds."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = None
        if line is None:  # out of time, or the worker died
            self.close()
            return None
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # end of stream: the worker exited


def _explain(reply: dict, worker: TemplateWorker) -> str:
    kind = reply["error"]
    if kind == "too_long":
        return (f"the chat template wrote more than {worker.max_chars:,} characters; fix or "
                "remove it")
    if kind == "memory":
        return (f"the chat template needed more than {worker.memory / 2**20:.0f} MiB of memory; "
                "fix or remove it")
    return f"the chat template failed ({reply['message']})"


_WORKER = TemplateWorker()


def render_chat(template: str, messages: list, add_generation_prompt: bool, variables: dict,
                source: str = "chat template") -> str:
    """`template` rendered for `messages` (plus `variables`: the special tokens) by the
    shared worker; a ChatTemplateError past the time, memory or output bound."""
    return _WORKER.render(template, list(messages), add_generation_prompt, variables, source)


# --- the worker process ------------------------------------------------------------------

def _limit_memory(extra: int) -> None:
    import resource
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, hard))


def _render(request: dict) -> dict:
    from transformers.utils.chat_template_utils import render_jinja_template
    try:
        rendered, _ = render_jinja_template(
            conversations=[request["messages"]], chat_template=request["template"],
            add_generation_prompt=request["add_generation_prompt"], **request["variables"])
    except MemoryError:
        return {"error": "memory"}
    except Exception as e:  # the template's own error (raise_exception, syntax): reported
        first = (str(e).splitlines() or [""])[0][:300]
        return {"error": "template", "message": f"{type(e).__name__}: {first}"}
    text = rendered[0]
    return {"error": "too_long"} if len(text) > request["max_chars"] else {"text": text}


def _serve(memory: int) -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C stops its reply, not us
    import transformers.utils.chat_template_utils  # noqa: F401  (imported before the limit)
    if os.path.exists("/proc/self/statm"):
        _limit_memory(memory)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            reply = _render(json.loads(line))
        except MemoryError:
            reply = {"error": "memory"}
        try:
            out = json.dumps(reply)
        except MemoryError:
            out = json.dumps({"error": "memory"})
        print(out, flush=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))

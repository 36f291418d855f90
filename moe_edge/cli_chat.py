"""The interactive loop of `moe-edge chat`: read a turn, run a slash command or stream a reply.

Conventions of `ollama run` and `llama-cli`: `>>> ` prompt, `\"\"\"` for multi-line input,
Ctrl-C stops a reply and returns to the prompt, Ctrl-D (or /bye) leaves.
"""

from __future__ import annotations

import click

from . import cli_ui
from .chat import ChatSession, Reply
from .errors import MoeEdgeError
from .memory import peak_memory

PROMPT, MORE = ">>> ", "... "
QUOTE = '"""'


def err(text: str = "") -> None:
    click.echo(text, err=True)


class Repl:
    def __init__(self, session: ChatSession, info, stats: bool):
        self.session, self.info, self.stats = session, info, stats
        self.lm = session.lm

    def run(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        while True:
            try:
                text = self.read()
            except KeyboardInterrupt:
                err("\nUse Ctrl-D or /bye to exit.")
                continue
            except UnicodeDecodeError:
                err("That line was not UTF-8; type it again.")
                continue
            except EOFError:
                err()
                return
            if not text.strip():
                continue
            if text.startswith("/"):
                if self.command(text) == "exit":
                    return
                continue
            self.answer(lambda: self.session.ask(text))

    def read(self) -> str:
        line = input(PROMPT)
        if not line.lstrip().startswith(QUOTE):
            return line
        lines = [line.lstrip()[len(QUOTE):]]
        while not (lines[-1].rstrip().endswith(QUOTE) and (len(lines) > 1 or lines[0].strip() != "")):
            lines.append(input(MORE))
        lines[-1] = lines[-1].rstrip()[:-len(QUOTE)]
        return "\n".join(lines).strip("\n")

    def answer(self, start) -> None:
        try:
            reply: Reply = start()
        except MoeEdgeError as e:
            err(f"error: {e}")
            return
        if reply.dropped_turns:
            err(f"(dropped the {reply.dropped_turns} oldest exchange(s) to fit the "
                f"{self.session.context}-token context)")
        self.lm.reset_offload_stats()
        try:
            for piece in reply:
                click.echo(piece, nl=False)
            click.echo()
        except KeyboardInterrupt:
            reply.close()
            click.echo()
            err("[stopped]")
        if self.stats and reply.result is not None:
            err(cli_ui.turn_stats(reply.result, self.lm.offload_stats(), peak_memory(self.lm.model.device)))

    def command(self, text: str) -> str | None:
        name, _, arg = text[1:].strip().partition(" ")
        arg = arg.strip()
        try:
            return self._dispatch(name.lower(), arg)
        except MoeEdgeError as e:
            err(f"error: {e}")
            return None

    def _dispatch(self, name: str, arg: str) -> str | None:
        if name in ("bye", "exit", "quit"):
            return "exit"
        if name in ("help", "?"):
            err(cli_ui.CHAT_HELP)
        elif name == "clear":
            self.session.clear()
            err("(conversation cleared" + (", system prompt kept)" if self.session.system else ")"))
        elif name == "regen":
            self.answer(self.session.regenerate)
        elif name == "set":
            self._set(arg)
        elif name == "show":
            self._show(arg)
        elif name in ("save", "save!"):
            if not arg:
                err(f"usage: /{name} FILE")
            else:
                err(f"(saved to {self.session.save(arg, overwrite=name == 'save!')})")
        else:
            err(f"unknown command /{name}; type /? for the list")
        return None

    def _set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        if not key or (not value.strip() and key != "system"):
            err("usage: /set temp|top_p|top_k|min_p|max_tokens|seed VALUE, or /set system TEXT")
            return
        self.session.set(key, value.strip())
        shown = self.session.settings()[key] if key != "system" else (self.session.system or "(none)")
        err(f"({key} = {shown})")

    def _show(self, what: str) -> None:
        if what == "settings":
            err(cli_ui.settings_text(self.session.settings()))
        elif what == "model":
            err("\n".join(cli_ui.model_lines(self.info, self.lm.model.quant_kernels)))
        elif what == "cache":
            err(cli_ui.cache_text(self.lm))
        else:
            err("usage: /show settings|model|cache")

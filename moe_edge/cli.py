"""The `moe-edge` command: a thin shell over the library (parse, call, render).

Heavy imports (torch, transformers) happen inside commands so that --help is instant.
Model text goes to stdout; stats and errors to stderr.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import MoeEdgeError


class _Group(click.Group):
    """Prints project errors as one line (the traceback only with -v/--verbose)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MoeEdgeError as e:
            if ctx.params.get("verbose"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moe-edge")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
def main(verbose: bool) -> None:
    """Run Mixture-of-Experts language models where they do not fit."""


@main.command()
@click.argument("model", type=click.Path())
@click.option("-p", "--prompt", required=True, help="Prompt text, or - to read stdin.")
@click.option("--raw", is_flag=True, help="Complete the text as is, without the chat template.")
@click.option("-n", "--max-tokens", type=int, default=None, help="Most new tokens.")
@click.option("--temp", type=float, default=None, help="Temperature; 0 is greedy.")
@click.option("--top-p", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--min-p", type=float, default=None)
@click.option("-s", "--seed", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print text and stats as JSON.")
def generate(model, prompt, raw, max_tokens, temp, top_p, top_k, min_p, seed, device, dtype, as_json):
    """One-shot completion of PROMPT with MODEL (a checkpoint folder)."""
    from .api import load
    text = sys.stdin.read() if prompt == "-" else prompt
    lm = load(model, device=device, dtype=dtype)
    sampling = dict(max_new_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k,
                    min_p=min_p, seed=seed)
    ids = lm.encode(text) if raw else None
    stream = lm.stream(ids, **sampling) if raw else lm.chat_stream(
        [{"role": "user", "content": text}], **sampling)
    for piece in stream:
        if not as_json:
            click.echo(piece, nl=False)
    result = stream.result
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo()
        click.echo(f"[{result.prompt_tokens} prompt tokens, {result.prompt_tps:.1f} tok/s | "
                   f"{result.generated_tokens} generated, {result.decode_tps:.1f} tok/s]", err=True)

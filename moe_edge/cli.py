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


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--out", type=click.Path(), default=None,
              help="Output folder [default: <model>-gptq-w4g128 beside MODEL].")
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True, help="-1: per channel.")
@click.option("--sym/--asym", default=True, show_default=True)
@click.option("--act-order/--no-act-order", default=True, show_default=True)
@click.option("--damp", type=float, default=0.01, show_default=True)
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True)
@click.option("--calib", type=click.Path(), default=None, help="Text or JSONL (a 'text' field per line).")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--calib-seq-len", type=int, default=512, show_default=True)
@click.option("--min-expert-tokens", type=int, default=128, show_default=True,
              help="Experts routed fewer calibration tokens use the fallback.")
@click.option("--expert-fallback", type=click.Choice(["all-tokens", "rtn"]), default="all-tokens",
              show_default=True, help="all-tokens: calibrate on every token of the layer.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the plan and projected size only.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or summary as JSON.")
def quantize(model, out, bits, group_size, sym, act_order, damp, method, calib, calib_samples,
             calib_seq_len, min_expert_tokens, expert_fallback, seed, device, dry_run, overwrite,
             resume, as_json):
    """GPTQ 4-bit conversion of MODEL (a Hugging Face checkpoint folder), one layer at a time."""
    from .quant import quantizer as q
    options = q.QuantizeOptions(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                                damp=damp, method=method, calib=calib, calib_samples=calib_samples,
                                calib_seq_len=calib_seq_len, min_expert_tokens=min_expert_tokens,
                                expert_fallback=expert_fallback, seed=seed, device=device)
    if dry_run:
        _render_plan(q.plan(model, out, options), as_json)
        return
    with _layer_progress() as progress:
        try:
            result = q.quantize(model, out, options, overwrite=overwrite, resume=resume,
                                progress=progress)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; run the same command with --resume to continue", err=True)
            sys.exit(130)
    _render_summary(result, as_json)


class _layer_progress:
    """A tqdm bar over layers on a terminal; nothing when stderr is not one."""

    def __enter__(self):
        from tqdm import tqdm
        self.bar = tqdm(unit="layer", desc="quantizing", disable=not sys.stderr.isatty())
        return self

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def __exit__(self, *exc):
        self.bar.close()


def _render_plan(plan: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(plan, indent=2))
        return
    click.echo(f"model        {plan['model']} ({plan['model_type']}, {plan['layers']} layers, "
               f"{plan['moe_layers']} MoE x {plan['experts_per_layer']} experts, top-{plan['top_k']})")
    click.echo(f"quantize     {plan['quantized_params'] / 1e6:.1f}M parameters to "
               f"{plan['settings']['bits']} bits, group {plan['settings']['group_size']}, "
               f"{'sym' if plan['settings']['sym'] else 'asym'}, act-order "
               f"{'on' if plan['settings']['desc_act'] else 'off'}")
    click.echo(f"keep 16-bit  {plan['unquantized_params'] / 1e6:.1f}M parameters (embeddings, "
               "routers, norms, lm_head)")
    click.echo(f"calibration  {plan['calibration']}")
    click.echo(f"size         {_gib(plan['size_before_bytes'])} -> about {_gib(plan['projected_size_bytes'])}")
    click.echo(f"output       {plan['out']}")


def _render_summary(result, as_json: bool) -> None:
    s = result.report["summary"]
    if as_json:
        click.echo(json.dumps({"out": str(result.out), **s}, indent=2))
        return
    click.echo(f"wrote        {result.out}")
    click.echo(f"size         {_gib(s['size_before_bytes'])} -> {_gib(s['size_after_bytes'])} "
               f"({s['bits_per_weight']} bits per quantized weight)")
    click.echo(f"SQNR         median {s['median_sqnr_db']} dB, worst {s['worst_sqnr_db']} dB "
               f"({s['worst_module']})")
    fallback = s["fallback_experts"]
    click.echo(f"fallback     {len(fallback)} experts" + (f": {', '.join(fallback[:5])}"
                                                        + (" ..." if len(fallback) > 5 else "") if fallback else ""))
    click.echo(f"time         {result.report['total_seconds']} s, peak memory {s['peak_rss_mib']} MiB")
    click.echo(f"report       {result.out / 'quantization_report.json'}")
    click.echo(f"next         moe-edge generate {result.out} -p \"Hello\"")

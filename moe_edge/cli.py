"""The `moe-edge` command: a thin shell over the library (parse, call, render).

Heavy imports (torch, transformers) happen inside commands so that --help is instant.
Model text goes to stdout; banners, stats and errors to stderr (cli_ui.py renders them).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings

import click

from . import __version__
from .errors import ConfigError, MoeEdgeError


class _Group(click.Group):
    """Errors become one line on stderr; the traceback only with -v/--verbose."""

    def invoke(self, ctx):
        try:
            with _notices():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except MoeEdgeError as e:
            self._fail(ctx, f"error: {e}")
        except Exception as e:  # a bug, or an OS error we did not foresee: still one line
            self._fail(ctx, f"error: {type(e).__name__}: {e} (run with -v for the traceback)")

    @staticmethod
    def _fail(ctx, line: str):
        if ctx.meta.get("verbose"):
            raise
        click.echo(line, err=True)
        sys.exit(1)


class _NoticeHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from .cli_ui import notice
        click.echo(notice(record.getMessage()), err=True)


@contextlib.contextmanager
def _notices():
    """The library's own log records at INFO and up (the one-time kernel build) on stderr."""
    log, handler = logging.getLogger("moe_edge"), _NoticeHandler()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def _own_warnings_only():
    """Third-party warnings and log messages (transformers' deprecations, its note on long
    calibration text) stay out of the output; moe-edge's own warnings and -v show them."""
    if click.get_current_context().meta.get("verbose"):
        yield
        return
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=r"moe_edge(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _set_verbose(ctx, _param, value):
    if value:
        ctx.meta["verbose"] = True


def _options(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


VERBOSE = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_verbose,
                       is_eager=True, help="Show tracebacks on errors.")

RUNTIME = _options(
    click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 or auto."),
    click.option("--dtype", default=None, help="float32, bfloat16 or float16 [default: fp32 on "
                 "CPU, bf16 on GPU]."),
    click.option("--expert-cache", default="auto", show_default=True,
                 help="Expert cache: a size (6GB, 512MB), a share of the experts (50%), slots "
                 "per layer (16), or auto (all resident when they fit)."),
    click.option("--prefetch-depth", type=click.IntRange(0, 8), default=1, show_default=True,
                 help="Layers ahead whose experts are predicted and paged in early."),
    click.option("--no-prefetch", is_flag=True, help="Same as --prefetch-depth 0."),
    click.option("-t", "--threads", type=click.IntRange(1), default=None,
                 help="CPU threads [default: the physical cores]."),
    click.option("--lm-head", type=click.Choice(["auto", "int8", "stored"]), default="auto",
                 show_default=True, help="int8: the lm_head quantized to int8 at load (CPU; half "
                 "the bytes per token of bf16, ~0.5% logit change); stored: as the checkpoint "
                 "has it; auto: int8 on a CPU with native bf16 for heads of 16M+ weights."),
    click.option("--offline", is_flag=True, help="Never download; a Hugging Face id must be cached."),
)

CTX_SIZE = click.option("-c", "--ctx-size", type=click.IntRange(16), default=None,
                        help="Context in tokens [default: the model's, at most 4096].")

SAMPLING = _options(
    click.option("--temp", type=float, default=None, help="Temperature; 0 is greedy."),
    click.option("--top-p", type=float, default=None),
    click.option("--top-k", type=int, default=None),
    click.option("--min-p", type=float, default=None),
    click.option("-n", "--max-tokens", type=int, default=None, help="Most new tokens per reply."),
    click.option("-s", "--seed", type=int, default=None),
    CTX_SIZE,
    click.option("--system-prompt", default=None, help="System message for chat."),
)

OUTPUT = _options(
    click.option("--stats/--no-stats", default=None,
                 help="Speed, cache and memory line after each reply [default: on when interactive]."),
    click.option("-q", "--quiet", is_flag=True, help="No banner or stats."),
    VERBOSE,
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moe-edge")
@VERBOSE
def main() -> None:
    """Run Mixture-of-Experts language models where they do not fit.

    \b
    moe-edge chat                     talk to the bundled demo model
    moe-edge quantize MODEL           GPTQ 4-bit conversion, one layer at a time
    moe-edge chat MODEL-gptq-w4g128   chat with experts offloaded to fit memory
    moe-edge serve MODEL              an OpenAI-compatible server on 127.0.0.1:8080
    """


# --- loading -------------------------------------------------------------------------------

def _read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"stdin: byte {e.start} ({data[e.start:e.start + 1]!r}) is not UTF-8; "
                          "pipe UTF-8 text (e.g. through iconv -t utf-8)") from None


def _resolve(model: str | None, offline: bool):
    """(folder, is_demo) for a MODEL argument: None or `demo` is the bundled demo."""
    from .hub import resolve_model
    is_demo = model in (None, "demo")
    return resolve_model(None if is_demo else model, offline), is_demo


def _load(model, device, dtype, expert_cache, prefetch_depth, no_prefetch, threads, ctx_size,
          lm_head="auto", demo_cache="50%"):
    """(LoadedModel, ModelInfo, context, prefetch depth, note) for a resolved (folder, is_demo)."""
    import torch
    from .api import load_auto, resolve_device, resolve_dtype
    from .hub import DEMO_NOTE
    from .info import model_info, physical_cores
    torch.set_num_threads(threads or physical_cores())
    path, is_demo = model
    if is_demo and expert_cache == "auto":
        expert_cache = demo_cache  # the demo fits anywhere; offload anyway so the cache shows
    expert_cache = int(expert_cache) if str(expert_cache).isdigit() else expert_cache
    depth = 0 if no_prefetch else prefetch_depth
    dev = resolve_device(device)
    info = model_info(path, dev, resolve_dtype(dtype, dev), expert_cache, lm_head=lm_head)
    context = min(ctx_size or 4096, info.max_context)
    lm = load_auto(path, device, expert_cache, dtype=dtype, context=context, prefetch_depth=depth,
                   lm_head=lm_head)
    return lm, info, context, depth, DEMO_NOTE if is_demo else None


def _params(lm, temp, top_p, top_k, min_p, max_tokens, seed):
    return lm.defaults.with_(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                             max_new_tokens=max_tokens, seed=seed)


# --- chat and generate ---------------------------------------------------------------------

@main.command()
@click.argument("model", required=False)
@click.argument("prompt", required=False)
@click.option("-i", "--interactive", is_flag=True, help="Take turns from stdin even when it is not a terminal.")
@click.option("--json", "as_json", is_flag=True, help="One-shot: print the reply and stats as JSON.")
@RUNTIME
@SAMPLING
@OUTPUT
def chat(model, prompt, interactive, as_json, device, dtype, expert_cache, prefetch_depth,
         no_prefetch, threads, lm_head, offline, temp, top_p, top_k, min_p, max_tokens, seed, ctx_size,
         system_prompt, stats, quiet):
    """Talk to MODEL (a checkpoint folder, a Hugging Face id, or `demo`; default: the bundled
    demo). With PROMPT, or text piped on stdin, answer once and exit."""
    from .chat import ChatSession
    from .cli_chat import Repl
    from .cli_ui import banner
    model = _resolve(model, offline)
    one_shot = prompt is not None or (not interactive and not sys.stdin.isatty())
    text = (prompt if prompt is not None else _read_stdin()).strip() if one_shot else ""
    if one_shot and not text:
        raise ConfigError("nothing to answer: the prompt is empty (run `moe-edge chat` in a "
                          "terminal for a conversation)")
    lm, info, context, depth, note = _load(model, device, dtype, expert_cache, prefetch_depth,
                                           no_prefetch, threads, ctx_size, lm_head)
    session = ChatSession(lm, system_prompt, context,
                          _params(lm, temp, top_p, top_k, min_p, max_tokens, seed))
    if one_shot:
        _answer_once(session.ask(text), lm, bool(stats) and not quiet, as_json)
        return
    if not quiet:
        click.echo(banner(info, lm, depth, note), err=True)
    Repl(session, info, stats=(stats is not False) and not quiet).run()


@main.command()
@click.argument("model")
@click.option("-p", "--prompt", required=True, help="Prompt text, or - to read stdin.")
@click.option("--raw", is_flag=True, help="Complete the text as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print text and stats as JSON.")
@RUNTIME
@SAMPLING
@OUTPUT
def generate(model, prompt, raw, as_json, device, dtype, expert_cache, prefetch_depth, no_prefetch,
             threads, lm_head, offline, temp, top_p, top_k, min_p, max_tokens, seed, ctx_size,
             system_prompt, stats, quiet):
    """One-shot completion of PROMPT with MODEL, for scripts (stats on stderr)."""
    from .chat import ChatSession, Reply
    model = _resolve(model, offline)
    text = _read_stdin() if prompt == "-" else prompt
    lm, _, context, _, _ = _load(model, device, dtype, expert_cache, prefetch_depth, no_prefetch,
                                 threads, ctx_size, lm_head)
    session = ChatSession(lm, system_prompt, context,
                          _params(lm, temp, top_p, top_k, min_p, max_tokens, seed))
    reply = Reply(session, lm.encode(text), 0) if raw else session.ask(text)
    _answer_once(reply, lm, stats is not False and not quiet, as_json)


def _answer_once(reply, lm, stats: bool, as_json: bool) -> None:
    from .cli_ui import echo_json, turn_stats
    from .memory import peak_memory
    for piece in reply:
        if not as_json:
            click.echo(piece, nl=False)
    result, offload = reply.result, lm.offload_stats()
    if as_json:
        echo_json({**result.to_dict(), "offload": offload.total.summary() if offload else None,
                   "peak_bytes": peak_memory(lm.model.device)})
        return
    click.echo()
    if stats:
        click.echo(turn_stats(result, offload, peak_memory(lm.model.device)), err=True)


# --- serve ---------------------------------------------------------------------------------

@main.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens the server to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar="MOE_EDGE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health "
              "[env: MOE_EDGE_API_KEY].")
@click.option("--queue-size", type=click.IntRange(0), default=8, show_default=True,
              help="Requests that may wait while one generates; more get 429.")
@RUNTIME
@CTX_SIZE
@VERBOSE
def serve(model, host, port, api_key, queue_size, device, dtype, expert_cache, prefetch_depth,
          no_prefetch, threads, lm_head, offline, ctx_size):
    """Serve MODEL (default: the bundled demo) over an OpenAI-compatible HTTP API:
    /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics. Ctrl-C stops it."""
    from . import serve as server
    from .cli_ui import serve_banner
    spec, model = model, _resolve(model, offline)
    sock = server.listen(host, port)
    lm, info, context, depth, note = _load(model, device, dtype, expert_cache, prefetch_depth,
                                           no_prefetch, threads, ctx_size, lm_head)
    app = server.create_app(lm, _model_id(spec, model[0]), context, queue_size, api_key)
    click.echo(serve_banner(info, lm, sock.getsockname(), context, queue_size, bool(api_key), note), err=True)
    server.serve(app, sock, verbose=bool(click.get_current_context().meta.get("verbose")))
    click.echo("moe-edge serve: stopped", err=True)


def _model_id(spec: str | None, path) -> str:
    """The name /v1/models gives: `demo`, a Hugging Face id as given, else the folder's name."""
    if spec in (None, "demo"):
        return "demo"
    from pathlib import Path
    return path.name if Path(spec).expanduser().exists() else spec


# --- info and bench ------------------------------------------------------------------------

@main.command()
@click.argument("model", required=False)
@click.option("--devices", is_flag=True, help="List the CPU and GPUs with their free memory.")
@click.option("--expert-cache", default="auto", show_default=True, help="Plan for this cache size.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default=None)
@click.option("-c", "--ctx-size", type=click.IntRange(16), default=4096, show_default=True)
@click.option("--lm-head", type=click.Choice(["auto", "int8", "stored"]), default="auto", show_default=True,
              help="Plan for this lm_head (see chat --help).")
@click.option("--forecast", is_flag=True,
              help="Probe memory and disk (~1 s, 64 MiB written and removed) for the decode rate to expect.")
@click.option("--offline", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@VERBOSE
def info(model, devices, expert_cache, device, dtype, ctx_size, lm_head, forecast, offline, as_json):
    """Architecture, parameters (total and active), experts, quantization and memory plan
    of MODEL (default: the bundled demo), read from headers only."""
    from . import cli_ui
    from .api import resolve_device, resolve_dtype
    from .info import devices as list_devices, model_info
    from .offload.forecast import measure_forecast
    dev = resolve_device(device)
    cache = int(expert_cache) if expert_cache.isdigit() else expert_cache
    result = model_info(_resolve(model, offline)[0], dev, resolve_dtype(dtype, dev), cache, ctx_size,
                        lm_head=lm_head)
    found = list_devices() if devices else None
    expect = measure_forecast(result) if forecast and result.plan else None
    if as_json:
        cli_ui.echo_json({**result.to_dict(), **({"devices": found} if found else {}),
                          **({"forecast": expect.to_dict()} if expect else {})})
        return
    click.echo(cli_ui.info_text(result, expect))
    if found:
        click.echo(cli_ui.devices_text(found))


@main.command()
@click.argument("model")
@click.option("--expert-cache", default="25%,50%,100%", show_default=True, help="Comma-separated sizes.")
@click.option("--prefetch-depth", default="0,1", show_default=True, help="Comma-separated depths.")
@click.option("-p", "--prompt-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("-n", "--new-tokens", type=click.IntRange(2), default=64, show_default=True)
@click.option("-r", "--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default=None)
@click.option("-t", "--threads", type=click.IntRange(1), default=None)
@click.option("--offline", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@VERBOSE
def bench(model, expert_cache, prefetch_depth, prompt_tokens, new_tokens, repeats, device, dtype,
          threads, offline, as_json):
    """Prompt and decode tokens/s of MODEL over expert-cache sizes and prefetch depths."""
    import torch
    from . import cli_ui
    from .benchmark import sweep
    from .info import machine, physical_cores
    torch.set_num_threads(threads or physical_cores())
    caches = [int(c) if c.isdigit() else c for c in expert_cache.split(",") if c]
    try:
        depths = [int(d) for d in prefetch_depth.split(",") if d]
    except ValueError:
        raise ConfigError(f"--prefetch-depth {prefetch_depth!r}: give integers like 0,1,2") from None
    path = _resolve(model, offline)[0]
    say = None if as_json else (lambda row: click.echo(
        f"cache {row['expert_cache']}, prefetch {row['prefetch_depth']}: "
        f"{row['decode_tps']:.2f} tok/s", err=True))
    rows = sweep(path, caches, depths, prompt_tokens, new_tokens, repeats, device, dtype, progress=say)
    if as_json:
        cli_ui.echo_json({"model": str(path), "machine": machine(), "rows": rows})
    else:
        click.echo(cli_ui.bench_table(rows))


# --- quantize ------------------------------------------------------------------------------

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
@VERBOSE
def quantize(model, out, bits, group_size, sym, act_order, damp, method, calib, calib_samples,
             calib_seq_len, min_expert_tokens, expert_fallback, seed, device, dry_run, overwrite,
             resume, as_json):
    """GPTQ 4-bit conversion of MODEL (a Hugging Face checkpoint folder), one layer at a time."""
    from . import cli_ui
    from .quant import quantizer as q
    options = q.QuantizeOptions(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                                damp=damp, method=method, calib=calib, calib_samples=calib_samples,
                                calib_seq_len=calib_seq_len, min_expert_tokens=min_expert_tokens,
                                expert_fallback=expert_fallback, seed=seed, device=device)
    if dry_run:
        plan = q.plan(model, out, options)
        cli_ui.echo_json(plan) if as_json else click.echo(cli_ui.quantize_plan(plan))
        return
    with _own_warnings_only(), _LayerProgress() as progress:
        try:
            result = q.quantize(model, out, options, overwrite=overwrite, resume=resume,
                                progress=progress)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; run the same command with --resume to continue", err=True)
            sys.exit(130)
    if as_json:
        cli_ui.echo_json({"out": str(result.out), **result.report["summary"]})
    else:
        click.echo(cli_ui.quantize_summary(result))


class _LayerProgress:
    """A tqdm bar over layers on a terminal; a plain line per layer when stderr is not one
    (a nohup run's log), its eta from the layers this run has done (a resumed run skips some)."""

    def __enter__(self):
        from tqdm import tqdm
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(unit="layer", desc="quantizing", disable=not self.tty)
        self.t0, self.first = time.monotonic(), None
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
            return
        from .cli_ui import layer_progress
        self.first = done - 1 if self.first is None else self.first  # called after each layer
        elapsed = time.monotonic() - self.t0
        eta = elapsed / (done - self.first) * (total - done)
        click.echo(layer_progress(done, total, elapsed, eta), err=True)

    def __exit__(self, *exc):
        self.bar.close()


"""Everything the CLI prints: plans, summaries, the chat banner and stats, tables.

Functions return strings (or print JSON); the commands decide the stream (model text on
stdout, the rest on stderr).
"""

from __future__ import annotations

import json
from datetime import timedelta

import click


def size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def notice(message: str) -> str:
    """A notice the library logs (the kernel build), as the CLI shows it."""
    return f"moe-edge: {message}"


def duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


# --- quantize ---------------------------------------------------------------------------

def quantize_plan(plan: dict) -> str:
    s = plan["settings"]
    return "\n".join([
        f"model        {plan['model']} ({plan['model_type']}, {plan['layers']} layers, "
        f"{plan['moe_layers']} MoE x {plan['experts_per_layer']} experts, top-{plan['top_k']})",
        f"quantize     {plan['quantized_params'] / 1e6:.1f}M parameters to {s['bits']} bits, group "
        f"{s['group_size']}, {'sym' if s['sym'] else 'asym'}, act-order "
        f"{'on' if s['desc_act'] else 'off'}",
        f"keep 16-bit  {plan['unquantized_params'] / 1e6:.1f}M parameters (embeddings, routers, "
        "norms, lm_head)",
        f"calibration  {plan['calibration']}",
        f"size         {size(plan['size_before_bytes'])} -> about {size(plan['projected_size_bytes'])}",
        f"output       {plan['out']}",
    ])


def layer_progress(done: int, total: int, elapsed: float, eta: float) -> str:
    """The plain progress line of `quantize` when stderr is not a terminal."""
    return f"layer {done}/{total} done, elapsed {duration(elapsed)}, eta {duration(eta)}"


def quantize_summary(result) -> str:
    s = result.report["summary"]
    fallback = s["fallback_experts"]
    listed = f": {', '.join(fallback[:5])}{' ...' if len(fallback) > 5 else ''}" if fallback else ""
    return "\n".join([
        f"wrote        {result.out}",
        f"size         {size(s['size_before_bytes'])} -> {size(s['size_after_bytes'])} "
        f"({s['bits_per_weight']} bits per quantized weight)",
        f"SQNR         median {s['median_sqnr_db']} dB, worst {s['worst_sqnr_db']} dB ({s['worst_module']})",
        f"fallback     {len(fallback)} experts{listed}",
        f"time         {result.report['total_seconds']} s, peak memory {s['peak_rss_mib']} MiB",
        f"report       {result.out / 'quantization_report.json'}",
        f"next         moe-edge chat {result.out}",
    ])


# --- info -------------------------------------------------------------------------------

def quantization(q: dict | None, kernels: dict | None = None) -> str:
    if q is None:
        return "none (16-bit weights)"
    group = "per channel" if q["group_size"] == -1 else f"group {q['group_size']}"
    text = (f"GPTQ {q['bits']}-bit, {group}, {'sym' if q['sym'] else 'asym'}, act-order "
            f"{'on' if q['desc_act'] else 'off'}, format {q['format']}")
    if kernels:
        text += " (" + ", ".join(f"{n} {k}" for k, n in sorted(kernels.items())) + " layers)"
    return text


def model_lines(info, kernels: dict | None = None) -> list[str]:
    return [
        f"model         {info.path} ({info.model_type})",
        f"parameters    {count(info.total_params)} total, {count(info.active_params)} active per token",
        f"layers        {info.layers} ({info.moe_layers} MoE), hidden {info.hidden_size}, "
        f"vocab {info.vocab_size}, context {info.max_context}",
        f"experts       {info.experts_per_layer} per MoE layer, top-{info.top_k}, "
        f"{size(info.expert_bytes)} each",
        f"quantization  {quantization(info.quantization, kernels)}",
    ]


def plan_line(plan) -> str:
    return plan.describe() if plan is not None else "all experts resident (no offloading)"


LM_HEAD_INT8 = "lm_head       int8, a scale per row (--lm-head stored keeps the checkpoint's)"


def info_text(info, forecast=None) -> str:
    lines = model_lines(info)
    lines.append(f"checkpoint    {size(info.checkpoint_bytes)}")
    if info.lm_head_int8:
        lines.append(LM_HEAD_INT8)
    lines.append("plan          " + (plan_line(info.plan) if info.plan else f"none: {info.plan_error}"))
    if forecast is not None:
        lines.append("forecast      " + forecast_line(forecast))
    return "\n".join(lines)


def forecast_line(f) -> str:
    tier = f"disk {f.storage_gbps:.2f} GB/s" if f.storage_gbps else "RAM"
    if not f.misses_per_token:
        return f"decode up to {f.resident_tps:.1f} tok/s (memory {f.memory_gbps:.1f} GB/s, every expert cached)"
    return (f"decode {f.no_reuse_tps:.1f}-{f.resident_tps:.1f} tok/s: {f.resident_tps:.1f} at memory bandwidth "
            f"({f.memory_gbps:.1f} GB/s), {f.no_reuse_tps:.1f} if routing has no reuse ({f.misses_per_token:.1f} "
            f"expert reads a token, {f.miss_ms:.1f} ms each from {tier}); trained routers land between")


def devices_text(devices: list[dict]) -> str:
    return "\n".join(f"{d['name']:<8} {d['description']}: {size(d['free_bytes'])} free of "
                     f"{size(d['total_bytes'])}" for d in devices)


# --- chat -------------------------------------------------------------------------------

def banner(info, lm, prefetch_depth: int, note: str | None) -> str:
    from . import __version__
    lines = [f"moe-edge {__version__}"] + model_lines(info, lm.model.quant_kernels)
    plan = lm.offload.plan if lm.offload else None
    lines.append(f"memory        {plan_line(plan)}")
    if getattr(lm.model, "lm_head_int8", False):
        lines.append(LM_HEAD_INT8)
    if lm.offload:
        lines.append("prefetch      " + (f"router predictions {prefetch_depth} layer(s) ahead"
                                         if prefetch_depth else "off"))
    if note:
        lines.append(f"note          {note}")
    lines.append('Type /? for help, /bye or Ctrl-D to exit, """ to start and end multi-line input.')
    return "\n".join(lines)


def serve_banner(info, lm, address, context: int, queue_size: int, keyed: bool, note: str | None) -> str:
    host, port = address[:2]
    host = f"[{host}]" if ":" in host else host
    plan = lm.offload.plan if lm.offload else None
    lines = model_lines(info, lm.model.quant_kernels) + [f"memory        {plan_line(plan)}"]
    if note:
        lines.append(f"note          {note}")
    lines.append(f"context       {context} tokens, one generation at a time, {queue_size} may wait")
    lines.append(f"listening     http://{host}:{port}/v1 ({'API key required' if keyed else 'no API key'}); "
                 "Ctrl-C stops")
    return "\n".join(lines)


def turn_stats(result, offload, peak: int) -> str:
    cached = f" ({result.cached_tokens} cached)" if result.cached_tokens else ""
    parts = [f"prompt {result.prompt_tokens} tok{cached}, {result.prompt_tps:.1f} tok/s",
             f"reply {result.generated_tokens} tok, {result.decode_tps:.1f} tok/s",
             f"first token {result.prompt_seconds:.2f} s"]
    if offload is not None:
        t = offload.total
        parts.append(f"experts {t.hit_rate:.0%} hit, {size(t.bytes_moved)} paged in")
    parts.append(f"peak {size(peak)}")
    return "[" + " | ".join(parts) + "]"


def cache_text(lm) -> str:
    if lm.offload is None:
        return "all experts resident (no offloading)"
    t = lm.offload_stats().total
    lines = [plan_line(lm.offload.plan)]
    now, planned = lm.offload.cache.slots_per_layer, lm.offload.plan.slots_per_layer
    if now != planned:
        lines.append(f"now {now} slots per layer: {planned - now} given to the growing KV cache")
    lines += [f"since start: {t.hits} hits, {t.misses} misses ({t.hit_rate:.1%} hit rate), "
              f"{size(t.bytes_moved)} paged in, {t.stall_seconds:.2f} s stalled",
              f"prefetch: {t.prefetch_issued} issued, {t.prefetch_used} used, {t.prefetch_wasted} "
              f"wasted; precision {t.prefetch_precision:.2f}, recall {t.prefetch_recall:.2f}"]
    return "\n".join(lines)


def settings_text(settings: dict) -> str:
    return "\n".join(f"{k:<18} {v}" for k, v in settings.items())


CHAT_HELP = """\
/help, /?                 this help
/bye, /exit               leave (Ctrl-D too)
/clear                    forget the conversation (the system prompt stays)
/regen                    answer the last message again
/set temp|top_p|top_k|min_p|max_tokens|seed VALUE
/set system TEXT          a new system prompt (empty: none)
/show settings|model|cache
/save FILE                the transcript and settings as JSON (never over an existing file)
/save! FILE               the same, overwriting FILE
\"\"\"                       start or end multi-line input
Ctrl-C stops a reply (what it said so far is kept)."""


# --- bench ------------------------------------------------------------------------------

BENCH_COLUMNS = [("expert_cache", "cache", "{}"), ("prefetch_depth", "prefetch", "{}"),
                 ("prompt_tps", "prompt tok/s", "{:.1f}"), ("decode_tps", "decode tok/s", "{:.2f}"),
                 ("hit_rate", "hit rate", "{:.1%}"), ("bytes_paged", "paged in", "size"),
                 ("stall_seconds", "stall s", "{:.2f}"), ("peak_bytes", "peak memory", "size")]


def bench_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in BENCH_COLUMNS) + " | forecast tok/s |"
    rule = "|" + "|".join("---" for _ in BENCH_COLUMNS) + "|---|"
    body = ["| " + " | ".join(size(r[key]) if fmt == "size" else fmt.format(r[key])
                              for key, _, fmt in BENCH_COLUMNS) + f" | {_forecast_cell(r)} |" for r in rows]
    return "\n".join([head, rule, *body])


def _forecast_cell(row: dict) -> str:
    if "forecast_resident_tps" not in row:
        return ""
    return f"{row['forecast_no_reuse_tps']:.1f}-{row['forecast_resident_tps']:.1f}"

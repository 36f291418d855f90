"""`moe-edge quantize`: a checkpoint to a standard 4-bit GPTQ checkpoint, one layer at a time.

Peak memory is about one decoder layer (fp32), its Hessians and the calibration activations;
the model is never whole in memory. After every layer the finished shards and the next
layer's inputs are recorded, so `resume=True` continues an interrupted run exactly.

>>> from moe_edge.quant.quantizer import QuantizeOptions, quantize
>>> result = quantize("deepseek-moe-16b-chat", options=QuantizeOptions(calib_samples=128))
>>> result.out, result.report["summary"]["bits_per_weight"]
"""
# S=samples, T=tokens per sample, D=hidden

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..checkpoint import (MANIFEST, CheckpointReader, ShardedWriter, partial_folder, refuse_overlap,
                          stat_signature)
from ..config import ModelConfig, load_config
from ..errors import ConfigError, MoeEdgeError
from ..memory import trim_heap
from ..model.decoder import DecoderLayer
from ..model.weights import WeightMap, expected_tensors, load_weights
from ..tokenizer import load_tokenizer
from .calibration import calibration_windows, read_texts
from .format import QuantConfig, pack, read_quant_config
from .layer import LayerOptions, LayerQuantizer, layer_rotary

COPIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")
FORMAT_VERSION = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeOptions:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = True
    damp: float = 0.01
    method: str = "gptq"  # "gptq" or "rtn" (round-to-nearest, the baseline)
    min_expert_tokens: int = 128
    expert_fallback: str = "all-tokens"  # or "rtn"
    calib: str | None = None  # None: the calibration text shipped with moe-edge
    calib_samples: int = 128
    calib_seq_len: int = 512
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        QuantConfig(bits=self.bits, group_size=self.group_size, damp_percent=self.damp)  # validates
        if self.method not in ("gptq", "rtn"):
            raise ConfigError(f"method {self.method!r} is not supported; use gptq or rtn")
        if self.expert_fallback not in ("all-tokens", "rtn"):
            raise ConfigError(f"expert fallback {self.expert_fallback!r}: use all-tokens or rtn")
        if self.calib_samples <= 0 or self.calib_seq_len <= 0 or self.min_expert_tokens < 0:
            raise ConfigError("calibration samples and sequence length must be positive")

    def layer_options(self) -> LayerOptions:
        return LayerOptions(self.group_size, self.sym, self.act_order, self.damp, self.method,
                            self.min_expert_tokens, self.expert_fallback)

    def quantization_config(self) -> dict:
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "desc_act": self.act_order, "sym": self.sym, "true_sequential": True,
                "damp_percent": self.damp, "static_groups": False, "lm_head": False,
                "checkpoint_format": "gptq",
                "meta": {"quantizer": "moe-edge", "method": self.method,
                         "min_expert_tokens": self.min_expert_tokens,
                         "expert_fallback": self.expert_fallback, "format_version": FORMAT_VERSION}}


@dataclass
class QuantizeResult:
    out: Path
    report: dict = field(repr=False)
    # the calibration tokens and the last layer's output on them, computed with the
    # quantised weights: what a model loaded from `out` must reproduce
    calibration_ids: torch.Tensor | None = field(default=None, repr=False)
    final_hidden: torch.Tensor | None = field(default=None, repr=False)


def default_output(model: str | Path, options: QuantizeOptions) -> Path:
    model = Path(model)
    group = "pc" if options.group_size == -1 else f"g{options.group_size}"
    return model.with_name(f"{model.name}-gptq-w{options.bits}{group}")


def quantize(model: str | Path, out: str | Path | None = None, options: QuantizeOptions = QuantizeOptions(),
             overwrite: bool = False, resume: bool = False, discard_partial: bool = False,
             progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Quantise checkpoint folder `model` into `out` (default `<model>-gptq-w4g128`).

    `out` may not be, contain or lie inside `model`. An interrupted run leaves `.OUT.partial`
    beside `out`: `resume` continues it (refused when the source files, config or options
    changed since); without `resume` it is refused unless `discard_partial` deletes it.
    """
    model = Path(model)
    out = Path(out) if out is not None else default_output(model, options)
    refuse_overlap(model, out)
    config, weights = _open_source(model)
    source = source_fingerprint(model, weights.reader)
    tokenizer = load_tokenizer(model)
    ids = calibration_windows(tokenizer, read_texts(options.calib), options.calib_samples,
                              options.calib_seq_len, options.seed)
    _prepare_partial(out, resume, discard_partial)
    with ShardedWriter(out, overwrite=overwrite, resumable=True) as writer:
        run = _Run(config, weights, options, writer, ids, source)
        run.layers(progress)
        run.finish(model)
        writer.commit()
    return QuantizeResult(out, run.report, ids, run.hidden)


def _open_source(model: Path) -> tuple[ModelConfig, WeightMap]:
    config = load_config(model)
    if read_quant_config(model) is not None:
        raise ConfigError(f"{model}: already quantized (config.json has quantization_config); "
                          "quantize the original 16-bit checkpoint")
    return config, WeightMap(CheckpointReader(model), config)


def source_fingerprint(model: Path, reader: CheckpointReader) -> str:
    """Changes when the source's weight files (name, size, mtime) or config.json change."""
    h = hashlib.sha256((model / "config.json").read_bytes())
    h.update(stat_signature(reader.files()).encode())
    return h.hexdigest()[:20]


def _prepare_partial(out: Path, resume: bool, discard: bool) -> None:
    partial = partial_folder(out)
    manifest = partial / MANIFEST
    if resume and not manifest.exists():
        raise MoeEdgeError(f"{out}: there is no interrupted run to resume; run without --resume")
    if resume or not partial.exists():
        return
    if manifest.exists() and not discard:
        raise MoeEdgeError(f"{partial}: an interrupted run of {out.name} is there; run again with "
                           "--resume to continue it, or delete that folder to start over")
    log.info("removing %s (%s)", partial, "discarded" if manifest.exists() else "no finished layer")
    shutil.rmtree(partial)


class _Run:
    """The state of one quantisation: the activations flowing layer to layer, the report."""

    def __init__(self, config: ModelConfig, weights: WeightMap, options: QuantizeOptions,
                 writer: ShardedWriter, ids: torch.Tensor, source: str):
        self.config, self.weights, self.opts, self.writer = config, weights, options, writer
        self.source = source
        self.device = torch.device(options.device)
        self.cos, self.sin = (t.to(self.device) for t in layer_rotary(config, ids.shape[1]))
        self.t0 = time.perf_counter()
        self.block_modules: set[str] = set()  # quantised Linears, named relative to a layer
        state = writer.resumed_state
        if state is None:
            self.report = {"options": asdict(options), "calibration_tokens": ids.numel(),
                           "layers": [], "format_version": FORMAT_VERSION}
            self.hidden, self.next_layer = self._embed(ids), 0
            self._write_unquantized()
        else:
            if state.get("source") != source:
                raise MoeEdgeError(f"{writer.tmp}: the interrupted run was made from other source "
                                   "files (or the source's weights or config.json changed since); "
                                   "delete that folder and run without --resume")
            if state["options"] != asdict(options):
                raise MoeEdgeError(f"{writer.out}: the interrupted run used other options; rerun "
                                   f"with the same options, or delete {writer.tmp} to start over")
            self.report, self.next_layer = state["report"], state["next_layer"]
            self.block_modules = set(state["block_modules"])
            self.hidden = load_file(str(writer.tmp / state["hidden"]))["hidden"]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weights.get("model.embed_tokens.weight").float())  # [S, T, D]

    def _write_unquantized(self) -> None:
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            if name in self.weights:
                self.writer.add(self.weights.sources[name].name, self.weights.get(name))

    def layers(self, progress) -> None:
        for layer in range(self.next_layer, self.config.num_layers):
            t0 = time.perf_counter()
            module = self._load_layer(layer)
            self.weights.reader.release()
            lq = LayerQuantizer(module, self.opts.layer_options(), self.cos, self.sin)
            lq.run(self.hidden.to(self.device))
            self.hidden = lq.forward(self.hidden.to(self.device)).cpu()
            stored = self._write_layer(layer, lq)
            self.report["layers"].append(_layer_report(layer, lq, time.perf_counter() - t0, stored))
            self._checkpoint(layer + 1)
            del module, lq
            trim_heap()
            if progress:
                progress(layer + 1, self.config.num_layers)

    def _load_layer(self, layer: int) -> DecoderLayer:
        with torch.device("meta"):
            module = DecoderLayer(self.config, layer)
        load_weights(module, self.weights, device=self.device, dtype=torch.float32,
                     prefix=f"model.layers.{layer}.")
        return module

    def _ckpt_prefix(self, internal: str) -> str:
        """The source checkpoint's own spelling of a Linear (Mixtral's w1, Qwen's shared_expert)."""
        src = self.weights.sources[internal + ".weight"]
        return internal if src.expert is not None else src.name.removesuffix(".weight")

    def _write_layer(self, layer: int, lq: LayerQuantizer) -> dict[str, int]:
        """Packed tensors of the quantised Linears, the rest as stored; bytes per Linear."""
        prefix, stored = f"model.layers.{layer}.", {}
        for name, res in lq.results.items():
            bias = lq.linears[name].bias
            t = pack(res.result.q, res.result.zeros, res.result.scales, res.result.g_idx, v2=False,
                     bias=None if bias is None else bias.detach().cpu())
            out = self._ckpt_prefix(prefix + name)
            self.block_modules.add(out.removeprefix(prefix))
            for part in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                if getattr(t, part) is not None:
                    self.writer.add(f"{out}.{part}", getattr(t, part))
            stored[name] = t.nbytes()
        quantized = {f"{n}.{p}" for n in lq.results for p in ("weight", "bias")}
        for local in expected_tensors(lq.layer):
            if local not in quantized:
                full = prefix + local
                self.writer.add(self.weights.sources[full].name, self.weights.get(full))
        return stored

    def _checkpoint(self, next_layer: int) -> None:
        hidden_file = f"hidden-{next_layer}.safetensors"
        save_file({"hidden": self.hidden.contiguous()}, str(self.writer.tmp / hidden_file))
        self.report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.writer.checkpoint({"options": asdict(self.opts), "source": self.source,
                                "next_layer": next_layer, "hidden": hidden_file,
                                "report": self.report, "block_modules": sorted(self.block_modules)})
        for old in self.writer.tmp.glob("hidden-*.safetensors"):
            if old.name != hidden_file:
                old.unlink()

    def finish(self, model: Path) -> None:
        for f in self.writer.tmp.glob("hidden-*.safetensors"):
            f.unlink()
        raw = json.loads((model / "config.json").read_text(encoding="utf-8"))
        qcfg = self.opts.quantization_config()
        # transformers/optimum quantise only the Linears listed here (else also the 1-output
        # shared_expert_gate of Qwen2-MoE, which fails); grouped in true-sequential order
        qcfg["modules_in_block_to_quantize"] = _block_groups(self.block_modules)
        self.writer.write_json("config.json", {**raw, "quantization_config": qcfg})
        self.writer.write_json("quantize_config.json", qcfg)
        for name in COPIED_FILES:
            if (model / name).exists():
                self.writer.copy_file(model / name)
        self.report["summary"] = summarize(self.report, model, self.writer)
        self.report["total_seconds"] = round(sum(l["seconds"] for l in self.report["layers"]), 1)
        self.writer.write_json("quantization_report.json", self.report)


def _block_groups(names: set[str]) -> list[list[str]]:
    from .layer import _stage_of
    stages: dict[int, list[str]] = {}
    for n in sorted(names):
        stages.setdefault(_stage_of(n), []).append(n)
    return [stages[k] for k in sorted(stages)]


def _layer_report(layer: int, lq: LayerQuantizer, seconds: float, stored: dict[str, int]) -> dict:
    linears = {name: {"method": r.method, "tokens": r.tokens, "rel_error": _finite(r.rel_error),
                      "sqnr_db": _finite(r.sqnr_db), "damp": r.result.damp,
                      "dead_columns": r.result.dead_columns, "seconds": round(r.seconds, 3),
                      "params": r.result.q.numel(),
                      "bytes": stored[name]}
               for name, r in lq.results.items()}
    experts = [{"expert": e, "tokens": n,
                "method": lq.results[f"mlp.experts.{e}.gate_proj"].method} for e, n in sorted(lq.tokens.items())]
    rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return {"layer": layer, "seconds": round(seconds, 2), "peak_rss_mib_so_far": rss,
            "linears": linears, "experts": experts}


def _finite(x: float):
    return round(x, 6) if x == x and abs(x) != float("inf") else None


def summarize(report: dict, model: Path, writer: ShardedWriter) -> dict:
    """Sizes, bits per quantised weight, SQNR spread and the experts that needed the fallback."""
    linears = [(f"model.layers.{l['layer']}.{n}", v) for l in report["layers"] for n, v in l["linears"].items()]
    sqnr = sorted((v["sqnr_db"], name) for name, v in linears if v["sqnr_db"] is not None)
    fallback = [f"layer {l['layer']} expert {e['expert']} ({e['tokens']} tokens, {e['method']})"
                for l in report["layers"] for e in l["experts"] if e["method"] != "gptq"]
    params = sum(v["params"] for _, v in linears)
    stored = sum(v["bytes"] for _, v in linears)
    return {"size_before_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")),
            "size_after_bytes": sum(f.stat().st_size for f in writer.tmp.glob("shard-*.tmp")),
            "quantized_params": params,
            "bits_per_weight": round(8 * stored / params, 3) if params else None,
            "median_sqnr_db": round(statistics.median(s for s, _ in sqnr), 2) if sqnr else None,
            "worst_sqnr_db": round(sqnr[0][0], 2) if sqnr else None, "worst_module": sqnr[0][1] if sqnr else None,
            "fallback_experts": fallback, "peak_rss_mib": report.get("peak_rss_mib")}


def _is_quantized_linear(name: str, shape: tuple[int, ...]) -> bool:
    kept = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "shared_expert_gate.weight")
    return len(shape) == 2 and name.startswith("model.layers.") and not name.endswith(kept)


def plan(model: str | Path, out: str | Path | None = None, options: QuantizeOptions = QuantizeOptions()) -> dict:
    """What `quantize` would do, from config.json and tensor shapes alone (nothing is loaded)."""
    model = Path(model)
    out = Path(out) if out is not None else default_output(model, options)
    refuse_overlap(model, out)
    config, weights = _open_source(model)
    quantized = other = projected = 0
    for name, src in weights.sources.items():
        shape = weights.reader.shape(src.name)
        shape = shape[1:] if src.expert is not None else shape
        numel = int(torch.tensor(shape).prod()) if shape else 1
        if src.rows is not None:
            numel //= 2  # gate or up half of a fused gate_up tensor
        if _is_quantized_linear(name, shape):
            N, K = (shape[0] // 2 if src.rows else shape[0]), shape[1]
            G = 1 if options.group_size == -1 else -(-K // options.group_size)
            quantized += N * K
            projected += N * K // 2 + G * N // 2 + 2 * G * N + 4 * K
        else:
            other += numel
            projected += weights.reader.itemsize(src.name) * numel
    return {"model": str(model), "out": str(out),
            "model_type": config.model_type, "layers": config.num_layers,
            "moe_layers": len(config.moe_layer_ids), "experts_per_layer": config.num_experts,
            "top_k": config.top_k, "quantized_params": quantized, "unquantized_params": other,
            "size_before_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")),
            "projected_size_bytes": projected,
            "calibration": f"{options.calib_samples} x {options.calib_seq_len} tokens from "
                           f"{options.calib or 'the shipped calibration text'}",
            "settings": options.quantization_config()}

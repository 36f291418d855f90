"""Quantising one decoder layer, MoE-aware: the per-layer half of `moe-edge quantize`.

Run the layer on the calibration activations while recording each Linear's inputs, and
solve GPTQ group by group in true-sequential order (q/k/v, o, gate/up, down), each routed
expert on exactly the tokens its router sends it. Weights are replaced by their quantised
values as it goes, so each group sees the error of the groups before it.

Experts that see fewer than `min_expert_tokens` calibration tokens are not quantised from a
near-empty Hessian: with `expert_fallback="all-tokens"` (default) their Hessians are built
from every token reaching the layer, as if the router had sent them all; with "rtn" they
are rounded to nearest. The report names every expert, its token count and method.
"""
# S=samples, T=tokens per sample, D=hidden, N=out features, K=in features

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..model.decoder import DecoderLayer
from ..model.layers import rotary_cos_sin
from ..model.moe import MoEBlock
from ..model.weights import MIXTRAL_PROJ
from .gptq import GPTQResult, Hessian, gptq_quantize, rtn_result

# true-sequential order: each group is solved after the ones before it are quantised
STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass(frozen=True)
class LayerOptions:
    """What the per-layer solver needs (a subset of the CLI's options)."""

    group_size: int = 128
    sym: bool = True
    act_order: bool = True
    damp: float = 0.01
    method: str = "gptq"  # or "rtn"
    min_expert_tokens: int = 128
    expert_fallback: str = "all-tokens"  # or "rtn"
    batch: int = 8

    @property
    def zero_range(self) -> tuple[int, int]:
        # the GPTQ v1 format stores zero-1 in 4 bits: a zero point of 0 cannot be written
        return (1, 15)


@dataclass
class LinearResult:
    name: str  # relative to the layer, e.g. "mlp.experts.3.up_proj"
    result: GPTQResult
    method: str
    tokens: int
    rel_error: float
    seconds: float

    @property
    def sqnr_db(self) -> float:
        return float("inf") if self.rel_error <= 0 else -10.0 * torch.log10(torch.tensor(self.rel_error)).item()


def _stage_of(name: str) -> int:
    leaf = name.rsplit(".", 1)[-1]
    leaf = MIXTRAL_PROJ.get(leaf, leaf)  # a checkpoint's own spelling may be Mixtral's
    return next(i for i, stage in enumerate(STAGES) if leaf in stage)


def _input_key(name: str) -> str:
    """Linears fed the same input share one Hessian: q/k/v, and gate/up of one MLP."""
    return re.sub(r"(q_proj|k_proj|v_proj)$", "qkv", re.sub(r"(gate_proj|up_proj)$", "gate_up", name))


def _expert_id(name: str) -> int | None:
    m = re.search(r"mlp\.experts\.(\d+)\.", name)
    return int(m[1]) if m else None


class LayerQuantizer:
    """Quantises the Linears of one decoder layer in place (weights become their dequantised
    4-bit values) and keeps the GPTQ results for writing."""

    def __init__(self, layer: DecoderLayer, options: LayerOptions, cos, sin):
        self.layer, self.opts, self.cos, self.sin = layer, options, cos, sin
        self.linears = {n: m for n, m in layer.named_modules()
                        if isinstance(m, torch.nn.Linear) and not n.endswith("shared_expert_gate")}
        self.moe = layer.mlp if isinstance(layer.mlp, MoEBlock) else None
        self.results: dict[str, LinearResult] = {}
        self.tokens: dict[int, int] = {}  # calibration tokens routed to each expert

    def run(self, hidden: torch.Tensor) -> None:
        for stage in range(len(STAGES)):
            names = [n for n in self.linears if _stage_of(n) == stage]
            if names:
                self._solve_stage(names, hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output for every sample, in batches: [S, T, D]."""
        out = torch.empty_like(hidden)
        with torch.no_grad():
            for i in range(0, hidden.shape[0], self.opts.batch):
                out[i:i + self.opts.batch] = self.layer(hidden[i:i + self.opts.batch], self.cos, self.sin, None, 0)
        return out

    def _solve_stage(self, names: list[str], hidden: torch.Tensor) -> None:
        hessians = self._collect(names, hidden)
        for name in names:
            key = _input_key(name)
            expert = _expert_id(name)
            tokens = self.tokens.get(expert, hessians[key].n) if expert is not None else hessians[key].n
            method, H = self._method_and_hessian(name, expert, hessians)
            self._quantize(name, H, method, tokens)

    def _method_and_hessian(self, name: str, expert: int | None, hessians: dict):
        starved = expert is not None and self._starved(expert)
        if self.opts.method == "rtn" or (starved and self.opts.expert_fallback == "rtn"):
            return "rtn", hessians.get(_input_key(name))
        if starved:
            key = "all:gate_up" if name.endswith(("gate_proj", "up_proj")) else f"all:{name}"
            return "gptq-all-tokens", hessians[key]
        return "gptq", hessians[_input_key(name)]

    def _starved(self, expert: int) -> bool:
        return self.tokens.get(expert, 0) < self.opts.min_expert_tokens

    def _quantize(self, name: str, H: Hessian | None, method: str, tokens: int) -> None:
        t0 = time.perf_counter()
        module = self.linears[name]
        w = module.weight.data.float()
        o = self.opts
        calibrated = H is not None and H.n > 0
        if method == "rtn":
            res = rtn_result(w, o.group_size, o.sym, o.zero_range, H.H if calibrated else None)
        else:
            res = gptq_quantize(w, H.H, o.group_size, o.sym, o.act_order, o.damp, zero_range=o.zero_range)
        module.weight.data.copy_(res.dequantize().to(module.weight.dtype))
        err = res.loss if calibrated else float("nan")  # relative output error on its inputs
        self.results[name] = LinearResult(name, res, method, tokens, err, time.perf_counter() - t0)

    def _collect(self, names: list[str], hidden: torch.Tensor) -> dict[str, Hessian]:
        """One pass over the calibration samples, accumulating a Hessian per input."""
        hessians: dict[str, Hessian] = {}
        hooks = []
        for name in names:
            key = _input_key(name)
            if key not in hessians:
                hessians[key] = Hessian(self.linears[name].in_features)
                hooks.append(self.linears[name].register_forward_pre_hook(_accumulate(hessians[key])))
        if self.moe is not None and any(_expert_id(n) is not None for n in names):
            hooks.append(self.moe.register_forward_pre_hook(self._all_token_hook(names, hessians)))
        try:
            self.forward(hidden)
        finally:
            for h in hooks:
                h.remove()
        if any(n.endswith("gate_proj") and _expert_id(n) is not None for n in names):
            self.tokens = {e: hessians[f"mlp.experts.{e}.gate_up"].n for e in range(len(self.moe.experts))}
        return hessians

    def _all_token_hook(self, names: list[str], hessians: dict[str, Hessian]):
        """Hessians over every token reaching the MoE block, for experts that see too few:
        one shared for gate/up (their input is the block's input), one per starved down_proj."""
        gate_up = any(n.endswith("gate_proj") for n in names)
        if gate_up:
            hessians["all:gate_up"] = Hessian(self.layer.mlp.gate.weight.shape[1])
        starved = [e for e in range(len(self.moe.experts)) if not gate_up and self._starved(e)]
        for e in starved:
            hessians[f"all:mlp.experts.{e}.down_proj"] = Hessian(self.moe.experts[e].down_proj.in_features)

        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])  # [S*T, D]
            if gate_up:
                hessians["all:gate_up"].add(x)
            for e in starved:
                expert = self.moe.experts[e]
                hessians[f"all:mlp.experts.{e}.down_proj"].add(F.silu(expert.gate_proj(x)) * expert.up_proj(x))
        return hook


def _accumulate(h: Hessian) -> Callable:
    def hook(module, args):
        h.add(args[0].detach())
    return hook


def layer_rotary(config, seq_len: int, dtype=torch.float32):
    return rotary_cos_sin(torch.arange(seq_len), config.head_dim, config.rope_theta, dtype)

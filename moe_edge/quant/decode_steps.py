"""A decoder layer's blocks for one decode row, each in one native call (csrc/decode_step.cpp).

A small model's decode step is bound by Python, not by its weights: the demo's 128-wide
layers run each ATen op in a microsecond or two, and the ~60 module calls, views and casts
around them per layer cost more than the ops. `use_native_steps` gives every layer whose
weights all fit the native kernels a `NativeSteps`: its attention block (norm, fused q/k/v,
rotary, KV cache write, attention, o_proj, residual) and its MLP block (norm, router,
top-k, shared and routed int4 experts, residual) run as the same ATen ops and kernels from
C++, bit for bit the modules' result (tests/test_native.py). A MoE block whose experts an
offloading provider holds runs the MLP step's parts (route, shared, combine) around the
provider's own call. Anything else (a prompt, a first token, a cache that is not bf16, a
hooked module, a layer that does not fit) takes the modules.
"""
# D=hidden, E=experts, A=active experts (top-k)

from __future__ import annotations

import torch
from torch import nn

from ..model.attention import KVCache
from ..model.decoder import DecoderLayer
from ..model.layers import RMSNorm
from ..model.moe import ExpertInput, MoEBlock, ResidentExperts
from . import native
from .experts import QuantResidentExperts
from .qlinear import QuantLinear, QuantMLP, runs_together


class NativeSteps:
    """What DecoderLayer.forward calls for one row (batch 1, one token): the native
    attention step where the cache allows it; the native MLP step, whole while the MoE block
    still has the resident experts it was built with, else in parts around its provider; the
    layer's modules otherwise, and whenever a hook is registered on a module a step would
    skip. The layer's taps run as on the modules' path."""

    def __init__(self, block: DecoderLayer, layer: int, attention, mlp, holds_experts: bool = False):
        self.layer, self.attention, self.mlp = layer, attention, mlp
        self.moe = isinstance(block.mlp, MoEBlock)  # a MoE step's route, shared and combine serve any provider
        self.holds = block.mlp.experts if holds_experts else None  # the provider whose experts it runs
        self.attention_hooks = _hook_dicts(block.input_layernorm, block.self_attn)
        self.mlp_hooks = _hook_dicts(block.post_attention_layernorm, block.mlp)
        self._layer_hooks = (block._forward_pre_hooks, block._forward_hooks, *_global_hook_dicts())

    @property
    def direct(self) -> bool:
        """Whether the decoder may call this without the layer's nn.Module call: no hook on it."""
        return not any(self._layer_hooks)

    def __call__(self, block: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 cache: KVCache | None, start: int) -> torch.Tensor:
        for tap in block.before_attention:
            tap(x)
        # a first token attends at full precision (Attention.forward), a full cache raises there
        if self.attention is not None and cache is not None and 0 < start < cache.capacity \
                and cache.dtype == torch.bfloat16 and not any(self.attention_hooks):
            x = self.attention(x, cos, sin, cache.k[self.layer], cache.v[self.layer], start)
        else:
            x = x + block.self_attn(block.input_layernorm(x), cos, sin, cache, start)
        for tap in block.before_mlp:
            tap(x)
        mlp = block._modules["mlp"]
        if self.mlp is not None and not any(self.mlp_hooks):
            if not self.moe:
                return self.mlp(x)
            experts = mlp.experts
            if self.holds is not None and experts is self.holds:
                return self.mlp(x)
            return self._routed_elsewhere(experts, x)  # offloaded: MoEBlock.forward's ops around them
        return x + mlp(block.post_attention_layernorm(x))

    def _routed_elsewhere(self, experts, x: torch.Tensor) -> torch.Tensor:
        flat, xb, weights, ids = self.mlp.route(x)
        picked = ids.tolist()[0]
        experts.start(picked)  # their loads overlap the shared experts
        shared = self.mlp.shared(flat, xb)
        parts = getattr(experts, "native_parts", None)  # an offloading provider's, as they land
        groups = parts(picked) if parts is not None else None
        if groups is not None:
            return self._finish(x, weights, xb, shared, groups, len(picked))
        ys = experts.apply(ExpertInput(flat, {torch.bfloat16: xb}), picked)  # [A, D]
        return self.mlp.combine(x, weights, ys, shared)

    def _finish(self, x, weights, xb, shared, groups, A: int) -> torch.Tensor:
        """combine() of the routed experts' rows, one native call per group as they land
        (all landed: finish, the resident step's one call)."""
        try:
            rows: list = [None] * A
            for positions, mlps in groups:
                if len(positions) == A:
                    return self.mlp.finish(x, weights, xb, mlps, shared)
                for a, row in zip(positions, self.mlp.rows(xb, mlps).split(1)):
                    rows[a] = row
        finally:
            groups.close()
        return self.mlp.combine(x, weights, torch.cat(rows), shared)


def _hook_dicts(*modules: nn.Module) -> tuple[dict, ...]:
    """The forward (pre-)hook registries of `modules` and their submodules, and the global
    ones: a hook registered later lands in one of these dicts. Routed experts are left out
    (192 modules on the demo, checked per token): a hook on one expert is not seen."""
    dicts, stack = list(_global_hook_dicts()), list(modules)
    while stack:
        m = stack.pop()
        dicts += [m._forward_pre_hooks, m._forward_hooks]
        if not isinstance(m, ResidentExperts):
            stack.extend(m.children())
    return tuple(dicts)


def _global_hook_dicts() -> tuple[dict, dict]:
    """The registries of hooks every module's call runs (register_module_forward_*hook)."""
    from torch.nn.modules import module as nn_module
    return nn_module._global_forward_pre_hooks, nn_module._global_forward_hooks


def use_native_steps(model: nn.Module) -> int:
    """Give each decoder layer of `model` (fp32 activations, a bf16 KV cache) the native steps
    its weights allow. -> the number of blocks that got one."""
    if not native.available() or model.dtype != torch.float32 or model.kv_dtype != torch.bfloat16:
        return 0
    count = 0
    for i, layer in enumerate(model.model.layers):
        attention, (mlp, holds) = attention_step(layer), mlp_step(layer, model.config.top_k)
        layer.native_steps = NativeSteps(layer, i, attention, mlp, holds) if attention or mlp else None
        count += (attention is not None) + (mlp is not None)
    return count


def attention_step(layer: DecoderLayer):
    """The native AttentionStep for `layer`, or None where its attention does not fit it."""
    attn = layer.self_attn
    qkv, o = attn._modules.get("qkv"), attn._modules.get("o_proj")
    if (attn.decode_kernel is None or attn.clip is not None or attn.window is not None
            or not _fits(qkv) or not _fits(o) or not _fp32_norm(layer.input_layernorm)):
        return None
    norms = [None, None]
    if attn.qk_norm is not None:
        if not (_fp32_norm(attn.q_norm) and _fp32_norm(attn.k_norm) and attn.q_norm.eps == attn.k_norm.eps):
            return None
        norms = [attn.q_norm.weight.detach(), attn.k_norm.weight.detach()]
    eps = attn.q_norm.eps if attn.qk_norm is not None else 0.0
    return native.steps().AttentionStep(
        layer.input_layernorm.weight.detach(), layer.input_layernorm.eps, _linear(qkv), _linear(o),
        *norms, attn.qk_norm == "head", eps, attn.num_heads, attn.num_kv_heads, attn.head_dim,
        attn.head_dim ** -0.5)


def mlp_step(layer: DecoderLayer, top_k: int):
    """(the native MlpStep for `layer`'s dense MLP or MoE block, or None where it does not fit;
    whether it holds the experts). Resident int4 experts that run together (as run_experts runs
    them) go inside it; other experts stay with their provider, which NativeSteps calls
    between the step's parts."""
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    if not _fp32_norm(norm):
        return None, False
    steps, weight, eps = native.steps(), norm.weight.detach(), norm.eps
    if not isinstance(mlp, MoEBlock):
        return (steps.MlpStep(weight, eps, None, 0, False, _mlp(mlp), None, []) if _fits_mlp(mlp) else None), False
    if mlp.gate.weight.dtype != torch.float32:
        return None, False
    experts = mlp.experts  # resident int4 experts run inside the step; others (offloaded) around it
    routed = list(experts) if type(experts) is QuantResidentExperts else []
    natives = [native_mlp(e, top_k) for e in routed]
    if any(n is None for n in natives) or not _same_shapes(routed):
        natives = []
    shared, gate = mlp.shared_experts, mlp.shared_expert_gate
    if shared is not None and not _fits_mlp(shared):
        return None, False
    if gate is not None and not (type(gate) is nn.Linear and gate.bias is None
                                 and gate.weight.dtype == torch.float32):
        return None, False
    return steps.MlpStep(weight, eps, mlp.gate.weight.detach(), top_k, mlp.gate.renormalize,
                         _mlp(shared) if shared is not None else None,
                         gate.weight.detach() if gate is not None else None, natives), bool(natives)


def native_mlp(mlp, top_k: int):
    """`mlp` (a routed expert) as the Int4Mlp an MlpStep runs, or None where it does not fit
    (what mlp_step asks of resident experts)."""
    return _mlp(mlp) if native.available() and _fits_mlp(mlp) and runs_together(mlp, top_k) else None


def _fits(layer) -> bool:
    return isinstance(layer, QuantLinear) and native.usable(layer)


def _fits_mlp(mlp) -> bool:
    return type(mlp) is QuantMLP and mlp.kernel_dtype == torch.bfloat16 and native.mlps_usable(mlp)


def _fp32_norm(norm) -> bool:
    """RMSNorm.forward takes the one-op fp32 path (the activations are fp32 here)."""
    return type(norm) is RMSNorm and norm.weight.dtype == torch.float32


def _same_shapes(mlps: list) -> bool:
    """One group size and one shape per projection: what one mlps call takes."""
    return all(len({(m._modules[n].group, m._modules[n].in_features, m._modules[n].out_features)
                    for m in mlps}) == 1 for n in ("gate_up", "down_proj"))


def _linear(layer: QuantLinear):
    b = layer._buffers
    return native.steps().Int4Linear(b["packed"], b["scale_zeros"], b["perm"], b["bias"], layer.group)


def _mlp(mlp: QuantMLP):
    return native.steps().Int4Mlp(_linear(mlp._modules["gate_up"]), _linear(mlp._modules["down_proj"]))

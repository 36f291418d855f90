"""The MoE block: router math of every family, routed experts from a provider, shared experts."""
# N=tokens (batch*time flattened), D=hidden, E=routed experts, A=active experts per token (top-k)

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP

Expert = Callable[[torch.Tensor], torch.Tensor]


class ExpertProvider(Protocol):
    """Where one MoE layer's routed experts live.

    `experts_for(ids)` yields `(expert id, callable)` for every id, in whatever order they
    become available: a resident provider yields them at once (and says so with a true
    `immediate`), an offloading one yields cached experts first and the rest as their loads
    land. With `hold` (decode: no more ids than slots) every yielded expert stays valid until
    the iterator is closed, so the block can finish them together; without it, only until
    the next one is asked for.
    """

    def experts_for(self, ids: Iterable[int], hold: bool = False) -> Iterator[tuple[int, Expert]]: ...


class ResidentExperts(nn.ModuleList):
    """Every routed expert of one layer held in memory; names stay `experts.{e}.*_proj`."""

    immediate = True  # every expert is there at once: nothing to overlap by computing on arrival

    def __init__(self, config: ModelConfig):
        super().__init__(MLP(config.hidden_size, config.moe_intermediate_size)
                         for _ in range(config.num_experts))

    def experts_for(self, ids: Iterable[int], hold: bool = False) -> Iterator[tuple[int, Expert]]:
        for e in ids:  # resident: valid for good, held or not
            yield e, self[e]


class Router(nn.Module):
    """softmax over all E experts, top-k, optional renormalisation of the k weights.

    DeepSeek-MoE and OLMoE keep the raw softmax weights; Mixtral and Qwen3-MoE renormalise
    (for Mixtral that equals a softmax over the top-k logits). Computed in fp32 so that a
    bf16 model routes like an fp32 one.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.top_k, self.renormalize = config.top_k, config.norm_topk_prob

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_fp32(x), _fp32(self.weight)).softmax(dim=-1)  # [N, E]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = torch.topk(self.probs(x), self.top_k, dim=-1)  # [N, A]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32; no op dispatched when it already is (decode: twice per layer and token)."""
    return t if t.dtype == torch.float32 else t.float()


class ExpertInput:
    """One layer's input to its experts (routed and shared), cast once per kernel dtype.

    Experts with a `kernel_dtype` (QuantMLP) take their input in it and answer in it: one
    cast per layer instead of one in and one out per expert, bit for bit the same result.
    """

    def __init__(self, x: torch.Tensor):
        self.x, self.cast = x, {}

    def __call__(self, expert: Expert, rows: torch.Tensor | None = None) -> torch.Tensor:
        """expert(x[rows]), in x's dtype or in the expert's kernel dtype."""
        dtype = getattr(expert, "kernel_dtype", None)
        if dtype is None:
            return expert(self.x if rows is None else self.x[rows])
        x = self._in(dtype)
        return expert.run(x if rows is None else x[rows], self.x.dtype)

    def each_arriving(self, provider: ExpertProvider, ids: list[int]) -> torch.Tensor:
        """[A, D], row a from expert ids[a] on this one-row input (decode), for experts as a
        provider hands them over (resident: at once; offloaded: cached first, then as loads
        land), held until the last has run. The int4 experts run together
        (quant.qlinear.run_experts); an offloading provider's get their gate+up row computed
        on arrival, overlapping the loads still in flight, a resident one's all in one call
        at the end. Other experts run whole on arrival."""
        from ..quant.qlinear import gate_up_row, run_experts, runs_together
        on_arrival = not getattr(provider, "immediate", False)
        slot = {e: i for i, e in enumerate(ids)}
        ys, split, rows, first = [self.x] * len(ids), {}, {}, None
        arriving = provider.experts_for(sorted(slot), hold=True)
        try:
            for _ in ids:  # not to exhaustion: a finished iterator lets its experts go
                e, expert = next(arriving)
                first = first or expert.kernel_dtype  # experts run together share a kernel dtype
                if first and expert.kernel_dtype == first and runs_together(expert, len(ids)):
                    split[slot[e]] = expert
                    if on_arrival:
                        rows[slot[e]] = gate_up_row(expert, self._in(first))
                else:
                    ys[slot[e]] = self(expert)  # [1, D]
            if split:
                order = sorted(split)
                done = run_experts([split[i] for i in order], self._in(first), self.x.dtype,
                                   [rows[i] for i in order] if on_arrival else None)
                if len(order) == len(ids):
                    return done  # all of them, in slot order
                for i, y in zip(order, done.split(1)):
                    ys[i] = y
        finally:
            arriving.close()
        return torch.cat(ys)

    def _in(self, dtype: torch.dtype) -> torch.Tensor:
        x = self.cast.get(dtype)
        if x is None:
            x = self.cast[dtype] = self.x.to(dtype)
        return x


class MoEBlock(nn.Module):
    """y = sum_a w_a * expert_{id_a}(x) + shared(x) (times sigmoid(shared_gate(x)) for Qwen2-MoE)."""

    def __init__(self, config: ModelConfig, experts: ExpertProvider | None = None):
        super().__init__()
        self.gate = Router(config)
        self.experts = experts if experts is not None else ResidentExperts(config)
        self.shared_experts = None
        self.shared_expert_gate = None
        if config.shared_intermediate_size:
            self.shared_experts = MLP(config.hidden_size, config.shared_intermediate_size)
        if config.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        weights, ids = self.gate(flat)
        inputs = ExpertInput(flat)
        out = self.routed(inputs, weights if weights.dtype == x.dtype else weights.to(x.dtype), ids)
        if self.shared_experts is not None:
            shared = inputs(self.shared_experts).to(x.dtype)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.view(shape)

    def routed(self, inputs: ExpertInput, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Group tokens by expert: one call per active expert on all of its tokens.

        Outputs land in a buffer with one row per (token, slot) and are summed over the k
        slots in a fixed order, so the result does not depend on the order experts arrive
        in (an offloading provider yields cached ones first). No scatter-add: on the CPU
        `index_add_` costs milliseconds per call once another process competes for a core.
        """
        N, A = ids.shape
        flat = inputs.x
        if N == 1:  # decode: k experts, one token
            ys = inputs.each_arriving(self.experts, ids.tolist()[0]).to(flat.dtype)  # [A, D]
            return (weights.view(A, 1) * ys).sum(0, keepdim=True)
        flat_ids = ids.reshape(-1)  # [N*A]
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.gate.weight.shape[0])
        starts = [0] + counts.cumsum(0).tolist()
        token_of = order // A  # [N*A] token row of each sorted assignment
        ys = flat.new_empty(N * A, flat.shape[1])  # [N*A, D] in expert order
        active = [e for e, c in enumerate(counts.tolist()) if c]
        for e, expert in self.experts.experts_for(active):
            ys[starts[e]:starts[e + 1]] = inputs(expert, token_of[starts[e]:starts[e + 1]])
        ys = ys.index_select(0, torch.argsort(order)).view(N, A, -1)  # back to [N, A, D]
        return (weights[..., None] * ys).sum(1)

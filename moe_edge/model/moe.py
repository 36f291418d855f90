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
    """Where one MoE layer's routed experts live, and how they are run.

    `experts_for(ids)` yields `(expert id, callable)` for every id, in whatever order they
    become available (prefill: the block groups tokens by expert); an offloading provider
    yields cached experts first and the rest as their loads land. With `hold` (no more ids
    than slots) every yielded expert stays valid until the iterator is closed, without it
    only until the next one is asked for. `apply(inputs, ids)` (decode: one token, k
    experts) returns `[A, D]`, row a being expert `ids[a]` applied to the input; how the
    experts are batched is the provider's business. `start(ids)` (decode) comes first, as
    soon as the router has picked them: a provider that loads experts starts the missing
    ones, so the loads overlap the shared experts the block computes before `apply`.
    `routing` (prefill: `[N, A]`, the experts each token picked, in token order) lets a
    caching provider leave resident what the tokens after these are likely to use.
    """

    def experts_for(self, ids: Iterable[int], hold: bool = False,
                    routing: torch.Tensor | None = None) -> Iterator[tuple[int, Expert]]: ...

    def start(self, ids: list[int]) -> None: ...

    def apply(self, inputs: "ExpertInput", ids: list[int]) -> torch.Tensor: ...


class ResidentExperts(nn.ModuleList):
    """Every routed expert of one layer held in memory; names stay `experts.{e}.*_proj`."""

    def __init__(self, config: ModelConfig):
        super().__init__(MLP(config.hidden_size, config.moe_intermediate_size)
                         for _ in range(config.num_experts))

    def experts_for(self, ids: Iterable[int], hold: bool = False,
                    routing: torch.Tensor | None = None) -> Iterator[tuple[int, Expert]]:
        for e in ids:  # resident: valid for good, held or not
            yield e, self[e]

    def start(self, ids: list[int]) -> None:
        pass  # resident: nothing to load

    def apply(self, inputs: "ExpertInput", ids: list[int]) -> torch.Tensor:
        return torch.cat([inputs(self[e]) for e in ids])  # [A, D]


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

    def __init__(self, x: torch.Tensor, cast: dict | None = None):
        self.x, self.cast = x, cast if cast is not None else {}  # cast: {dtype: x in it}, made already

    def __call__(self, expert: Expert, rows: torch.Tensor | None = None) -> torch.Tensor:
        """expert(x[rows]), in x's dtype or in the expert's kernel dtype."""
        dtype = getattr(expert, "kernel_dtype", None)
        if dtype is None:
            return expert(self.x if rows is None else self.x[rows])
        x = self.as_dtype(dtype)
        return expert.run(x if rows is None else x[rows], self.x.dtype)

    def as_dtype(self, dtype: torch.dtype) -> torch.Tensor:
        """The input in `dtype`, cast at most once per layer."""
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
        weights = weights if weights.dtype == x.dtype else weights.to(x.dtype)
        inputs = ExpertInput(flat)
        picked = ids.tolist()[0] if flat.shape[0] == 1 else None  # decode: the k experts
        if picked is not None:
            self.experts.start(picked)  # their loads overlap the shared experts
        shared = self.shared(inputs, x.dtype)
        if picked is not None:
            ys = self.experts.apply(inputs, picked).to(flat.dtype)  # [A, D]
            out = (weights.view(-1, 1) * ys).sum(0, keepdim=True)
        else:
            out = self.routed(inputs, weights, ids)
        return (out if shared is None else out + shared).view(shape)

    def shared(self, inputs: ExpertInput, dtype: torch.dtype) -> torch.Tensor | None:
        if self.shared_experts is None:
            return None
        shared = inputs(self.shared_experts).to(dtype)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(inputs.x)) * shared
        return shared

    def routed(self, inputs: ExpertInput, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Group tokens by expert: one call per active expert on all of its tokens.

        Outputs land in a buffer with one row per (token, slot) and are summed over the k
        slots in a fixed order, so the result does not depend on the order experts arrive
        in (an offloading provider yields cached ones first). No scatter-add: on the CPU
        `index_add_` costs milliseconds per call once another process competes for a core.
        """
        N, A = ids.shape
        flat = inputs.x
        flat_ids = ids.reshape(-1)  # [N*A]
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.gate.weight.shape[0])
        starts = [0] + counts.cumsum(0).tolist()
        token_of = order // A  # [N*A] token row of each sorted assignment
        ys = flat.new_empty(N * A, flat.shape[1])  # [N*A, D] in expert order
        active = [e for e, c in enumerate(counts.tolist()) if c]
        for e, expert in self.experts.experts_for(active, routing=ids):
            ys[starts[e]:starts[e + 1]] = inputs(expert, token_of[starts[e]:starts[e + 1]])
        ys = ys.index_select(0, torch.argsort(order)).view(N, A, -1)  # back to [N, A, D]
        return (weights[..., None] * ys).sum(1)

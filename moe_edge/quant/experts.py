"""A MoE layer's int4 experts on one decode row, run together: the providers' `apply`.

The MoE block asks its provider for "experts ids applied to this input" (model.moe); for
int4 experts the provider answers through `apply_together`, which hands the experts that
can share ops to `qlinear.run_experts` (silu, product and cast once for all k, each down
projection on its own row: bit for bit each expert alone). An offloading provider computes
each expert's gate+up row as it arrives, overlapping the loads still in flight; a resident
one has them all at once and runs them in one call.
"""
# A=active experts per token (top-k), D=hidden, I=expert width

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..model.moe import Expert, ExpertInput, ResidentExperts
from .qlinear import gate_up_row, run_experts, runs_together


def apply_together(arriving: Iterator[tuple[int, Expert]], inputs: ExpertInput, ids: list[int],
                   on_arrival: bool) -> torch.Tensor:
    """[A, D], row a from expert ids[a] on `inputs` (one row), for the experts `arriving`
    hands over (held until the iterator is closed, which this does). Experts that are not
    int4 or cannot share run_experts' ops run whole on arrival. `on_arrival`: compute each
    int4 expert's gate+up row when it is handed over (worth it while loads are in flight)."""
    slot = {e: i for i, e in enumerate(ids)}
    ys, split, rows, first = [inputs.x] * len(ids), {}, {}, None
    try:
        for _ in ids:  # not to exhaustion: a finished iterator lets its experts go
            e, expert = next(arriving)
            first = first or expert.kernel_dtype  # experts run together share a kernel dtype
            if first and expert.kernel_dtype == first and runs_together(expert, len(ids)):
                split[slot[e]] = expert
                if on_arrival:
                    rows[slot[e]] = gate_up_row(expert, inputs.as_dtype(first))
            else:
                ys[slot[e]] = inputs(expert)  # [1, D]
        if split:
            order = sorted(split)
            done = run_experts([split[i] for i in order], inputs.as_dtype(first), inputs.x.dtype,
                               [rows[i] for i in order] if on_arrival else None)
            if len(order) == len(ids):
                return done  # all of them, in slot order
            for i, y in zip(order, done.split(1)):
                ys[i] = y
    finally:
        arriving.close()
    return torch.cat(ys)


class QuantResidentExperts(ResidentExperts):
    """Resident experts whose int4 ones run together at decode (see apply_together)."""

    def apply(self, inputs: ExpertInput, ids: list[int]) -> torch.Tensor:
        return apply_together(self.experts_for(sorted(ids), hold=True), inputs, ids, on_arrival=False)


def use_quant_experts(model: nn.Module) -> int:
    """Give every resident MoE layer the int4 decode path. -> count."""
    layers = [m for m in model.modules() if type(m) is ResidentExperts]
    for experts in layers:
        experts.__class__ = QuantResidentExperts
    return len(layers)

"""Filling the slow tier from a checkpoint: each routed expert converted once to its kernel
layout (on the fast device, since CUDA's int4 layout is made there) and written to the store."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model.layers import MLP
from ..model.weights import WeightMap
from ..quant.format import QuantConfig
from ..quant.load import read_gptq
from ..quant.qlinear import QuantLinear
from .store import PAGE, PROJECTIONS, DiskStore, ExpertLayout, RamStore, pack_expert


def expert_module(weights: WeightMap, config: ModelConfig, quant: QuantConfig | None, layer: int,
                  expert: int, device: torch.device, dtype: torch.dtype, kernel: str) -> MLP:
    """One routed expert, resident on `device`, in the kernels' layout."""
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    with torch.device("meta"):
        module = MLP(config.hidden_size, config.moe_intermediate_size)
    for proj in PROJECTIONS:
        meta: nn.Linear = getattr(module, proj)
        name = f"{prefix}.{proj}"
        if quant is not None and f"{name}.qweight" in weights:
            tensors = read_gptq(weights, name, quant, meta)
            setattr(module, proj, QuantLinear.from_gptq(tensors, quant.v2, device, dtype, kernel))
            continue
        w = weights.get(f"{name}.weight")
        if tuple(w.shape) != tuple(meta.weight.shape):
            raise CheckpointError(f"{weights.reader.folder}: tensor {name}.weight has shape "
                                  f"{list(w.shape)}, expected {list(meta.weight.shape)}")
        meta.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    return module


def build_store(weights: WeightMap, config: ModelConfig, quant: QuantConfig | None,
                device: torch.device, dtype: torch.dtype, kernel: str, slow_tier: str,
                offload_dir: str | Path | None = None):
    """-> (store, layouts {(layer, expert): layout}, index_of)."""
    moe_ids = config.moe_layer_ids
    E = config.num_experts
    index_of = lambda layer, expert: moe_ids.index(layer) * E + expert  # noqa: E731
    first_layout, first = pack_expert(expert_module(weights, config, quant, moe_ids[0], 0, device, dtype, kernel))
    slack = 3 * 8 * max(config.hidden_size, config.moe_intermediate_size) if quant and quant.desc_act else 0
    stride = -(-(first.numel() + slack) // PAGE) * PAGE  # room for an act-order permutation
    count = len(moe_ids) * E
    if slow_tier == "disk":
        folder = Path(offload_dir) if offload_dir else Path(tempfile.gettempdir())
        store = DiskStore(folder / f"moe-edge-experts-{id(weights):x}.bin", stride, count)
    else:
        store = RamStore(stride, count, pin=device.type == "cuda")
    layouts: dict[tuple[int, int], ExpertLayout] = {}
    for layer in moe_ids:
        for e in range(E):
            layout, buf = (first_layout, first) if (layer, e) == (moe_ids[0], 0) else pack_expert(
                expert_module(weights, config, quant, layer, e, device, dtype, kernel))
            if buf.numel() > stride:
                raise CheckpointError(f"expert {e} of layer {layer} needs {buf.numel()} bytes, more "
                                      f"than the {stride} of the first expert; experts of one model "
                                      "must have the same shapes")
            store.write(index_of(layer, e), buf)
            layouts[(layer, e)] = layout
        weights.reader.release()  # unmap what this layer's experts touched
    if slow_tier == "disk":
        store.finish_writing()
    return store, layouts, index_of

"""Building a model from a GPTQ checkpoint: each quantised Linear becomes a QuantLinear."""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..errors import CheckpointError
from ..memory import trim_heap
from ..model.weights import WeightMap
from .format import GPTQTensors, QuantConfig, check_tensors
from .qlinear import QuantLinear

PARTS = ("qweight", "qzeros", "scales", "g_idx")
_LAYER = re.compile(r"model\.layers\.\d+\.")


def quantized_prefixes(weights: WeightMap) -> list[str]:
    return sorted(n[: -len(".qweight")] for n in weights.sources if n.endswith(".qweight"))


def read_gptq(weights: WeightMap, prefix: str, cfg: QuantConfig, module: nn.Linear) -> GPTQTensors:
    where = str(weights.reader.folder)
    parts = {}
    for part in PARTS:
        name = f"{prefix}.{part}"
        if name in weights:
            parts[part] = weights.get(name)
        elif part == "g_idx" and not cfg.desc_act:  # some writers omit it without act-order
            size = module.in_features if cfg.group_size == -1 else cfg.group_size
            parts[part] = torch.arange(module.in_features, dtype=torch.int32) // size
        else:
            raise CheckpointError(f"{where}: tensor {name!r} is missing; a GPTQ layer needs "
                                  "qweight, qzeros, scales and g_idx")
    bias = weights.get(f"{prefix}.bias") if module.bias is not None else None
    tensors = GPTQTensors(**parts, bias=bias)
    check_tensors(prefix, tensors, module.in_features, module.out_features, cfg, where)
    return tensors


def install_quantized(model: nn.Module, weights: WeightMap, cfg: QuantConfig,
                      device: torch.device, dtype: torch.dtype, kernel: str = "auto",
                      skip: Callable[[str], bool] = lambda prefix: False) -> set[str]:
    """Replace every Linear that the checkpoint stores quantised (except those `skip` names,
    e.g. offloaded experts); returns the model tensor names they cover."""
    consumed, layer = set(), None
    for prefix in quantized_prefixes(weights):
        if skip(prefix + "."):
            continue
        this = _LAYER.match(prefix)
        if this and this[0] != layer:  # a new layer begins:
            layer = this[0]
            weights.reader.release()  # unmap the last one's pages and
            trim_heap()  # return its conversion temporaries, so peak memory stays near the model
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            what = "a router" if prefix.endswith("mlp.gate") else "not a Linear layer"
            raise CheckpointError(f"{weights.reader.folder}: {prefix}.qweight is quantized but "
                                  f"{prefix} is {what} in this model; moe-edge keeps routers, "
                                  "norms and embeddings in 16 bits - re-quantize without it")
        tensors = read_gptq(weights, prefix, cfg, module)
        model.set_submodule(prefix, QuantLinear.from_gptq(tensors, cfg.v2, device, dtype, kernel))
        consumed |= {f"{prefix}.{p}" for p in (*PARTS, "weight", "bias")}
    return consumed


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many quantised layers run on each kernel, e.g. {'int4-cpu': 130, 'dequant': 2}."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts

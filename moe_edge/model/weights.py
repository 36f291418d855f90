"""Checkpoint names -> the model's names, in one place, and loading weights into a model.

The model keeps Hugging Face / DeepSeek names (`model.layers.{l}.mlp.experts.{e}.gate_proj`,
`mlp.shared_experts`, `mlp.gate`). Each family's spellings are translated by one function
below; experts stored fused as 3-D tensors are sliced per expert without reading the rest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..checkpoint import CheckpointReader
from ..config import ModelConfig
from ..errors import CheckpointError
from .layers import stays_bf16

# Tensors some writers include that carry no weights (recomputed rotary frequencies).
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
# transformers 5 in-memory layout some tools save: [E, 2I, D] gate then up, and [E, D, I].
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
# A routed expert's tensors, in the model's names (every family is renamed to this).
EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")


def _deepseek(name: str) -> str:
    return name


def _qwen2_moe(name: str) -> str:
    return name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")


MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _mixtral(name: str) -> str:
    name = name.replace(".block_sparse_moe.", ".mlp.")
    return re.sub(r"(\.experts\.\d+\.)(w[123])\.", lambda m: m[1] + MIXTRAL_PROJ[m[2]] + ".", name)


RENAME: dict[str, Callable[[str], str]] = {
    "deepseek": _deepseek, "qwen2_moe": _qwen2_moe, "qwen3_moe": _deepseek,
    "mixtral": _mixtral, "olmoe": _deepseek,
}


@dataclass(frozen=True)
class Source:
    """Where one model tensor comes from: a checkpoint tensor, or a slice of a fused one."""

    name: str
    expert: int | None = None
    rows: tuple[int, int] | None = None


class WeightMap:
    """Model tensor name -> its source in a checkpoint; reads one tensor at a time.

    >>> wm = WeightMap(CheckpointReader(path), config)
    >>> wm.get("model.layers.1.mlp.experts.5.up_proj.weight")
    """

    def __init__(self, reader: CheckpointReader, config: ModelConfig):
        self.reader, self.config = reader, config
        rename = RENAME[config.model_type]
        self.sources: dict[str, Source] = {}
        for ckpt_name in reader.keys():
            if _IGNORED.match(ckpt_name):
                continue
            fused = _FUSED.match(rename(ckpt_name))
            if fused:
                self._add_fused(ckpt_name, fused[1], fused[2])
            else:
                self.sources[rename(ckpt_name)] = Source(ckpt_name)

    def _add_fused(self, ckpt_name: str, prefix: str, kind: str) -> None:
        width = self.config.moe_intermediate_size
        for e in range(self.reader.shape(ckpt_name)[0]):
            if kind == "down_proj":
                self.sources[f"{prefix}.{e}.down_proj.weight"] = Source(ckpt_name, e)
            else:
                self.sources[f"{prefix}.{e}.gate_proj.weight"] = Source(ckpt_name, e, (0, width))
                self.sources[f"{prefix}.{e}.up_proj.weight"] = Source(ckpt_name, e, (width, 2 * width))

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of model tensor `name` without reading it."""
        src = self.sources[name]
        shape = list(self.reader.shape(src.name))
        if src.expert is not None:
            shape = shape[1:]
        if src.rows is not None:
            shape[0] = src.rows[1] - src.rows[0]
        return tuple(shape)

    def get_source(self, name: str) -> Source:
        src = self.sources.get(name)
        if src is None:
            raise CheckpointError(f"{self.reader.folder}: tensor {name!r} is missing from the "
                                  f"checkpoint (model_type {self.config.model_type!r})")
        return src

    def get(self, name: str) -> torch.Tensor:
        src = self.get_source(name)
        if src.expert is None:
            return self.reader.get(src.name)
        part = self.reader.get_expert(src.name, src.expert)  # reads only expert e's slice
        return part if src.rows is None else part[src.rows[0]:src.rows[1]]


FLOAT_STORED = (torch.float16, torch.bfloat16, torch.float32)  # what a float weight may be stored as


def check_values(where, name: str, tensor: torch.Tensor, allowed=FLOAT_STORED) -> None:
    """A tensor's stored dtype is one its role allows (an int8 tensor is never cast into a
    float weight), and its values are finite: one aminmax pass (NaN and +-inf reach the
    ends), ~11 GB/s on bf16 here, where isfinite().all() runs at ~0.3 GB/s."""
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise CheckpointError(f"{where}: tensor {name!r} is stored as "
                              f"{str(tensor.dtype).removeprefix('torch.')}, but it must be {names}; "
                              "the file is corrupt or not the checkpoint config.json describes")
    if tensor.is_floating_point() and tensor.numel():
        lo, hi = torch.aminmax(tensor)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CheckpointError(f"{where}: tensor {name!r} has NaN or infinite values; the "
                                  "checkpoint is corrupt - download it again")


def expected_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's own tensors by name, tied weights listed once."""
    seen, out = set(), {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def load_weights(model: nn.Module, weights: WeightMap, consumed: set[str] = frozenset(),
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 prefix: str = "", keep16: bool = False) -> None:
    """Fill every parameter of `model` (possibly on the meta device) from `weights`.

    Checks each shape against the config, and that the checkpoint has no tensors the model
    does not understand (a sign of a config that does not match the weights). `consumed`
    names tensors another loader (the GPTQ one) already placed. With `prefix` (e.g.
    "model.layers.3."), `model` is that part of the whole model: one layer, read alone.
    With `keep16`, bf16 weights of the kinds and sizes that stay bf16 (`layers.stays_bf16`)
    are loaded as they are, never widened to `dtype` (on DeepSeek-MoE-16B the embeddings and
    lm_head would take 1.7 GB of fp32); `layers.keep_bf16` then gives their modules the bf16
    classes.
    """
    params = expected_tensors(model)
    for local, param in params.items():
        name = prefix + local
        if name in consumed:
            continue
        tensor = weights.get(name)
        check_shape(weights, name, tuple(tensor.shape), tuple(param.shape))
        check_values(weights.reader.file_of(weights.sources[name].name), name, tensor)
        kept = keep16 and tensor.dtype == torch.bfloat16 and _stays_bf16(model, local, tensor)
        value = tensor.to(device=device, dtype=torch.bfloat16 if kept else dtype)
        if value.data_ptr() == tensor.data_ptr():  # no copy made: still the file's memory map,
            value = value.clone()  # whose clean pages the OS may drop and re-read under pressure
        _assign(model, local, value)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if prefix:
        return
    check_unused(weights, set(params) | set(consumed))


def check_shape(weights: WeightMap, name: str, shape: tuple, expected: tuple) -> None:
    if shape != expected:
        raise CheckpointError(
            f"{weights.reader.file_of(weights.sources[name].name)}: tensor {name!r} has shape "
            f"{list(shape)}, but config.json implies {list(expected)}; the weights and "
            "config.json do not belong together")


def check_unused(weights: WeightMap, used: set[str]) -> None:
    """No checkpoint tensor the model does not use (a config that does not match the weights)."""
    unknown = sorted(set(weights.sources) - used - {"lm_head.weight"})
    if unknown:
        raise CheckpointError(f"{weights.reader.folder}: tensors the model does not use, e.g. "
                              f"{unknown[0]!r} ({len(unknown)} in all); is config.json's "
                              "model_type right for these weights?")


def _stays_bf16(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    module_name, _, attr = name.rpartition(".")
    return attr == "weight" and stays_bf16(type(model.get_submodule(module_name)), tensor.numel())


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))

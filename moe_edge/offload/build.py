"""Filling the slow tier from a checkpoint: each routed expert converted once to its kernel
layout (on the fast device, since CUDA's int4 layout is made there) and written to the store."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..memory import trim_heap
from ..model import layers
from ..model.layers import MLP, keep_bf16
from ..model.weights import WeightMap, load_weights
from ..quant.format import QuantConfig
from ..quant.load import read_gptq
from ..quant.qlinear import QuantLinear, use_quant_mlps
from .store import PAGE, PROJECTIONS, DiskStore, Entry, ExpertLayout, RamStore, pack_expert

STORE_VERSION = 3  # bump when the on-disk expert layout changes (2: bf16 "dense16"; 3: fused gate_up)


def expert_module(weights: WeightMap, config: ModelConfig, quant: QuantConfig | None, layer: int,
                  expert: int, device: torch.device, dtype: torch.dtype, kernel: str,
                  keep16: bool = False) -> MLP:
    """One routed expert, resident on `device`, in the kernels' layout; with `keep16` its
    bf16 weights stay bf16, as `api.load_model` keeps a resident expert's."""
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    with torch.device("meta"):
        module = MLP(config.hidden_size, config.moe_intermediate_size)
    for proj in PROJECTIONS:
        name = f"{prefix}.{proj}"
        if quant is not None and f"{name}.qweight" in weights:
            tensors = read_gptq(weights, name, quant, getattr(module, proj))
            setattr(module, proj, QuantLinear.from_gptq(tensors, quant.v2, device, dtype, kernel))
    # the 16-bit projections (a QuantLinear has no parameters, so it is skipped)
    load_weights(module, weights, device=device, dtype=dtype, prefix=prefix + ".", keep16=keep16)
    if keep16:
        keep_bf16(module, dtype)
    use_quant_mlps(module)  # as api._finish does for resident experts: fused where exact
    return module


def build_store(weights: WeightMap, config: ModelConfig, quant: QuantConfig | None,
                device: torch.device, dtype: torch.dtype, kernel: str, slow_tier: str,
                offload_dir: str | Path | None = None, keep16: bool = False):
    """-> (store, layouts {(layer, expert): layout}, index_of).

    A disk store is a cache: it lives in `offload_dir` (default $MOE_EDGE_CACHE or
    ~/.cache/moe-edge/experts) under a fingerprint of the checkpoint files and the kernel
    settings, and a later load with the same fingerprint reuses it instead of converting
    every expert again (minutes for a 16B model).
    """
    moe_ids = config.moe_layer_ids
    index_of = lambda layer, expert: moe_ids.index(layer) * config.num_experts + expert  # noqa: E731
    if slow_tier == "disk":
        folder = Path(offload_dir or os.environ.get("MOE_EDGE_CACHE") or Path.home() / ".cache" / "moe-edge" / "experts")
        folder = folder / fingerprint(weights.reader.folder, device, dtype, kernel, keep16)
        cached = _open_cached(folder)
        if cached is not None:
            return (*cached, index_of)
    store, layouts = _convert(weights, config, quant, device, dtype, kernel, slow_tier,
                              folder if slow_tier == "disk" else None, index_of, keep16)
    return store, layouts, index_of


def _convert(weights, config, quant, device, dtype, kernel, slow_tier, folder, index_of, keep16):
    """Every routed expert to its kernel layout, written to a new store."""
    moe_ids, E = config.moe_layer_ids, config.num_experts
    module = lambda l, e: expert_module(weights, config, quant, l, e, device, dtype, kernel, keep16)  # noqa: E731
    first_layout, first = pack_expert(module(moe_ids[0], 0))
    slack = 3 * 8 * max(config.hidden_size, config.moe_intermediate_size) if quant and quant.desc_act else 0
    stride = -(-(first.numel() + slack) // PAGE) * PAGE  # room for an act-order permutation
    count = len(moe_ids) * E
    if folder is not None:
        store = DiskStore(folder / "experts.bin.partial", stride, count)
    else:
        store = RamStore(stride, count, pin=device.type == "cuda")
    layouts: dict[tuple[int, int], ExpertLayout] = {}
    for layer in moe_ids:
        for e in range(E):
            layout, buf = (first_layout, first) if (layer, e) == (moe_ids[0], 0) else pack_expert(module(layer, e))
            if buf.numel() > stride:
                raise CheckpointError(f"expert {e} of layer {layer} needs {buf.numel()} bytes, more "
                                      f"than the {stride} of the first expert; experts of one model "
                                      "must have the same shapes")
            store.write(index_of(layer, e), buf)
            layouts[(layer, e)] = layout
        weights.reader.release()  # unmap what this layer's experts touched
        trim_heap()  # and give back the conversion temporaries
    if folder is not None:
        store.finish_writing()
        store.rename(folder / "experts.bin")
        _save_layouts(folder, stride, count, layouts)  # written last: marks the store complete
    return store, layouts


def fingerprint(model: Path, device: torch.device, dtype: torch.dtype, kernel: str,
                keep16: bool = False) -> str:
    """Changes when the checkpoint files or the conversion settings change."""
    bf16 = keep16 and layers.BF16_MIN_LINEAR  # which weights stay bf16
    h = hashlib.sha256(f"{STORE_VERSION}|{Path(model).resolve()}|{device.type}|{dtype}|{kernel}|{bf16}".encode())
    for f in sorted(Path(model).glob("*.safetensors")) + [Path(model) / "config.json"]:
        st = f.stat()
        h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _save_layouts(folder: Path, stride: int, count: int, layouts: dict) -> None:
    items = [[l, e, [[x.name, str(x.dtype).removeprefix("torch."), list(x.shape), x.offset] for x in lay.entries],
              [list(spec) for spec in lay.specs], lay.nbytes, list(lay.projections)]
             for (l, e), lay in sorted(layouts.items())]
    tmp = folder / "layouts.json.tmp"
    tmp.write_text(json.dumps({"version": STORE_VERSION, "stride": stride, "count": count, "experts": items}))
    os.replace(tmp, folder / "layouts.json")


def _open_cached(folder: Path):
    try:
        raw = json.loads((folder / "layouts.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if raw.get("version") != STORE_VERSION or not (folder / "experts.bin").exists():
        return None
    layouts = {(l, e): ExpertLayout(tuple(Entry(n, getattr(torch, d), tuple(s), o) for n, d, s, o in entries),
                                    tuple(tuple(spec) for spec in specs), nbytes, tuple(projections))
               for l, e, entries, specs, nbytes, projections in raw["experts"]}
    return DiskStore(folder / "experts.bin", raw["stride"], raw["count"], create=False), layouts

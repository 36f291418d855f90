"""What a checkpoint is and where it would go, read from its headers without loading it:
parameters (total and active per token), bytes per expert, quantization, the memory plan.

>>> info = model_info("deepseek-moe-16b-chat-gptq-w4g128", expert_cache="4GB")
>>> info.active_params / 1e9, info.plan.slots_per_layer
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import cpu
from .checkpoint import CheckpointReader
from .config import load_config
from .errors import ConfigError
from .model import layers
from .model import MoEForCausalLM
from .model.weights import EXPERT, WeightMap, check_shape, check_unused, expected_tensors
from .offload.plan import OffloadPlan, kv_cache_bytes, kv_start_bytes, make_plan
from .quant.format import read_quant_config
from .quant.load import PARTS
from .quant.int8 import head_in_int8

_QUANT_AUX = (".qzeros", ".scales", ".g_idx")
_ROUTER = ".gate.weight"  # a router's weight: stays fp32 (norms and biases are 1-D)


def keeps_bf16(device: torch.device, dtype: torch.dtype, bf16_weights: bool | None = None) -> bool:
    """Whether a load keeps the checkpoint's bf16 weights in bf16 (see model.layers.keep_bf16):
    on the CPU with fp32 activations, by default when the CPU has native bf16."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    return cpu.native_bf16() if bf16_weights is None else bf16_weights


def kv_dtype(dtype: torch.dtype, keep16: bool) -> torch.dtype:
    """The KV cache's dtype: bf16 for a 16-bit or 4-bit checkpoint on a CPU with native bf16
    (`keep16`; no exact dtype named) where moe-edge's kernel attends over it
    (quant.native.decode_attention); an fp32 checkpoint keeps an fp32 cache."""
    from .quant import native
    return torch.bfloat16 if keep16 and native.supported() else dtype


@dataclass
class ModelInfo:
    path: str
    model_type: str
    layers: int
    moe_layers: int
    experts_per_layer: int
    top_k: int
    hidden_size: int
    vocab_size: int
    max_context: int
    total_params: int
    active_params: int  # per token: everything but the routed experts, plus top-k of them
    checkpoint_bytes: int
    dense_bytes: int  # what stays resident, at the runtime dtype
    expert_bytes: int  # one routed expert, at the runtime dtype or as quantized
    active_bytes: int  # weight bytes a decode token reads: one embedding row, top-k experts a layer
    quantization: dict | None
    plan: OffloadPlan | None  # None when the expert cache setting cannot fit top-k
    plan_error: str | None = None
    lm_head_int8: bool = False  # the lm_head becomes int8 at load (see quant.int8.head_in_int8)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = self.plan.to_dict() if self.plan else None
        return d


def model_info(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               expert_cache="auto", context: int = 4096, slow_tier: str | None = None,
               bf16_weights: bool | None = None, lm_head: str = "auto") -> ModelInfo:
    """Sizes from tensor headers (nothing is read but the headers) and the plan
    `load_offloaded` would make for `expert_cache` on `device` (with `bf16_weights` and
    `lm_head` as `load_offloaded` takes them)."""
    path, device = Path(path), torch.device(device)
    config, quant = load_config(path), read_quant_config(path)
    weights = WeightMap(CheckpointReader(path), config)
    check_layout(weights, config, quant)
    total = active = dense = experts_total = checkpoint = read = 0
    kept16 = False  # any weight stays bf16 (a 16-bit checkpoint)
    keep16 = keeps_bf16(device, dtype, bf16_weights)  # as api.load_model decides
    V, D = config.vocab_size, config.hidden_size
    int8 = head_in_int8(lm_head, device, V * D, config.tie_word_embeddings)  # likewise
    for name in weights.sources:
        numel = math.prod(weights.shape(name))
        source = weights.sources[name].name
        stored = numel * weights.reader.itemsize(source)
        params = _params(name, numel, quant.bits if quant else 16)
        runtime = stored if _is_quantized(name) else numel * dtype.itemsize
        if keep16 and _kept16(name, weights.shape(name)) and weights.reader.stored_dtype(source) == "BF16":
            runtime, kept16 = stored, True  # kept bf16: embeddings and large Linear weights
        if int8 and name == "lm_head.weight":
            runtime = numel + 2 * weights.shape(name)[0]  # int8 weights, a bf16 scale per row
        checkpoint += stored
        total += params
        if EXPERT.match(name):
            experts_total += runtime
        else:
            active += params
            dense += runtime
            read += runtime // V if name.endswith("embed_tokens.weight") else runtime
    if int8 and config.tie_word_embeddings and "lm_head.weight" not in weights.sources:
        dense += V * (D + 2)  # tied to the embeddings, which stay: the int8 head is a copy
    L, E, k = len(config.moe_layer_ids), config.num_experts, config.top_k
    expert_bytes = experts_total // (L * E)
    active += (total - active) * k // E
    read += experts_total * k // E
    info = ModelInfo(str(path), config.model_type, config.num_layers, L, E, k, config.hidden_size,
                     config.vocab_size, config.max_position_embeddings, total, active, checkpoint,
                     dense, expert_bytes, read, _quant_summary(quant), None,
                     lm_head_int8=int8 and ("lm_head.weight" in weights.sources or config.tie_word_embeddings))
    context = min(context, config.max_position_embeddings)
    kv_dtype_ = kv_dtype(dtype, kept16 or (keep16 and quant is not None))  # as api._finish
    kv = kv_cache_bytes(config, context, kv_dtype_)
    tier = slow_tier or ("ram" if device.type == "cuda" else "disk")
    try:
        info.plan = make_plan(expert_cache, device=device, slow_tier=tier, resident=dense, kv=kv,
                              kv_start=kv_start_bytes(config, context, kv_dtype_, device),
                              expert_bytes=expert_bytes, moe_layers=L, experts=E, top_k=k)
    except ConfigError as e:
        info.plan_error = str(e)
    return info


def check_layout(weights: WeightMap, config, quant) -> None:
    """What a load would refuse, from the headers alone: a tensor the model needs that is
    missing or shaped other than config.json implies, or one it cannot use."""
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    used = set()
    for name, param in expected_tensors(model).items():
        prefix, _, part = name.rpartition(".")
        qweight = f"{prefix}.qweight"
        if quant is not None and part == "weight" and qweight in weights:
            N, K = param.shape
            check_shape(weights, qweight, weights.shape(qweight), (K * quant.bits // 32, N))
            used |= {f"{prefix}.{p}" for p in PARTS}
            continue
        weights.get_source(name)  # a missing tensor is named as a load names it
        check_shape(weights, name, weights.shape(name), tuple(param.shape))
        used.add(name)
    check_unused(weights, used)


def _kept16(name: str, shape) -> bool:
    """What keep_bf16 keeps in bf16, from the name and shape (routers are 2-D but stay fp32;
    norms and biases are 1-D)."""
    if len(shape) != 2 or name.endswith(_ROUTER):
        return False
    kind = nn.Embedding if name.endswith("embed_tokens.weight") else nn.Linear
    return layers.stays_bf16(kind, math.prod(shape))


def _is_quantized(name: str) -> bool:
    return name.endswith(".qweight") or name.endswith(_QUANT_AUX)


def _params(name: str, numel: int, bits: int) -> int:
    if name.endswith(".qweight"):
        return numel * (32 // bits)  # int32 words of packed weights
    return 0 if name.endswith(_QUANT_AUX) else numel


def _quant_summary(quant) -> dict | None:
    if quant is None:
        return None
    return {"method": quant.quant_method, "bits": quant.bits, "group_size": quant.group_size,
            "sym": quant.sym, "desc_act": quant.desc_act, "format": quant.checkpoint_format}


def physical_cores() -> int:
    import psutil
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")  # what the kernels use


def cpu_name() -> str:
    """The CPU's model name and the x86 vector extensions the kernels choose by, from the
    first processor in Linux's /proc/cpuinfo (elsewhere what the platform module says):
    machines of one kind differ."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0]
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    name = info.get("model name") or platform.processor() or platform.machine()
    if "flags" not in info:  # not x86 (aarch64 lists "Features")
        return name
    return f"{name} ({' '.join(f for f in CPU_FLAGS if f in info['flags'].split()) or 'none of ' + '/'.join(CPU_FLAGS)})"


def machine() -> str:
    """The line every benchmark result carries about where it ran."""
    import platform

    import psutil
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    cpu = cpu_name()
    cpu = "" if cpu == platform.machine() else f"{cpu}, "
    return (f"{platform.machine()}, {cpu}{physical_cores()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}{gpu}")


def devices() -> list[dict]:
    """The CPU and each CUDA GPU with free and total memory."""
    import psutil
    vm = psutil.virtual_memory()
    found = [{"name": "cpu", "description": f"{cpu_name()}, "
              f"{physical_cores()} cores", "free_bytes": vm.available, "total_bytes": vm.total}]
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        found.append({"name": f"cuda:{i}", "description": torch.cuda.get_device_name(i),
                      "free_bytes": free, "total_bytes": total})
    return found

"""Load a checkpoint onto a device and generate from it: the Python API.

>>> import moe_edge
>>> lm = moe_edge.load("deepseek-moe-16b-chat")
>>> print(lm.chat([{"role": "user", "content": "Hello"}]).text)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import CheckpointReader
from .config import ModelConfig, load_config
from .errors import ConfigError
from .memory import onto_huge_pages, trim_heap
from .generation import GenerationResult, PrefixCache, SamplingParams, TextStream, read_generation_config
from .model import MoEForCausalLM
from .info import keeps_bf16, kv_dtype
from .model.layers import keep_bf16, store_transposed
from .model.weights import EXPERT, WeightMap, load_weights
from .offload.policy import DEFAULT as DEFAULT_POLICY
from .quant.format import read_quant_config
from .quant.load import install_quantized, kernel_summary
from .quant.int8 import check_lm_head, head_in_int8, int8_lm_head
from .quant.decode_steps import use_native_steps
from .quant.experts import use_quant_experts
from .quant.qlinear import fuse_qkv, use_quant_mlps
from .quant import native
from .tokenizer import format_chat, load_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: fp32 on CPU (PyTorch's bf16 CPU matmuls are slow, see DESIGN.md), bf16 on GPU."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def exact_when_named(dtype, bf16_weights: bool | None, lm_head: str) -> tuple[bool | None, str]:
    """(bf16_weights, lm_head) for a load: a dtype the caller names is the dtype of every
    weight, as in transformers (no bf16 weights kept, no int8 head unless asked for by
    name); with no dtype the fast mixed defaults stay."""
    if dtype is None or dtype == "auto":
        return bf16_weights, lm_head
    return (False if bf16_weights is None else bf16_weights), ("stored" if lm_head == "auto" else lm_head)


def load_model(path: str | Path, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = None, kernel: str = "auto",
               bf16_weights: bool | None = None, lm_head: str = "auto",
               store_experts: bool = True) -> MoEForCausalLM:
    """The model alone (no tokenizer), every weight resident on `device`.

    GPTQ checkpoints get 4-bit layers; `kernel` is "auto" (int4 where the shape allows,
    else dequantise-then-matmul, reported in `model.quant_kernels`), "int4" or "dequant".
    `bf16_weights`: on the CPU with fp32 activations, embeddings and Linear weights that the
    checkpoint stores in bf16 stay bf16 (see `keep_bf16`): half the memory and bytes per
    token, each matmul's input rounded to bf16. Default: when the CPU has native bf16
    (`cpu.native_bf16`); False upcasts them (exact fp32). `lm_head`: "int8" quantizes a
    16- or 32-bit lm_head to int8 at load, on the CPU (see quant/int8.py): half the bytes per
    token of a bf16 one; "stored" keeps it as the checkpoint has it; "auto" is int8 on a CPU
    with native bf16 for heads of 16M+ weights not tied to the embeddings
    (`quant.int8.head_in_int8`). Naming a `dtype` makes it every weight's (bf16_weights
    False and lm_head "stored" unless given; see exact_when_named).
    `store_experts`: a GPTQ checkpoint's routed experts on the CPU are read from the
    converted expert store that offloading keeps (offload/build.py; written by the first
    load, in $MOE_EDGE_CACHE or ~/.cache/moe-edge) instead of converted at every load.
    """
    bf16_weights, lm_head = exact_when_named(dtype, bf16_weights, lm_head)
    config = load_config(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    check_lm_head(lm_head, device)
    weights = WeightMap(CheckpointReader(path), config)
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    quant = read_quant_config(path)
    keep16 = keeps_bf16(device, dtype, bf16_weights)
    experts = None
    if store_experts and quant is not None and device.type == "cpu" and config.moe_layer_ids:
        from .offload.build import resident_experts
        experts = resident_experts(weights, config, quant, device, dtype, kernel, keep16)
    skip = (lambda p: bool(EXPERT.match(p))) if experts else (lambda p: False)
    consumed = install_quantized(model, weights, quant, device, dtype, kernel, skip=skip) if quant else set()
    held = {}  # layer -> its ResidentExperts, out of the model while load_weights fills the rest
    if experts:
        consumed |= {n for n in weights.sources if EXPERT.match(n)}
        for layer, block in model.moe_blocks().items():
            held[layer], block.experts = block.experts, None
    load_weights(model, weights, consumed, device=device, dtype=dtype, keep16=keep16)
    for layer, block in model.moe_blocks().items():
        if layer in held:
            block.experts = held[layer]
            for e in range(config.num_experts):
                block.experts[e] = experts[(layer, e)]
    _finish(model, quant, dtype, keep16, lm_head, device)
    trim_heap()
    if kernel == "auto" and model.quant_kernels.get("dequant"):
        reasons = sorted({m.reason for m in model.modules() if getattr(m, "kernel", "") == "dequant"})
        warnings.warn(f"{model.quant_kernels['dequant']} quantized layers use the slower "
                      f"dequantize-then-matmul path ({'; '.join(reasons)})", stacklevel=2)
    return model.eval()


def _finish(model: MoEForCausalLM, quant, dtype: torch.dtype, keep16: bool,
            lm_head: str, device: torch.device) -> None:
    """Record the quantization, fuse int4 MLPs and q/k/v, keep bf16 weights bf16, make the
    lm_head int8 where `lm_head` says so (see load_model)."""
    model.quant_config = quant
    model.quant_kernels = kernel_summary(model)
    use_quant_mlps(model)
    use_quant_experts(model)
    fuse_qkv(model)
    model.kept_bf16 = keep_bf16(model, dtype) if keep16 else []
    # a 16-bit or 4-bit checkpoint on a native-bf16 CPU, no exact dtype named: a 16-bit cache
    model.kv_dtype = kv_dtype(dtype, keep16 and (bool(model.kept_bf16) or quant is not None))
    if (model.kv_dtype == torch.bfloat16 and dtype == torch.float32 and device.type == "cpu"
            and model.config.sliding_window is None and native.available()):  # the kernel takes no mask
        for layer in model.model.layers:
            layer.self_attn.decode_kernel = native.decode_attention
    c = model.config
    int8 = head_in_int8(lm_head, device, c.vocab_size * c.hidden_size, c.tie_word_embeddings)
    model.lm_head_int8 = int8 and int8_lm_head(model)
    if not model.lm_head_int8 and not c.tie_word_embeddings:
        store_transposed(model.lm_head)  # an fp32 head: its decode row reads faster
    if device.type == "cpu":  # the weights final (a head replaced above would stay in the mapping)
        onto_huge_pages(model)  # and before the native steps hold them
    use_native_steps(model)


@dataclass
class LoadedModel:
    """A model with its tokenizer and generation defaults; what `load()` and
    `load_offloaded()` return."""

    model: MoEForCausalLM
    tokenizer: object
    path: Path
    defaults: SamplingParams
    offload: "OffloadRuntime | None" = None
    prefix: PrefixCache | None = None  # kept between calls: a prompt that extends the last prefills only the rest

    def offload_stats(self):
        """Hits, misses, prefetches, bytes moved, stall time, per MoE layer (None if resident)."""
        return self.offload.cache.stats() if self.offload else None

    def reset_offload_stats(self) -> None:
        if self.offload:
            self.offload.cache.reset_stats()

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def stream(self, prompt: str | Sequence[int], context: int | None = None,
               **sampling) -> TextStream:
        """Text pieces as they are generated, for a raw prompt (no chat template). The KV
        cache is kept: a next prompt that starts with this one and its reply (a conversation's
        next turn) prefills only what is new."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.prefix = self.prefix or PrefixCache(self.model)
        return TextStream(self.model, self.tokenizer, ids, self.defaults.with_(**sampling), context,
                          cache=self.prefix)

    def generate(self, prompt: str | Sequence[int], context: int | None = None,
                 **sampling) -> GenerationResult:
        """Complete `prompt`; sampling overrides (temperature=0, max_new_tokens=...) optional.

        >>> lm.generate("def fibonacci(n):", temperature=0, max_new_tokens=32).text
        """
        stream = self.stream(prompt, context, **sampling)
        for _ in stream:
            pass
        return stream.result

    def chat_stream(self, messages: Sequence[dict], context: int | None = None,
                    **sampling) -> TextStream:
        return self.stream(format_chat(self.tokenizer, messages), context, **sampling)

    def chat(self, messages: Sequence[dict], context: int | None = None,
             **sampling) -> GenerationResult:
        """The assistant's reply to a conversation, formatted with the chat template."""
        return self.generate(format_chat(self.tokenizer, messages), context, **sampling)


def _with_tokenizer(path: Path, model: MoEForCausalLM, offload=None) -> LoadedModel:
    tokenizer = load_tokenizer(path)
    eos = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    defaults = read_generation_config(path, tuple(sorted(eos)))
    return LoadedModel(model, tokenizer, path, defaults, offload)


@dataclass
class OffloadRuntime:
    """What `load_offloaded` adds to a model: the expert cache, its plan, the prefetcher."""

    cache: object
    plan: object
    prefetcher: object | None

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.remove()
        self.cache.close()
        if hasattr(self.cache.store, "close"):
            self.cache.store.close()


def load_offloaded(path: str | Path, device: str | torch.device = "auto", expert_cache="auto",
                   prefetch_depth: int = 1, prefetch_width: int | None = None,
                   prefetch: str = "auto", policy: str = DEFAULT_POLICY, slow_tier: str = "auto",
                   dtype: str | torch.dtype | None = None, kernel: str = "auto", context: int = 4096,
                   offload_dir: str | Path | None = None, threaded: bool = True, reads: int = 4,
                   bf16_weights: bool | None = None, lm_head: str = "auto") -> LoadedModel:
    """Load a checkpoint with its routed experts offloaded: the dense part resident on
    `device`, a fixed cache of expert slots there (replaced by `policy`: LRFU, recency-weighted
    frequency, by default; see bench/trace.py), the rest in host RAM or on disk,
    the next layers' experts prefetched from router predictions.

    `expert_cache`: "auto" (free memory after the dense part, a KV cache of `context`
    tokens and a margin; on a CPU the KV cache of the first 512 tokens, the slots its growth
    will need lent to the experts and given back as the context grows), a size ("6GB",
    "512MB"), a percentage of the experts ("50%"), or slots per layer (int). `slow_tier`:
    "auto" (pinned RAM for a GPU, disk for the CPU), "ram" or "disk". `prefetch_depth` 0 turns prediction off; `prefetch_width` experts are
    predicted per layer (default top-k; wider raises recall at the cost of bandwidth);
    `prefetch` "auto" lets decode prefetch only while it measures faster than not
    (offload.prefetch.PrefetchGovernor), "always" prefetches every step.
    `bf16_weights` as in `load_model`: a bf16 checkpoint's experts then stay bf16 in the
    store and the slots, half the bytes per load; `lm_head` and a named `dtype` as in
    `load_model`. `reads`: loads in flight at once (worker threads for a disk tier, demand
    loads first; a RAM tier copies into CPU slots on the caller's thread).

    >>> lm = moe_edge.load_offloaded("deepseek-moe-16b-chat-gptq-w4g128", expert_cache="4GB")
    >>> lm.generate("Hello", max_new_tokens=32).text
    >>> lm.offload_stats().total.hit_rate
    """
    from .offload.build import build_store
    from .offload.cache import ExpertCache, KVRoom
    from .offload.plan import available_memory, kv_cache_bytes, kv_start_bytes, make_plan
    from .offload.policy import POLICIES
    from .offload.prefetch import PrefetchGovernor, Prefetcher
    bf16_weights, lm_head = exact_when_named(dtype, bf16_weights, lm_head)
    path = Path(path)
    config = load_config(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if prefetch not in ("auto", "always"):
        raise ConfigError(f"prefetch {prefetch!r} is not supported; use auto or always")
    if policy not in POLICIES:
        raise ConfigError(f"policy {policy!r} is not supported; use one of {', '.join(POLICIES)}")
    slow_tier = ("ram" if device.type == "cuda" else "disk") if slow_tier == "auto" else slow_tier
    if slow_tier not in ("ram", "disk") or (slow_tier == "disk" and device.type != "cpu"):
        raise ConfigError(f"slow tier {slow_tier!r} with device {device.type}: use ram (any "
                          "device) or disk (with device cpu)")
    check_lm_head(lm_head, device)
    available = available_memory(device)  # before the dense part takes its share
    keep16 = keeps_bf16(device, dtype, bf16_weights)
    model, weights, quant = _dense_part(path, config, device, dtype, kernel, keep16, lm_head)
    store, layouts, index_of = build_store(weights, config, quant, device, dtype, kernel,
                                           slow_tier, offload_dir, keep16)
    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    kv = kv_cache_bytes(config, context, model.kv_dtype)
    L, E = len(config.moe_layer_ids), config.num_experts
    plan = make_plan(expert_cache, device=device, slow_tier=slow_tier, resident=resident, kv=kv,
                     kv_start=kv_start_bytes(config, context, model.kv_dtype, device),
                     expert_bytes=store.stride, moe_layers=L, experts=E, top_k=config.top_k,
                     available=available)
    trim_heap()
    # host RAM into CPU slots: a copy on the caller's thread (both cores) beats a worker's
    # (one core, plus a thread handoff per miss): 25 vs 19 tok/s on the 16B-sized demo x3
    # at 35/64 slots, 0.75-0.79 vs 0.66-0.68 of resident on the demo at 50%
    threaded = threaded and not (store.kind == "ram" and device.type == "cpu")
    cache = ExpertCache(store, layouts, index_of, plan.slots_per_layer, device, config.hidden_size,
                        config.moe_intermediate_size, policy, threaded, reads)
    for layer, block in model.moe_blocks().items():
        block.experts = cache.provider(layer)
    if plan.kv_start_bytes is not None:
        model.kv_room = KVRoom(cache, plan.kv_start_bytes, floor=config.top_k)
    governor = PrefetchGovernor() if prefetch == "auto" else None
    prefetcher = None
    if prefetch_depth > 0:
        prefetcher = Prefetcher(model, cache, prefetch_depth, prefetch_width, governor=governor)
    return _with_tokenizer(path, model, OffloadRuntime(cache, plan, prefetcher))


def _dense_part(path: Path, config: ModelConfig, device, dtype, kernel, keep16: bool, lm_head: str):
    """The model without its routed experts, resident on `device`."""
    weights = WeightMap(CheckpointReader(path), config)
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    for block in model.moe_blocks().values():
        del block.experts  # the MoE blocks get an offloading provider instead
        block.experts = None
    quant = read_quant_config(path)
    consumed = install_quantized(model, weights, quant, device, dtype, kernel,
                                 skip=lambda p: bool(EXPERT.match(p))) if quant else set()
    consumed |= {n for n in weights.sources if EXPERT.match(n)}
    load_weights(model, weights, consumed, device=device, dtype=dtype, keep16=keep16)
    _finish(model, quant, dtype, keep16, lm_head, device)
    return model.eval(), weights, quant


def load(path: str | Path, device: str | torch.device = "auto",
         dtype: str | torch.dtype | None = None, bf16_weights: bool | None = None,
         lm_head: str = "auto") -> LoadedModel:
    """Load a Hugging Face MoE checkpoint folder fully resident on `device`.

    >>> lm = moe_edge.load("path/to/deepseek-moe-16b-chat", device="cpu")
    >>> lm.generate("The capital of France is", temperature=0).text
    """
    path = Path(path)
    return _with_tokenizer(path, load_model(path, device, dtype, bf16_weights=bf16_weights,
                                            lm_head=lm_head))


def load_auto(path: str | Path, device: str | torch.device = "auto", expert_cache="auto",
              dtype: str | torch.dtype | None = None, context: int = 4096, **offload) -> LoadedModel:
    """Fully resident when `expert_cache` is "auto" and every expert fits the free memory,
    else `load_offloaded` with the same settings. What `moe-edge chat` uses.

    >>> lm = moe_edge.load_auto("deepseek-moe-16b-chat-gptq-w4g128")
    >>> lm.offload is None  # True when it all fits
    """
    from .info import model_info
    if expert_cache == "auto":
        device_ = resolve_device(device)
        bf16_weights, lm_head = exact_when_named(dtype, offload.get("bf16_weights"), offload.get("lm_head", "auto"))
        info = model_info(path, device_, resolve_dtype(dtype, device_), "auto", context,
                          bf16_weights=bf16_weights, lm_head=lm_head)
        if info.plan is not None and info.plan.slots_at_full_context == info.experts_per_layer:
            return load(path, device, dtype, bf16_weights, lm_head)
    return load_offloaded(path, device, expert_cache, dtype=dtype, context=context, **offload)

"""Write a DeepSeek-MoE, OLMoE or Qwen3-MoE checkpoint (bf16/fp32, or GPTQ) as a GGUF file for llama.cpp.

    write_gguf("moe_edge/demo/deepseek-moe-tiny", "build/tiny-f32.gguf", "F32")
    write_gguf("build/deepseek-16b-synthetic-gptq", "build/16b-q4_0.gguf", "Q4_0")

Follows llama.cpp's own converter (convert_hf_to_gguf.py, `DeepseekModel`, `OlmoeModel`,
`Qwen3MoeModel`, llama.cpp as vendored by llama-cpp-python 0.3.36): architectures `deepseek`,
`olmoe` and `qwen3moe`; routed experts stacked into `ffn_{gate,up,down}_exps` [E, out, in],
DeepSeek's shared experts as one `*_shexp` MLP, q/k norms as `attn_{q,k}_norm`. DeepSeek's q/k
rows are permuted from Hugging Face's rotate-half rotary layout to the adjacent-pair layout of
GGML's NORM rope; OLMoE and Qwen3-MoE use NEOX rope, which is rotate-half, and stay as stored.
GPTQ tensors are dequantised with moe_edge.quant and then quantised again (to Q4_0), so
llama.cpp runs a re-rounding of the same weights.

Streaming: every tensor's shape and type follow from config.json, so the tensor table is
written first and the data one tensor at a time (peak: one layer's stacked experts in fp32).
"""# E=experts, N=out features, K=in features, V=vocab, D=hidden

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from moe_edge.checkpoint import CheckpointReader
from moe_edge.config import ModelConfig, load_config
from moe_edge.memory import trim_heap
from moe_edge.model.weights import WeightMap
from moe_edge.quant.format import QuantConfig, dequantize, read_quant_config
from moe_edge.quant.load import read_gptq

OUT_TYPES = ("F32", "F16", "Q4_0")  # Q4_K_M: llama.cpp's quantizer from F16 (compare_llamacpp.ensure_gguf)


@dataclass
class Entry:
    """One GGUF tensor: its name, logical shape [.., N, K], storage type, and how to read it."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # -> float32 array of `shape`


class Source:
    """fp32 tensors of a checkpoint by model name, dequantising GPTQ Linears on the way."""

    def __init__(self, folder: Path, config: ModelConfig):
        self.weights = WeightMap(CheckpointReader(folder), config)
        self.quant: QuantConfig | None = read_quant_config(folder)

    def tensor(self, name: str) -> np.ndarray:
        return self.weights.get(name).float().numpy()

    def linear(self, prefix: str, n: int, k: int) -> np.ndarray:
        """W [N, K] of the Linear at `prefix`, whether stored plain or as GPTQ."""
        if f"{prefix}.qweight" not in self.weights:
            return self.tensor(f"{prefix}.weight")
        module = SimpleNamespace(in_features=k, out_features=n, bias=None)
        t = read_gptq(self.weights, prefix, self.quant, module)
        return dequantize(t, self.quant.v2).numpy()

    def stacked(self, prefix: str, proj: str, experts: int, n: int, k: int) -> np.ndarray:
        out = np.empty((experts, n, k), dtype=np.float32)  # [E, N, K], filled in place
        for e in range(experts):
            out[e] = self.linear(f"{prefix}.experts.{e}.{proj}", n, k)
        return out

    def release(self) -> None:
        self.weights.reader.release()
        trim_heap()


def rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows (x[i], x[i + d/2]) -> GGML NORM rope's adjacent pairs (x[2i], x[2i+1])."""
    n, k = w.shape
    return w.reshape(heads, 2, n // heads // 2, k).swapaxes(1, 2).reshape(n, k)


def _qtype(name: str, shape: tuple[int, ...], out_type: str):
    """Storage type per tensor, as llama.cpp's quantizer would choose for a Q4_0 file: norms
    and the router stay F32, the output matrix Q8_0 (llama-quantize uses Q6_K, which gguf-py
    cannot write), everything else Q4_0. Rows not a multiple of 32 stay F32."""
    from gguf import GGMLQuantizationType as Q
    if out_type == "F32" or len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    if out_type == "F16":  # the source for llama.cpp's own quantizer, as convert_hf_to_gguf writes
        return Q.F16
    if shape[-1] % 32:
        return Q.F32
    return Q.Q8_0 if name == "output.weight" else Q.Q4_0


def plan(src: Source, c: ModelConfig, out_type: str) -> list[Entry]:
    """Every tensor of the GGUF file in writing order, with a loader for its data."""
    V, D = c.vocab_size, c.hidden_size
    embed = lambda: src.tensor("model.embed_tokens.weight")
    entries = [("token_embd.weight", (V, D), embed),
               ("output_norm.weight", (D,), lambda: src.tensor("model.norm.weight")),
               # always written: olmoe's graph requires it; a tied head is the embedding
               ("output.weight", (V, D), embed if c.tie_word_embeddings else lambda: src.linear("lm_head", V, D))]
    for layer in range(c.num_layers):
        entries += _layer(src, c, layer)
    return [Entry(n, s, _qtype(n, s, out_type), f) for n, s, f in entries]


ARCH = {"deepseek": "deepseek", "olmoe": "olmoe", "qwen3_moe": "qwen3moe"}  # model_type -> llama.cpp's


def _layer(src: Source, c: ModelConfig, layer: int) -> list[tuple]:
    """(GGUF name, shape, loader) for one decoder layer."""
    D, F, I, E = c.hidden_size, c.intermediate_size, c.moe_intermediate_size, c.num_experts
    S, p, b = c.shared_intermediate_size, f"model.layers.{layer}", f"blk.{layer}"
    lin = lambda name, n, k: (lambda: src.linear(f"{p}.{name}", n, k))
    plain = lambda name: (lambda: src.tensor(f"{p}.{name}.weight"))  # read as stored
    entries = [(f"{b}.attn_norm.weight", (D,), plain("input_layernorm")), *_attention(src, c, p, b),
               (f"{b}.ffn_norm.weight", (D,), plain("post_attention_layernorm"))]
    if not c.moe_layers[layer]:
        return entries + [(f"{b}.ffn_gate.weight", (F, D), lin("mlp.gate_proj", F, D)),
                          (f"{b}.ffn_up.weight", (F, D), lin("mlp.up_proj", F, D)),
                          (f"{b}.ffn_down.weight", (D, F), lin("mlp.down_proj", D, F))]
    m = f"{p}.mlp"
    stack = lambda proj, n, k: (lambda: src.stacked(m, proj, E, n, k))
    entries += [
        (f"{b}.ffn_gate_inp.weight", (E, D), plain("mlp.gate")),  # the router, [E, D]
        (f"{b}.ffn_gate_exps.weight", (E, I, D), stack("gate_proj", I, D)),
        (f"{b}.ffn_up_exps.weight", (E, I, D), stack("up_proj", I, D)),
        (f"{b}.ffn_down_exps.weight", (E, D, I), stack("down_proj", D, I)),
    ]
    if S:
        entries += [(f"{b}.ffn_gate_shexp.weight", (S, D), lin("mlp.shared_experts.gate_proj", S, D)),
                    (f"{b}.ffn_up_shexp.weight", (S, D), lin("mlp.shared_experts.up_proj", S, D)),
                    (f"{b}.ffn_down_shexp.weight", (D, S), lin("mlp.shared_experts.down_proj", D, S))]
    return entries


def _attention(src: Source, c: ModelConfig, p: str, b: str) -> list[tuple]:
    """The attention block's tensors: q/k rows permuted for NORM rope (deepseek), q/k norms
    over the whole projection (OLMoE) or per head (Qwen3)."""
    D, Q, KV = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    lin = lambda name, n, k: (lambda: src.linear(f"{p}.{name}", n, k))
    if c.model_type == "deepseek":
        rope = lambda name, n, heads: (lambda: rope_permute(src.linear(f"{p}.{name}", n, D), heads))
        q, k = rope("self_attn.q_proj", Q, c.num_heads), rope("self_attn.k_proj", KV, c.num_kv_heads)
    else:
        q, k = lin("self_attn.q_proj", Q, D), lin("self_attn.k_proj", KV, D)
    entries = [(f"{b}.attn_q.weight", (Q, D), q), (f"{b}.attn_k.weight", (KV, D), k),
               (f"{b}.attn_v.weight", (KV, D), lin("self_attn.v_proj", KV, D)),
               (f"{b}.attn_output.weight", (D, Q), lin("self_attn.o_proj", D, Q))]
    if c.qk_norm:
        full = c.qk_norm == "full"
        norm = lambda name: (lambda: src.tensor(f"{p}.self_attn.{name}.weight"))
        entries += [(f"{b}.attn_q_norm.weight", (Q if full else c.head_dim,), norm("q_norm")),
                    (f"{b}.attn_k_norm.weight", (KV if full else c.head_dim,), norm("k_norm"))]
    return entries


def check_supported(c: ModelConfig) -> int:
    """What llama.cpp's graph for the family computes: for `deepseek`, leading dense layers
    then all-MoE, softmax routing without renormalisation, shared experts; for `olmoe` and
    `qwen3moe`, every layer MoE, no shared expert, renormalised top-k for Qwen3 only; no
    attention biases anywhere. -> the count of leading dense layers."""
    lead = next((i for i, moe in enumerate(c.moe_layers) if moe), c.num_layers)
    problems = []
    if c.model_type not in ARCH:
        problems.append(f"model_type {c.model_type!r} (written: {', '.join(ARCH)})")
    if not all(c.moe_layers[lead:]):
        problems.append("dense layers after the first MoE layer")
    if c.model_type != "deepseek" and lead:
        problems.append("dense layers (llama.cpp's graph has MoE in every layer)")
    renorm = c.model_type == "qwen3_moe"  # what llama.cpp's graph does, fixed per family
    if c.norm_topk_prob != renorm:
        problems.append(f"norm_topk_prob {str(c.norm_topk_prob).lower()} (llama.cpp's "
                        f"{ARCH.get(c.model_type)} graph {'always' if renorm else 'never'} renormalises)")
    if c.qkv_bias or c.o_bias:
        problems.append("attention biases")
    if (c.model_type == "deepseek") != bool(c.shared_intermediate_size) or c.shared_expert_gate:
        problems.append("shared experts" if c.shared_intermediate_size else "no shared experts")
    if c.clip_qkv is not None or c.sliding_window is not None:
        problems.append("clip_qkv or a sliding window")
    if c.model_type == "olmoe" and c.num_heads != c.num_kv_heads:
        problems.append("grouped-query attention (llama.cpp's olmoe sizes k_norm as the hidden size)")
    if problems:
        raise ValueError("cannot write this checkpoint for llama.cpp: " + "; ".join(problems))
    return lead


def _metadata(w, c: ModelConfig, lead: int, out_type: str, name: str) -> None:
    import gguf
    w.add_name(name)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.top_k)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_rope_dimension_count(c.head_dim)
    w.add_key_length(c.head_dim)  # Qwen3's head_dim is not hidden / heads
    w.add_value_length(c.head_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    w.add_vocab_size(c.vocab_size)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if c.model_type == "olmoe":  # its graph sizes the experts by feed_forward_length
        w.add_feed_forward_length(c.moe_intermediate_size)
    else:
        w.add_feed_forward_length(c.intermediate_size)
    if c.model_type == "deepseek":
        w.add_leading_dense_block_count(lead)
        w.add_expert_weights_scale(1.0)
        w.add_expert_shared_count(c.shared_intermediate_size // c.moe_intermediate_size)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[out_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocab(w, folder: Path, c: ModelConfig) -> str:
    """GPT-2 style BPE vocab from tokenizer.json, padded to vocab_size with unused [PADi]
    tokens as llama.cpp's converter does. llama.cpp insists on a merges list: a tokenizer
    without merges (the synthetic byte-level one) gets one placeholder merge."""
    from gguf import TokenType
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{folder / 'tokenizer.json'}: model type {model.get('type')!r}; "
                         "only BPE tokenizers are written")
    tokens = [f"[PAD{i}]" for i in range(c.vocab_size)]
    types = [TokenType.UNUSED] * c.vocab_size
    for text, i in model["vocab"].items():
        if i < c.vocab_size:
            tokens[i], types[i] = text, TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        if added["id"] < c.vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    placeholder = not merges
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges or [f"{tokens[2]} {tokens[3]}"])
    if c.bos_token_id is not None:
        w.add_bos_token_id(c.bos_token_id)
    if c.eos_token_ids:
        w.add_eos_token_id(c.eos_token_ids[0])
    w.add_add_bos_token(False)
    return f"gpt2 BPE, {len(model['vocab'])} tokens + {len(merges)} merges from tokenizer.json" + (
        ", 1 placeholder merge" if placeholder else "") + f", padded to {c.vocab_size}"


def _encode(e: Entry) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize
    data = e.load()
    if tuple(data.shape) != e.shape:
        raise ValueError(f"{e.name}: read shape {list(data.shape)}, config.json implies {list(e.shape)}")
    if e.qtype in (Q.F32, Q.F16):
        return np.ascontiguousarray(data, dtype=np.float32 if e.qtype == Q.F32 else np.float16)
    return quantize(data, e.qtype)


def write_gguf(folder: str | Path, out: str | Path, out_type: str = "Q4_0",
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Write `folder` (a `deepseek`, `olmoe` or `qwen3_moe` checkpoint) to the GGUF file `out`;
    returns a summary."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type {out_type!r}: use one of {', '.join(OUT_TYPES)}")
    folder, out = Path(folder), Path(out)
    c = load_config(folder)
    lead = check_supported(c)
    src = Source(folder, c)
    entries = plan(src, c, out_type)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(tmp, ARCH[c.model_type])
    _metadata(w, c, lead, out_type, folder.name)
    vocab = _vocab(w, folder, c)
    for e in entries:
        nbytes = int(np.prod(quant_shape_to_byte_shape(e.shape, e.qtype)))
        w.add_tensor_info(e.name, e.shape, np.dtype(np.float32), nbytes, raw_dtype=e.qtype)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    layer = None
    for e in entries:
        if e.name.startswith("blk.") and e.name.split(".")[1] != layer:
            layer = e.name.split(".")[1]
            src.release()  # unmap the last layer's shard pages, return its temporaries
            log(f"layer {layer}")
        w.write_tensor_data(_encode(e))
    w.close()
    tmp.replace(out)
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.qtype.name] = counts.get(e.qtype.name, 0) + 1
    return {"gguf": str(out), "bytes": out.stat().st_size, "out_type": out_type,
            "tensor_types": counts, "vocab": vocab, "source_quant": "gptq" if src.quant else "none"}


def active_bytes(path: str | Path, top_k: int, experts: int) -> int:
    """Weight bytes one decode token reads from a GGUF file: everything but the embedding
    table (one row), routed experts at top_k / experts of their size."""
    from gguf import GGUFReader
    total = 0
    for t in GGUFReader(path).tensors:
        if t.name == "token_embd.weight":
            continue
        total += int(t.n_bytes) * top_k // experts if "_exps." in t.name else int(t.n_bytes)
    return total

"""A DeepSeek-MoE (v1) checkpoint as a transformers Qwen2-MoE one computing the same function,
for bench/memlimit.py's accelerate engine: transformers has no class for model_type `deepseek`.

    python bench/as_qwen2moe.py build/demo-16b-x3-gptq build/demo-16b-x3-qwen2moe
    python bench/as_qwen2moe.py moe_edge/demo/deepseek-moe-tiny /tmp/tiny-qwen2moe --dtype float32

The two layers differ only in naming and in the shared expert:

- router: both take a softmax over every expert, then the top k; `norm_topk_prob` carries over;
- dense layers (first_k_dense_replace, moe_layer_freq) become `mlp_only_layers`, of width
  `intermediate_size`;
- DeepSeek's n_shared_experts are one MLP of width n_shared x moe_intermediate_size: Qwen2-MoE's
  `shared_expert`, whose output it scales by sigmoid(shared_expert_gate(x)); the gate is zero
  (sigmoid 0.5) and down_proj doubled, exact in floating point;
- no attention biases (`qkv_bias` false); rope_theta, RMSNorm eps, vocabulary, tying and
  positions as they are.

Routed experts are written fused, as transformers 5 holds them (`experts.gate_up_proj`
[E, 2I, D], gate rows first; `experts.down_proj` [E, D, I]). transformers 5 also loads the
per-expert hub names (`experts.{e}.gate_proj.weight`), but merges them at load, and with disk
offload then writes every merged tensor again into `offload_folder`; the fused names are its
parameters' own, so accelerate offloads them by pointing at this checkpoint's files. Its
loader's safetensors `get_tensor` maps them (safetensors 0.8), so a forward reads the pages of
the experts it indexes (and readahead), not a layer's whole fused tensor.

GPTQ sources are dequantized (act-order g_idx honoured). Weights are written in `--dtype`:
bfloat16 (default) is exact for a bf16 source and rounds a GPTQ source's dequantized weights
(and its fp16 tensors) to bf16. One layer at a time, so memory holds a layer and a shard.
"""
# D=hidden, E=routed experts, I=expert width

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from moe_edge.checkpoint import CheckpointReader, ShardedWriter, stat_signature
from moe_edge.config import ModelConfig, load_config
from moe_edge.model.weights import WeightMap
from moe_edge.quant.format import QuantConfig, dequantize, read_quant_config
from moe_edge.quant.load import PARTS, read_gptq

FORMAT_VERSION = 1
SIDE_FILES = ("tokenizer", "special_tokens", "generation_config", "chat_template")
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


class Weights:
    """The source's Linear and norm weights by module prefix, dequantized where GPTQ; records
    what was read, so that a tensor the mapping has no place for is refused, not dropped."""

    def __init__(self, reader: CheckpointReader, quant: QuantConfig | None, config: ModelConfig):
        self.reader, self.quant, self.used = reader, quant, set()
        self.map = WeightMap(reader, config)  # what the loader reads GPTQ layers through

    def __call__(self, prefix: str) -> torch.Tensor:
        if f"{prefix}.qweight" not in self.reader:
            return self._get(f"{prefix}.weight")
        if self.quant is None:
            raise ValueError(f"{self.reader.folder}: {prefix}.qweight but no quantization_config")
        packed_k, n = self.reader.shape(f"{prefix}.qweight")  # [K/8, N]
        with torch.device("meta"):
            shape = nn.Linear(packed_k * 8, n, bias=False)
        tensors = read_gptq(self.map, prefix, self.quant, shape)  # checked, g_idx filled in where omitted
        self.used.update(f"{prefix}.{p}" for p in PARTS if f"{prefix}.{p}" in self.reader)
        return dequantize(tensors, self.quant.v2)

    def _get(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return self.reader.get(name)

    def check_all_used(self) -> None:
        left = sorted(n for n in self.reader.keys() if n not in self.used and not IGNORED.match(n))
        if left:
            raise ValueError(f"{self.reader.folder}: {len(left)} tensors have no place in Qwen2-MoE "
                             f"({', '.join(left[:3])}, ...)")


def check_convertible(c: ModelConfig) -> None:
    if c.model_type != "deepseek":
        raise ValueError(f"model_type {c.model_type!r}: this converts deepseek checkpoints")
    if c.qkv_bias or c.o_bias:
        raise ValueError("attention_bias: Qwen2-MoE's o_proj has no bias")
    if not c.shared_intermediate_size:
        raise ValueError("n_shared_experts 0: Qwen2-MoE always has a shared expert")
    if c.head_dim * c.num_heads != c.hidden_size:
        raise ValueError(f"head_dim {c.head_dim}: Qwen2-MoE's is hidden_size / num_attention_heads")


def layer_tensors(c: ModelConfig, w: Weights, layer: int, dtype: torch.dtype):
    """(Qwen2-MoE name, tensor) of one decoder layer; the fused experts already in `dtype`."""
    p = f"model.layers.{layer}"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        yield f"{p}.self_attn.{proj}.weight", w(f"{p}.self_attn.{proj}")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        yield f"{p}.{norm}.weight", w(f"{p}.{norm}")
    if not c.moe_layers[layer]:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield f"{p}.mlp.{proj}.weight", w(f"{p}.mlp.{proj}")
        return
    yield f"{p}.mlp.gate.weight", w(f"{p}.mlp.gate")
    for proj in ("gate_proj", "up_proj"):
        yield f"{p}.mlp.shared_expert.{proj}.weight", w(f"{p}.mlp.shared_experts.{proj}")
    yield f"{p}.mlp.shared_expert.down_proj.weight", 2 * w(f"{p}.mlp.shared_experts.down_proj")  # x sigmoid(0)
    yield f"{p}.mlp.shared_expert_gate.weight", torch.zeros(1, c.hidden_size)
    yield from fused_experts(c, w, p, dtype)


def fused_experts(c: ModelConfig, w: Weights, p: str, dtype: torch.dtype):
    """experts.gate_up_proj [E, 2I, D] and experts.down_proj [E, D, I], filled one expert at a time."""
    E, I, D = c.num_experts, c.moe_intermediate_size, c.hidden_size
    gate_up, down = torch.empty(E, 2 * I, D, dtype=dtype), torch.empty(E, D, I, dtype=dtype)
    for e in range(E):
        gate_up[e, :I] = w(f"{p}.mlp.experts.{e}.gate_proj")
        gate_up[e, I:] = w(f"{p}.mlp.experts.{e}.up_proj")
        down[e] = w(f"{p}.mlp.experts.{e}.down_proj")
    yield f"{p}.mlp.experts.gate_up_proj", gate_up
    yield f"{p}.mlp.experts.down_proj", down


def qwen2_moe_config(raw: dict, c: ModelConfig, dtype: torch.dtype, source: dict) -> dict:
    return {
        "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "intermediate_size": c.intermediate_size, "moe_intermediate_size": c.moe_intermediate_size,
        "shared_expert_intermediate_size": c.shared_intermediate_size, "num_experts": c.num_experts,
        "num_experts_per_tok": c.top_k, "norm_topk_prob": c.norm_topk_prob, "qkv_bias": False,
        "mlp_only_layers": [i for i, moe in enumerate(c.moe_layers) if not moe], "decoder_sparse_step": 1,
        "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
        "use_sliding_window": False, "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": raw.get("eos_token_id"), "torch_dtype": str(dtype).removeprefix("torch."),
        "converted_from": source,
    }


def source_record(src: Path, reader: CheckpointReader, dtype: torch.dtype) -> dict:
    """What the output was made from: written into its config.json, compared before reuse."""
    files = hashlib.sha256(stat_signature(reader.files()).encode()).hexdigest()[:16]
    return {"converter": "bench/as_qwen2moe.py", "format_version": FORMAT_VERSION, "model_type": "deepseek",
            "source": str(src.resolve()), "source_files": files, "dtype": str(dtype).removeprefix("torch.")}


def convert(src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the Qwen2-MoE form of deepseek checkpoint `src` to `dst` (replaced atomically)."""
    src, dst = Path(src), Path(dst)
    c = load_config(src)
    check_convertible(c)
    reader = CheckpointReader(src)
    w = Weights(reader, read_quant_config(src), c)
    with ShardedWriter(dst, max_shard_bytes=2**30, overwrite=True) as out:
        out.add("model.embed_tokens.weight", w("model.embed_tokens").to(dtype))
        for layer in range(c.num_layers):
            for name, t in layer_tensors(c, w, layer, dtype):
                out.add(name, t.to(dtype))
            reader.release()  # its pages leave this process's memory (see CheckpointReader.release)
        out.add("model.norm.weight", w("model.norm").to(dtype))
        if not c.tie_word_embeddings:
            out.add("lm_head.weight", w("lm_head").to(dtype))
        w.check_all_used()
        raw = json.loads((src / "config.json").read_text())
        out.write_json("config.json", qwen2_moe_config(raw, c, dtype, source_record(src, reader, dtype)))
        for f in src.iterdir():
            if f.name.startswith(SIDE_FILES):
                out.copy_file(f)
        return out.commit()


def converted(src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """`dst`, converted from `src` unless it already holds this conversion of these files."""
    config = dst / "config.json"
    if config.exists():
        made_from = json.loads(config.read_text()).get("converted_from")
        if made_from == source_record(Path(src), CheckpointReader(src), dtype):
            return dst
    return convert(src, dst, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = ap.parse_args()
    out = converted(args.src, args.dst, getattr(torch, args.dtype))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"src": str(args.src), "dst": str(out), "bytes": size}))


if __name__ == "__main__":
    main()

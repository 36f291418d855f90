"""Write a synthetic GPTQ checkpoint of a real MoE model's exact shape (random weights).

    python bench/synthetic.py OUT [--shape deepseek-16b|qwen3-30b-a3b|olmoe-1b-7b] [--layers N]

Every Linear but the routers and lm_head is 4-bit GPTQ, group 128, symmetric, in the standard
format: random 4-bit values, zero point 8, scales chosen so activations keep unit scale;
norms are ones, routers random. Written one layer at a time, with the family's real config
and tensor names. The weights are meaningless; the shapes, sizes and memory traffic are the
real model's:

- deepseek-16b: DeepSeek-MoE-16B, 28 layers (1 dense), 64 experts of 1408, top-6, 2 shared; ~9 GB.
- qwen3-30b-a3b: Qwen3-30B-A3B, 48 layers, 128 experts of 768, top-8, GQA 32/4, q/k norm; ~16 GB.
- olmoe-1b-7b: OLMoE-1B-7B, 16 layers, 64 experts of 1024, top-8, q/k norm; ~3.7 GB.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moe_edge.checkpoint import ShardedWriter
from moe_edge.config import config_from_dict
from moe_edge.model.decoder import DecoderLayer
from moe_edge.testing import byte_tokenizer

DEEPSEEK_16B = {
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "attention_bias": False,
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "max_position_embeddings": 4096,
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 28, "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "scoring_func": "softmax", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 102400,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "bos_token_id": 0, "eos_token_id": 1, "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 151936,
}
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "attention_bias": False,
    "bos_token_id": 0, "eos_token_id": 1, "clip_qkv": None, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 50304,
}
SHAPES = {"deepseek-16b": DEEPSEEK_16B, "qwen3-30b-a3b": QWEN3_30B_A3B, "olmoe-1b-7b": OLMOE_1B_7B}
GROUP = 128


def random_gptq(out_features: int, in_features: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    groups = -(-in_features // GROUP)  # 10944 = 85.5 groups: the last one is short
    # q uniform in 0..15 around zero 8 has std ~4.6: scale so W has std ~1/sqrt(K)
    scale = 1.0 / (4.6 * in_features ** 0.5)
    return {
        "qweight": torch.randint(-2**31, 2**31 - 1, (in_features // 8, out_features), dtype=torch.int32, generator=gen),
        "qzeros": torch.full((groups, out_features // 8), 0x77777777, dtype=torch.int32),  # zero 8, stored 7
        "scales": torch.full((groups, out_features), scale, dtype=torch.float16),
        "g_idx": (torch.arange(in_features, dtype=torch.int32) // GROUP),
    }


def write(out: Path, layers: int | None = None, shape: str = "deepseek-16b") -> dict:
    base = SHAPES[shape]
    raw = {**base, "num_hidden_layers": layers or base["num_hidden_layers"],
           "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
                                   "sym": True, "checkpoint_format": "gptq", "true_sequential": True,
                                   "damp_percent": 0.01, "lm_head": False}}
    config = config_from_dict(raw)
    gen = torch.Generator().manual_seed(0)
    D, V = config.hidden_size, config.vocab_size
    with ShardedWriter(out, max_shard_bytes=4 * 2**30, overwrite=True) as w:
        w.add("model.embed_tokens.weight", torch.randn(V, D, generator=gen).bfloat16())
        w.add("model.norm.weight", torch.ones(D).bfloat16())
        w.add("lm_head.weight", (torch.randn(V, D, generator=gen) / D ** 0.5).bfloat16())
        for layer in range(config.num_layers):
            with torch.device("meta"):
                module = DecoderLayer(config, layer)
            for name, m in module.named_modules():
                prefix = f"model.layers.{layer}.{name}"
                if isinstance(m, torch.nn.Linear) and not name.endswith("mlp.gate"):
                    for part, t in random_gptq(m.out_features, m.in_features, gen).items():
                        w.add(f"{prefix}.{part}", t)
                    continue
                for pname, p in m.named_parameters(recurse=False):  # norms (ones), routers
                    value = torch.randn(p.shape, generator=gen) / D ** 0.5 if name.endswith("mlp.gate") else torch.ones(p.shape)
                    w.add(f"{prefix}.{pname}", value.bfloat16())
        w.write_json("config.json", raw)
        w.write_json("quantize_config.json", raw["quantization_config"])
        byte_tokenizer().save_pretrained(w.tmp)
        w.commit()
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="deepseek-16b")
    ap.add_argument("--layers", type=int, default=None, help="default: the real model's")
    args = ap.parse_args()
    t0 = time.perf_counter()
    raw = write(Path(args.out), args.layers, args.shape)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(json.dumps({"out": args.out, "shape": args.shape, "layers": raw["num_hidden_layers"], "gib": round(size / 2**30, 2),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

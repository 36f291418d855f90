"""Write a synthetic GPTQ checkpoint of DeepSeek-MoE-16B's exact shape (random weights).

    python bench/synthetic.py OUT [--layers 28]

Every Linear but the routers and lm_head is 4-bit GPTQ, group 128, symmetric, in the standard
format: random 4-bit values, zero point 8, scales chosen so activations keep unit scale.
About 9 GB for the full 28 layers; written one layer at a time. The weights are
meaningless; the shapes, sizes and memory traffic are DeepSeek-MoE-16B's.
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


def write(out: Path, layers: int) -> dict:
    raw = {**DEEPSEEK_16B, "num_hidden_layers": layers,
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
            w.add(f"model.layers.{layer}.input_layernorm.weight", torch.ones(D).bfloat16())
            w.add(f"model.layers.{layer}.post_attention_layernorm.weight", torch.ones(D).bfloat16())
            if config.moe_layers[layer]:
                w.add(f"model.layers.{layer}.mlp.gate.weight",
                      (torch.randn(config.num_experts, D, generator=gen) / D ** 0.5).bfloat16())
        w.write_json("config.json", raw)
        w.write_json("quantize_config.json", raw["quantization_config"])
        byte_tokenizer().save_pretrained(w.tmp)
        w.commit()
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=28)
    args = ap.parse_args()
    t0 = time.perf_counter()
    write(Path(args.out), args.layers)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(json.dumps({"out": args.out, "layers": args.layers, "gib": round(size / 2**30, 2),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

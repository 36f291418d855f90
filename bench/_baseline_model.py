"""Random Qwen2-MoE checkpoints in DeepSeek-MoE's shapes, for bench/offload_baselines.py.

Transformers 5 has no DeepSeek-MoE (v1) class, but a Qwen2-MoE whose `shared_expert_gate` is
zero computes DeepSeek-MoE's layer with the shared expert halved (tests/test_parity.py); both
engines read this one checkpoint, so they run the same model. Written in the hub layout
(`mlp.experts.{e}.gate_proj.weight`, as `save_pretrained` writes it), bf16, one layer at a
time so the writer never holds more than a shard.
"""
# D=hidden, E=routed experts, I=expert width, V=vocab

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_edge.checkpoint import ShardedWriter
from moe_edge.testing import byte_tokenizer

SHAPES = {
    # the demo model's shapes (moe_edge/demo/deepseek-moe-tiny)
    "small": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                  num_experts=64, n_shared_experts=2, num_experts_per_tok=6, num_attention_heads=4,
                  num_hidden_layers=4),
    # DeepSeek-MoE-16B's per-layer shapes; fewer layers (layer 0 dense, the rest MoE)
    "16b": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                num_experts=64, n_shared_experts=2, num_experts_per_tok=6, num_attention_heads=16,
                num_hidden_layers=5),
}


def qwen2_moe_config(shape: dict) -> dict:
    s = dict(shape)
    shared = s.pop("n_shared_experts") * s["moe_intermediate_size"]
    return {
        "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], **s,
        "num_key_value_heads": s["num_attention_heads"], "shared_expert_intermediate_size": shared,
        "norm_topk_prob": False, "qkv_bias": False, "mlp_only_layers": [0], "decoder_sparse_step": 1,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    }


def _linear(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5).bfloat16()  # unit-scale outputs


def _layer(c: dict, layer: int, gen: torch.Generator):
    """(name, tensor) of one decoder layer, in the order a hub checkpoint lists them."""
    D, p = c["hidden_size"], f"model.layers.{layer}"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        yield f"{p}.self_attn.{proj}.weight", _linear(D, D, gen)
    yield f"{p}.input_layernorm.weight", torch.ones(D, dtype=torch.bfloat16)
    yield f"{p}.post_attention_layernorm.weight", torch.ones(D, dtype=torch.bfloat16)
    mlps = [(f"{p}.mlp", c["intermediate_size"])]
    if layer not in c["mlp_only_layers"]:
        I, E = c["moe_intermediate_size"], c["num_experts"]
        yield f"{p}.mlp.gate.weight", _linear(E, D, gen)
        yield f"{p}.mlp.shared_expert_gate.weight", torch.zeros(1, D, dtype=torch.bfloat16)
        mlps = [(f"{p}.mlp.experts.{e}", I) for e in range(E)]
        mlps.append((f"{p}.mlp.shared_expert", c["shared_expert_intermediate_size"]))
    for prefix, width in mlps:
        yield f"{prefix}.gate_proj.weight", _linear(width, D, gen)
        yield f"{prefix}.up_proj.weight", _linear(width, D, gen)
        yield f"{prefix}.down_proj.weight", _linear(D, width, gen)


def write_model(folder: Path, shape: str, seed: int = 0) -> Path:
    """Writes the checkpoint once; a folder with a matching config.json is reused."""
    config = qwen2_moe_config(SHAPES[shape])
    if (folder / "config.json").exists() and json.loads((folder / "config.json").read_text()) == config:
        return folder
    gen = torch.Generator().manual_seed(seed)
    D, V = config["hidden_size"], config["vocab_size"]
    with ShardedWriter(folder, max_shard_bytes=2**30, overwrite=True) as w:
        w.add("model.embed_tokens.weight", torch.randn(V, D, generator=gen).bfloat16())
        for layer in range(config["num_hidden_layers"]):
            for name, t in _layer(config, layer, gen):
                w.add(name, t)
        w.add("model.norm.weight", torch.ones(D, dtype=torch.bfloat16))
        w.add("lm_head.weight", _linear(V, D, gen))
        w.write_json("config.json", config)
        w.write_json("generation_config.json", {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False})
        byte_tokenizer().save_pretrained(w.tmp)  # load_offloaded wants one; the bench feeds ids
        w.commit()
    return folder


def sizes(config: dict, itemsize: int = 4) -> dict:
    """Bytes of the routed experts and of everything else, at `itemsize` bytes a weight."""
    D, I, E = config["hidden_size"], config["moe_intermediate_size"], config["num_experts"]
    moe_layers = config["num_hidden_layers"] - len(config["mlp_only_layers"])
    routed = moe_layers * E * 3 * D * I
    attn = 4 * D * D
    dense_mlp = 3 * D * config["intermediate_size"]
    shared = 3 * D * config["shared_expert_intermediate_size"] + (E + 1) * D
    rest = (2 * config["vocab_size"] * D + config["num_hidden_layers"] * (attn + 2 * D) + D
            + len(config["mlp_only_layers"]) * dense_mlp + moe_layers * shared)
    return {"routed_expert_bytes": routed * itemsize, "dense_bytes": rest * itemsize,
            "one_expert_bytes": 3 * D * I * itemsize, "moe_layers": moe_layers}

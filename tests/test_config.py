import json

import pytest

from moe_edge.config import SUPPORTED_MODEL_TYPES, config_from_dict, load_config
from moe_edge.errors import ConfigError
from moe_edge.testing import deepseek_config

# deepseek-ai/deepseek-moe-16b-chat config.json (the keys that matter, as the hub ships them)
DEEPSEEK_16B = {
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "attention_bias": False,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944,
    "max_position_embeddings": 4096, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 28,
    "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000,
    "scoring_func": "softmax", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 102400, "auto_map": {"AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
}


def test_deepseek_16b():
    c = config_from_dict(DEEPSEEK_16B)
    assert c.moe_layers == (False,) + (True,) * 27
    assert (c.num_experts, c.top_k, c.moe_intermediate_size) == (64, 6, 1408)
    assert c.shared_intermediate_size == 2816 and not c.shared_expert_gate
    assert not c.norm_topk_prob and c.head_dim == 128 and c.eos_token_ids == (100001,)


def test_rope_theta_both_spellings():
    old = config_from_dict(deepseek_config(rope_theta=5e5))
    new_raw = deepseek_config(rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    del new_raw["rope_theta"]
    assert old.rope_theta == config_from_dict(new_raw).rope_theta == 5e5


def test_unsupported_rope_scaling():
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        config_from_dict(deepseek_config(rope_scaling={"type": "yarn", "factor": 4}))


def test_families():
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96)
    qwen2 = config_from_dict({**base, "model_type": "qwen2_moe", "num_experts": 8,
                              "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                              "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2,
                              "mlp_only_layers": [3]})
    assert qwen2.moe_layers == (False, True, False, False) and qwen2.shared_expert_gate
    assert qwen2.qkv_bias and not qwen2.o_bias
    # transformers 5 writes num_local_experts for qwen3_moe; the hub has num_experts
    qwen3 = config_from_dict({**base, "model_type": "qwen3_moe", "num_local_experts": 8,
                              "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 32})
    assert qwen3.num_experts == 8 and qwen3.qk_norm == "head" and qwen3.norm_topk_prob
    assert qwen3.head_dim == 32
    mix = config_from_dict({**base, "model_type": "mixtral", "num_local_experts": 8,
                            "num_experts_per_tok": 2, "sliding_window": None})
    assert mix.norm_topk_prob and mix.moe_intermediate_size == 96 and all(mix.moe_layers)
    olmoe = config_from_dict({**base, "model_type": "olmoe", "num_experts": 64,
                              "num_experts_per_tok": 8, "clip_qkv": 8.0})
    assert olmoe.qk_norm == "full" and olmoe.clip_qkv == 8.0 and olmoe.top_k == 8


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert "'llama'" in str(e.value) and str(tmp_path / "config.json") in str(e.value)
    assert all(t in str(e.value) for t in SUPPORTED_MODEL_TYPES)


def test_missing_field_named(tmp_path):
    raw = deepseek_config()
    del raw["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        load_config(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("num_experts_per_tok", 20, "exceeds the number of experts"),
    ("num_key_value_heads", 3, "multiple of"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
])
def test_invalid_values(field, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(deepseek_config(**{field: value}))

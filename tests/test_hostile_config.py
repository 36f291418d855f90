"""config.json is untrusted input: every bad field is one line naming the file and the field."""

import json

import pytest

from moe_edge.config import load_config
from moe_edge.errors import ConfigError
from moe_edge.testing import deepseek_config


def write(tmp_path, text):
    f = tmp_path / "config.json"
    f.write_text(text if isinstance(text, str) else json.dumps(text))
    return f


@pytest.mark.parametrize("overrides, message", [
    ({"n_shared_experts": -2}, r"n_shared_experts \(-2\) not negative"),
    ({"first_k_dense_replace": 3}, r"first_k_dense_replace \(3\) must lie in \[0, num_hidden_layers = 3\)"),
    ({"first_k_dense_replace": -1}, r"first_k_dense_replace \(-1\) must lie in"),
    ({"moe_layer_freq": 0}, r"moe_layer_freq \(0\) must be positive"),
    ({"rope_theta": -10000.0}, "rope_theta must be a positive number, got -10000.0"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive number, got 0"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
    ({"hidden_size": "abc"}, "field 'hidden_size' must be an integer, got 'abc'"),
    ({"num_attention_heads": 4.5}, "field 'num_attention_heads' must be an integer, got 4.5"),
    ({"rope_theta": "1e4"}, "field 'rope_theta' must be a number, got '1e4'"),
    ({"tie_word_embeddings": "false"}, "field 'tie_word_embeddings' must be true or false"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_key_value_heads": 0}, "num_kv_heads must be a positive integer, got 0"),
    ({"torch_dtype": "int8"}, "torch_dtype 'int8' is not a float type"),
    ({"rope_scaling": [1]}, "'rope_scaling' must be objects or null"),
    ({"model_type": ["deepseek"]}, r"model_type \['deepseek'\] is not supported"),
])
def test_bad_field_is_named_with_the_file(tmp_path, overrides, message):
    f = write(tmp_path, deepseek_config(**overrides))
    with pytest.raises(ConfigError, match=message) as e:
        load_config(tmp_path)
    assert str(e.value).startswith(f"{f}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("[1, 2, 3]", "is a JSON list, but config.json must be a JSON object"),
    ('"deepseek"', "is a JSON str, but config.json must be a JSON object"),
    ('{"model_type": "deepseek", "model_type": "mixtral"}', "key 'model_type' appears twice"),
    ("{", "not valid JSON"),
])
def test_config_that_is_not_one_json_object(tmp_path, text, message):
    f = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(tmp_path)
    assert str(e.value).startswith(f"{f}: ")


def test_zero_max_position_embeddings_is_not_silently_4096(tmp_path):
    raw = deepseek_config()
    del raw["max_position_embeddings"]
    write(tmp_path, raw)
    assert load_config(tmp_path).max_position_embeddings == 4096  # absent: the default
    write(tmp_path, {**raw, "max_position_embeddings": 0})
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        load_config(tmp_path)


@pytest.fixture
def ckpt(tiny_deepseek, tmp_path):
    import shutil
    return shutil.copytree(tiny_deepseek, tmp_path / "model")


@pytest.mark.parametrize("overrides, message", [
    ({"intermediate_size": 128}, r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\], "
                                 r"but config.json implies \[128, 64\]"),
    ({"num_hidden_layers": 4}, "tensor 'model.layers.3.self_attn.q_proj.weight' is missing"),
    ({"num_hidden_layers": 2}, "tensors the model does not use"),
])
def test_info_fails_as_a_load_would_on_a_config_that_cannot_load(ckpt, overrides, message):
    """`moe-edge info` reads headers only, but still refuses what a load refuses (exit 1)."""
    from click.testing import CliRunner

    from moe_edge.cli import main
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, **overrides}))
    r = CliRunner().invoke(main, ["info", str(ckpt)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith("error: ") and __import__("re").search(message, r.output)


@pytest.mark.parametrize("raw, message", [
    ({"temperature": "hot"}, "field 'temperature' must be a number, got 'hot'"),
    ({"max_new_tokens": 1.5}, "field 'max_new_tokens' must be an integer"),
    ({"do_sample": "yes"}, "field 'do_sample' must be true or false"),
    ({"eos_token_id": ["a"]}, "field 'eos_token_id' must be an integer"),
    ([], "is a JSON list, but generation_config.json must be a JSON object"),
])
def test_generation_config_fields_are_checked(tmp_path, raw, message):
    from moe_edge.config import read_generation_json
    f = tmp_path / "generation_config.json"
    f.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message) as e:
        read_generation_json(f)
    assert str(e.value).startswith(f"{f}: ")


def test_generation_config_numbers_pass_through(tmp_path):
    from moe_edge.config import read_generation_json
    f = tmp_path / "generation_config.json"
    f.write_text(json.dumps({"temperature": 1, "top_k": 40, "do_sample": True, "eos_token_id": [1, 2]}))
    assert read_generation_json(f) == {"temperature": 1.0, "top_k": 40, "do_sample": True, "eos_token_id": [1, 2]}
    assert read_generation_json(tmp_path / "absent.json") == {}


def test_a_checkpoint_without_moe_layers_is_refused(tmp_path):
    write(tmp_path, deepseek_config(moe_layer_freq=5))  # layers 1 and 2: none a multiple of 5
    with pytest.raises(ConfigError, match="no layer has routed experts"):
        load_config(tmp_path)

"""Weights are checked at load: NaN/Inf in a weight or a GPTQ scale, and a stored dtype the
tensor's role does not allow (an int8 tensor where a float weight belongs), are refused
with the file and the tensor named."""

import shutil

import pytest
import torch

from moe_edge.api import load_model, load_offloaded
from moe_edge.errors import CheckpointError
from moe_edge.testing import edit_weights, write_checkpoint, write_gptq_checkpoint


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    src = write_checkpoint(root / "fp", "deepseek", hidden_size=64, moe_intermediate_size=32)
    return {"fp": src, "gptq": write_gptq_checkpoint(src, root / "q", group_size=32)}


def broken(sources, tmp_path, kind, edit):
    dst = shutil.copytree(sources[kind], tmp_path / kind)
    edit_weights(dst, edit)
    return dst


def poke(name, value):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[3] = value
    return edit


@pytest.mark.parametrize("name, value", [
    ("model.layers.0.self_attn.q_proj.weight", float("nan")),
    ("model.layers.1.mlp.experts.5.down_proj.weight", float("inf")),
    ("model.norm.weight", float("-inf")),
    ("lm_head.weight", float("nan")),
])
def test_non_finite_weight_is_refused(sources, tmp_path, name, value):
    ckpt = broken(sources, tmp_path, "fp", poke(name, value))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has NaN or infinite"):
        load_model(ckpt, device="cpu")


def test_non_finite_expert_is_refused_by_the_offloaded_load(sources, tmp_path):
    ckpt = broken(sources, tmp_path, "fp", poke("model.layers.2.mlp.experts.7.up_proj.weight", float("nan")))
    with pytest.raises(CheckpointError, match="experts.7.up_proj.weight' has NaN"):
        load_offloaded(ckpt, device="cpu", expert_cache=3, slow_tier="disk", offload_dir=tmp_path / "s")


def test_non_finite_gptq_scale_is_refused(sources, tmp_path):
    name = "model.layers.1.mlp.experts.2.gate_proj.scales"
    ckpt = broken(sources, tmp_path, "gptq", poke(name, float("inf")))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has NaN or infinite"):
        load_model(ckpt, device="cpu")


@pytest.mark.parametrize("kind, name, dtype, message", [
    ("fp", "model.layers.0.mlp.up_proj.weight", torch.int8, "is stored as int8, but it must be float16, bfloat16, float32"),
    ("fp", "model.embed_tokens.weight", torch.float64, "is stored as float64"),
    ("gptq", "model.layers.0.self_attn.o_proj.g_idx", torch.float32, "is stored as float32, but it must be int32, int64"),
    ("gptq", "model.layers.0.self_attn.o_proj.scales", torch.int16, "is stored as int16"),
])
def test_dtype_the_role_does_not_allow_is_refused(sources, tmp_path, kind, name, dtype, message):
    def edit(t):
        t[name] = t[name].to(dtype)
    ckpt = broken(sources, tmp_path, kind, edit)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' {message}"):
        load_model(ckpt, device="cpu")

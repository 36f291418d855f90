"""bench/as_qwen2moe.py: transformers' Qwen2MoeForCausalLM on a converted DeepSeek-MoE checkpoint
computes our model's function (logits within fp32 rounding, the same greedy tokens), for the
bundled trained demo, its GPTQ (act-order) copy dequantized, and a random checkpoint with every
setting the mapping moves (moe_layer_freq, norm_topk_prob, rope_theta, tied embeddings).
bench/memlimit.py's accelerate engine runs the trained benchmark models through it."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from moe_edge.api import load_model
from moe_edge.generation import SamplingParams, generate_ids
from moe_edge.testing import write_checkpoint

# by path, not with bench/ on sys.path (see tests/test_inflate.py)
_spec = importlib.util.spec_from_file_location("bench_as_qwen2moe",
                                               Path(__file__).parents[1] / "bench" / "as_qwen2moe.py")
_conv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conv)

DEMO = Path(__file__).parents[1] / "moe_edge" / "demo"
IDS = torch.arange(40, 100)[None]  # [1, T]


def qwen2_moe(path):
    from transformers import Qwen2MoeForCausalLM
    model, info = Qwen2MoeForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    return model.eval()


def greedy(model, prompt: list[int], n: int) -> list[int]:
    return list(generate_ids(model, prompt, SamplingParams(temperature=0, max_new_tokens=n, eos_token_ids=())))


def compare(src, tmp_path, dtype=torch.float32):
    ours = load_model(src, device="cpu", dtype="float32", kernel="dequant")
    hf = qwen2_moe(_conv.convert(src, tmp_path / "qwen", dtype))
    with torch.no_grad():
        want, got = ours(IDS), hf(IDS).logits
    return want, got, ours, hf


@pytest.mark.parametrize("demo", ["deepseek-moe-tiny", "deepseek-moe-tiny-gptq"])
def test_converted_demo_computes_our_models_function(tmp_path, demo):
    want, got, ours, hf = compare(DEMO / demo, tmp_path)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert (got - want).abs().max().item() < 1e-4
    prompt = IDS[0, :24].tolist()
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert theirs[0, len(prompt):].tolist() == greedy(ours, prompt, 12)


def test_every_mapped_setting(tmp_path):
    """MoE layers 2 and 4 of 0-4 (first_k_dense_replace 1, moe_layer_freq 2), renormalised
    top-k, a non-default rope_theta, tied embeddings; written in bf16 (exact: the source is
    bf16, and doubling is exact)."""
    src = write_checkpoint(tmp_path / "ds", "deepseek", seed=5, dtype=torch.bfloat16, tokenizer=False,
                           num_hidden_layers=5, moe_layer_freq=2, norm_topk_prob=True,
                           rope_theta=5e5, tie_word_embeddings=True, num_experts_per_tok=2)
    want, got, _, hf = compare(src, tmp_path, torch.bfloat16)
    assert hf.config.mlp_only_layers == [0, 1, 3] and hf.config.rope_parameters["rope_theta"] == 5e5
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_conversion_is_reused_until_the_source_changes(tmp_path):
    src = write_checkpoint(tmp_path / "ds", "deepseek", seed=1, tokenizer=False)
    dst = _conv.converted(src, tmp_path / "qwen")
    made = (dst / "model.safetensors").stat().st_mtime_ns
    assert _conv.converted(src, dst) == dst and (dst / "model.safetensors").stat().st_mtime_ns == made
    os.utime(src / "model.safetensors", ns=(made + 10**9, made + 10**9))
    _conv.converted(src, dst)
    assert (dst / "model.safetensors").stat().st_mtime_ns != made


def test_refuses_what_qwen2_moe_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="converts deepseek"):
        _conv.convert(write_checkpoint(tmp_path / "q", "qwen2_moe", tokenizer=False), tmp_path / "x")
    with pytest.raises(ValueError, match="o_proj has no bias"):
        _conv.convert(write_checkpoint(tmp_path / "b", "deepseek", tokenizer=False, attention_bias=True),
                      tmp_path / "y")

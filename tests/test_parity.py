"""Our model against transformers' classes on the same weights (fp32, max abs diff <= 1e-4)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from moe_edge.api import load_model
from moe_edge.config import config_from_dict
from moe_edge.model import Router
from moe_edge.testing import deepseek_config, hf_model, write_checkpoint

TOL = 1e-4
PROMPT_LEN, DECODE_STEPS = 12, 5


def logits_prompt_and_cached_decode(model, ids):
    """Logits for the prompt (one prefill) then for each further token via the KV cache."""
    cache = model.new_cache(capacity=ids.shape[1])
    out = [model(ids[:, :PROMPT_LEN], cache)]
    for t in range(PROMPT_LEN, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe"])
def test_matches_transformers(tmp_path, model_type):
    hf = hf_model(model_type, seed=1)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, device="cpu", dtype="float32")
    ids = torch.randint(0, 320, (1, PROMPT_LEN + DECODE_STEPS))
    with torch.no_grad():
        ref = hf(ids).logits
        got = logits_prompt_and_cached_decode(ours, ids)
    assert (ref - got).abs().max().item() <= TOL


def test_mixtral_tool_naming_and_fused_experts(tmp_path):
    """Mixtral saved with mlp.experts.{e}.gate_proj names, and with fused 3-D experts."""
    hf = hf_model("mixtral", seed=2)
    hf.save_pretrained(tmp_path / "hub")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hub" / "model.safetensors"), "pt") as f:
        hub = {k: f.get_tensor(k) for k in f.keys()}
    renamed = {k.replace("block_sparse_moe", "mlp").replace(".w1.", ".gate_proj.")
               .replace(".w3.", ".up_proj.").replace(".w2.", ".down_proj."): v for k, v in hub.items()}
    fused = {k: v for k, v in renamed.items() if ".experts." not in k}
    for layer in range(3):
        p = f"model.layers.{layer}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = torch.stack([torch.cat(
            [renamed[f"{p}.{e}.gate_proj.weight"], renamed[f"{p}.{e}.up_proj.weight"]]) for e in range(4)])
        fused[f"{p}.down_proj"] = torch.stack([renamed[f"{p}.{e}.down_proj.weight"] for e in range(4)])
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        ref = hf(ids).logits
    for name, tensors in [("tool", renamed), ("fused", fused)]:
        folder = tmp_path / name
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
        with torch.no_grad():
            got = load_model(folder, device="cpu")(ids)
        assert (ref - got).abs().max().item() <= TOL, name


def test_router_math_deepseek():
    """softmax over all experts, top-k, weights NOT renormalised (norm_topk_prob false)."""
    config = config_from_dict(deepseek_config(n_routed_experts=6, num_experts_per_tok=2))
    router = Router(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(6, 64))
    x = torch.randn(5, 64)
    weights, ids = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    expected_w, expected_ids = probs.topk(2, dim=-1)
    assert torch.equal(ids, expected_ids)
    assert torch.allclose(weights, expected_w, atol=1e-6)
    assert (weights.sum(-1) < 1).all()  # not renormalised


def test_router_math_renormalised():
    """Mixtral / Qwen3 (norm_topk_prob): equals a softmax over the top-k logits."""
    config = config_from_dict(deepseek_config(n_routed_experts=6, num_experts_per_tok=2,
                                              norm_topk_prob=True))
    router = Router(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(6, 64))
    x = torch.randn(5, 64)
    weights, ids = router(x)
    logits = x @ router.weight.T
    top_logits, top_ids = logits.topk(2, dim=-1)
    assert torch.equal(ids, top_ids)
    assert torch.allclose(weights, torch.softmax(top_logits, -1), atol=1e-6)


def deepseek_as_qwen2_moe(src, dst):
    """The same DeepSeek-MoE weights as a transformers Qwen2-MoE checkpoint.

    Qwen2-MoE scales its shared expert by sigmoid(gate(x)); a zero gate gives 0.5, so the
    shared expert's down_proj is doubled: exact in floating point.
    """
    ds = json.loads((src / "config.json").read_text())
    from safetensors import safe_open
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k.replace(".shared_experts.", ".shared_expert."): f.get_tensor(k) for k in f.keys()}
    for layer in range(1, ds["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp"
        tensors[f"{p}.shared_expert.down_proj.weight"] *= 2
        tensors[f"{p}.shared_expert_gate.weight"] = torch.zeros(1, ds["hidden_size"])
    qwen = {
        "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
        "vocab_size": ds["vocab_size"], "hidden_size": ds["hidden_size"],
        "num_hidden_layers": ds["num_hidden_layers"], "num_attention_heads": ds["num_attention_heads"],
        "num_key_value_heads": ds["num_key_value_heads"], "intermediate_size": ds["intermediate_size"],
        "moe_intermediate_size": ds["moe_intermediate_size"],
        "shared_expert_intermediate_size": ds["n_shared_experts"] * ds["moe_intermediate_size"],
        "num_experts": ds["n_routed_experts"], "num_experts_per_tok": ds["num_experts_per_tok"],
        "norm_topk_prob": False, "qkv_bias": False, "mlp_only_layers": [0], "decoder_sparse_step": 1,
        "rms_norm_eps": ds["rms_norm_eps"], "rope_theta": ds["rope_theta"],
        "max_position_embeddings": ds["max_position_embeddings"], "tie_word_embeddings": False,
    }
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(qwen))


def test_deepseek_matches_qwen2_moe_formulation(tmp_path):
    src = write_checkpoint(tmp_path / "ds", "deepseek", seed=3, tokenizer=False,
                           n_routed_experts=16, num_experts_per_tok=6)
    deepseek_as_qwen2_moe(src, tmp_path / "qwen")
    from transformers import Qwen2MoeForCausalLM
    ref_model = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "qwen").eval()
    ours = load_model(src, device="cpu")
    ids = torch.randint(0, 320, (1, PROMPT_LEN + DECODE_STEPS))
    with torch.no_grad():
        ref = ref_model(ids).logits
        got = logits_prompt_and_cached_decode(ours, ids)
    assert (ref - got).abs().max().item() <= TOL

"""Tiny random checkpoints in Hugging Face layout, for tests and benchmarks (no downloads).

>>> path = write_checkpoint(tmp_path / "tiny", "deepseek")
>>> path = write_checkpoint(tmp_path / "mix", "mixtral", num_local_experts=4)
"""

from __future__ import annotations

from pathlib import Path

import torch

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# deepseek-moe-16b-chat's template (system text, "User: ...", "Assistant: ...<eos>").
DEEPSEEK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def byte_tokenizer(chat_template: str | None = DEEPSEEK_CHAT_TEMPLATE):
    """A byte-level tokenizer without merges: ids 0, 1 are BOS/EOS, then one id per byte.

    Every multi-byte character spans several tokens, which is what streaming tests need.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {BOS: 0, EOS: 1, **{ch: i + 2 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=EOS, clean_up_tokenization_spaces=False)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def deepseek_config(**overrides) -> dict:
    """A tiny DeepSeek-MoE config.json: dense layer 0, then MoE layers with shared experts."""
    config = {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "vocab_size": 320,
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 3,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False,
        "scoring_func": "softmax", "hidden_act": "silu", "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def random_model(config: dict, seed: int = 0, std: float = 0.1):
    """Our model with random weights (norm weights near 1) for a config.json dict."""
    from .config import config_from_dict
    from .model import MoEForCausalLM
    torch.manual_seed(seed)
    model = MoEForCausalLM(config_from_dict(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else std * torch.randn_like(p))
    return model.eval()


def write_checkpoint(folder: str | Path, model_type: str = "deepseek", seed: int = 0,
                     dtype: torch.dtype = torch.float32, tokenizer: bool = True,
                     max_shard_bytes: int = 4 * 2**30, **overrides) -> Path:
    """A tiny random checkpoint of `model_type` as its own writer would lay it out.

    deepseek (no transformers class) is written from our model; the other families with
    transformers' own classes and `save_pretrained`, so their naming is the real one.
    """
    folder = Path(folder)
    if model_type == "deepseek":
        _write_deepseek(folder, seed, dtype, max_shard_bytes, deepseek_config(**overrides))
    else:
        hf_model(model_type, seed, **overrides).to(dtype).save_pretrained(
            folder, max_shard_size=max_shard_bytes)
    if tokenizer:
        byte_tokenizer().save_pretrained(folder)
    return folder


def _write_deepseek(folder: Path, seed: int, dtype, max_shard_bytes: int, config: dict) -> None:
    from .checkpoint import ShardedWriter
    from .model.weights import expected_tensors
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    model = random_model(config, seed)
    with ShardedWriter(folder, max_shard_bytes=max_shard_bytes, overwrite=True) as w:
        for name, p in expected_tensors(model).items():  # a tied lm_head is stored once
            w.add(name, p.detach().to(dtype))
        w.write_json("config.json", config)
        w.write_json("generation_config.json", {"bos_token_id": 0, "eos_token_id": 1,
                                                "do_sample": False, "max_new_tokens": 32})
        w.commit()


HF_SMALL = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, bos_token_id=0, eos_token_id=1,
                pad_token_id=1, max_position_embeddings=512)
HF_FAMILIES = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                       num_experts_per_tok=2, mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=32,
                       norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=3)),
}


def hf_model(model_type: str, seed: int = 0, std: float = 0.1, **overrides):
    """transformers' own class for a family, tiny and randomly initialised, in eval mode."""
    import transformers
    config_cls, model_cls, extra = HF_FAMILIES[model_type]
    config = getattr(transformers, config_cls)(**{**HF_SMALL, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))
    return model.eval()


def gptq_layer(w: torch.Tensor, group_size: int = 128, sym: bool = True, act_order: bool = False,
               v2: bool = False, seed: int = 0, bias: torch.Tensor | None = None):
    """GPTQ tensors for weight `w` [N, K] by round-to-nearest; with `act_order` the input
    channels are quantised in a random order, giving the non-monotone g_idx of desc_act."""
    from .quant.format import pack
    from .quant.gptq import quantize_rtn
    N, K = w.shape
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(seed)) if act_order else torch.arange(K)
    zero_range = (0, 15) if v2 else (1, 15)  # v1 cannot store a zero point of 0
    q_p, zeros, scales, g_p = quantize_rtn(w[:, perm], group_size, sym, zero_range)
    q, g_idx = torch.empty_like(q_p), torch.empty_like(g_p)
    q[:, perm], g_idx[perm] = q_p, g_p
    return pack(q, zeros, scales, g_idx, v2=v2, bias=bias)


def write_gptq_checkpoint(src: str | Path, dst: str | Path, group_size: int = 128, sym: bool = True,
                          act_order: bool = False, v2: bool = False, dtype=torch.float16) -> Path:
    """A GPTQ copy of checkpoint `src` (round-to-nearest): every Linear but routers, Qwen2-MoE's
    shared expert gate and lm_head quantised, standard tensor names and quantization_config."""
    import json
    from .api import load_model
    from .checkpoint import ShardedWriter
    from .model.weights import expected_tensors
    src, dst = Path(src), Path(dst)
    model = load_model(src, device="cpu", dtype="float32")
    config = json.loads((src / "config.json").read_text())
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order,
            "sym": sym, "checkpoint_format": "gptq_v2" if v2 else "gptq", "true_sequential": True,
            "damp_percent": 0.01, "static_groups": False, "lm_head": False}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n != "lm_head" and not n.endswith(("mlp.gate", "shared_expert_gate"))}
    with ShardedWriter(dst, overwrite=True) as w:
        for i, (name, p) in enumerate(expected_tensors(model).items()):
            prefix = name.rsplit(".", 1)[0]
            if prefix not in linears:
                w.add(name, p.detach().to(dtype))
            elif name.endswith(".weight"):
                bias = model.get_submodule(prefix).bias
                t = gptq_layer(p.detach(), group_size, sym, act_order, v2, seed=i, bias=bias)
                for part in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                    if getattr(t, part) is not None:
                        w.add(f"{prefix}.{part}", getattr(t, part))
        w.write_json("config.json", {**config, "quantization_config": qcfg,
                                     "torch_dtype": str(dtype).removeprefix("torch.")})
        w.write_json("quantize_config.json", qcfg)
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
                w.copy_file(f)
        w.commit()
    return dst


def edit_weights(folder: str | Path, edit) -> None:
    """Rewrite `folder/model.safetensors` after `edit(tensors: dict)` changed it in place
    (tests use it to break checkpoints in specific ways)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    file = Path(folder) / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(file))

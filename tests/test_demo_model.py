"""The trained demo model shipped in the package: it loads, and it learned something."""

import json
from pathlib import Path

import pytest
import torch

import moe_edge
from moe_edge.api import load
from moe_edge.evaluate import heldout_ids, perplexity
from moe_edge.testing import random_model

DEMO = Path(moe_edge.__file__).resolve().parent / "demo" / "deepseek-moe-tiny"
pytestmark = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not built")


@pytest.fixture(scope="module")
def demo():
    return load(DEMO, device="cpu")


def test_demo_is_a_deepseek_moe(demo):
    c = demo.config
    assert c.model_type == "deepseek" and c.num_experts == 64 and c.top_k == 6
    assert c.shared_intermediate_size == 2 * c.moe_intermediate_size and c.moe_layers[0] is False
    assert not c.norm_topk_prob
    size = sum(f.stat().st_size for f in DEMO.glob("*.safetensors"))
    assert size < 13 * 2**20


def test_heldout_perplexity_far_below_untrained(demo):
    stream = heldout_ids(demo.tokenizer, max_tokens=4097)
    trained = perplexity(demo.model, stream)
    raw = json.loads((DEMO / "config.json").read_text())
    untrained = perplexity(random_model(raw, seed=0, std=0.02), stream)
    assert untrained > 1000  # about uniform over 4,096 tokens
    assert trained < untrained / 20
    report = json.loads((DEMO / "training_report.json").read_text())
    assert trained < 2 * report["valid_ppl"]  # the shipped card's number is in this range


def test_demo_routing_uses_many_experts(demo):
    """A trained router spreads tokens (the balance loss did its job) but is not uniform."""
    stream = heldout_ids(demo.tokenizer, max_tokens=2048)[None]
    counts = {}
    for layer, block in demo.model.moe_blocks().items():
        block.gate.register_forward_hook(
            lambda m, a, out, l=layer: counts.__setitem__(l, torch.bincount(out[1].flatten(), minlength=64)))
    with torch.no_grad():
        demo.model(stream)
    for c in counts.values():
        assert (c > 0).sum() >= 48
        assert c.max() > 2 * c.float().mean()


def test_demo_generates_text(demo):
    r = demo.generate("The for statement", temperature=0, max_new_tokens=20)
    assert r.generated_tokens > 0 and r.text.strip()


@pytest.mark.slow
def test_gptq_on_demo_within_3pct_and_beats_rtn(demo, tmp_path):
    """4-bit g128 GPTQ: held-out perplexity within 3% of the 16-bit model, and its increase
    at most 65% of round-to-nearest's. Measured +1.97% and +3.24%, ratio 0.61 (last-bit
    changes in the calibration activations move it by a few hundredths)."""
    from moe_edge.api import load_model
    from moe_edge.quant.quantizer import QuantizeOptions, quantize
    stream = heldout_ids(demo.tokenizer)
    base = perplexity(demo.model, stream)
    ppl = {}
    for method in ("gptq", "rtn"):
        out = quantize(DEMO, tmp_path / method, QuantizeOptions(method=method)).out
        ppl[method] = perplexity(load_model(out, device="cpu", bf16_weights=False), stream)
    print(f"demo perplexity: 16-bit {base:.3f}, GPTQ {ppl['gptq']:.3f}, RTN {ppl['rtn']:.3f}")
    assert ppl["gptq"] < 1.03 * base
    assert ppl["gptq"] - base <= 0.65 * (ppl["rtn"] - base)

import pytest
import torch

from moe_edge.api import load_model
from moe_edge.testing import hf_model, write_checkpoint


def test_cached_decode_equals_uncached(tiny_deepseek):
    model = load_model(tiny_deepseek, device="cpu")
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch=2, capacity=16)
        steps = [model(ids[:, :7], cache)] + [model(ids[:, t:t + 1], cache) for t in range(7, 16)]
    assert torch.allclose(full, torch.cat(steps, 1), atol=1e-5)
    assert cache.length == 16


def test_chunked_prefill_equals_one_prefill(tiny_deepseek):
    model = load_model(tiny_deepseek, device="cpu")
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(capacity=20)
        chunks = [model(ids[:, a:b], cache) for a, b in [(0, 8), (8, 13), (13, 20)]]
    assert torch.allclose(full, torch.cat(chunks, 1), atol=1e-5)


def test_context_overflow_is_an_error(tiny_deepseek):
    model = load_model(tiny_deepseek, device="cpu")
    cache = model.new_cache(capacity=4)
    with torch.no_grad(), pytest.raises(ValueError, match="context full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.1), ("float16", 0.02)])
def test_half_precision_close_to_fp32(tiny_deepseek, dtype, tol):
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        ref = load_model(tiny_deepseek, device="cpu", dtype="float32")(ids)
        model = load_model(tiny_deepseek, device="cpu", dtype=dtype)
        assert model.dtype == getattr(torch, dtype)
        cache = model.new_cache(capacity=12)
        got = torch.cat([model(ids[:, :6], cache)] + [model(ids[:, t:t + 1], cache) for t in range(6, 12)], 1)
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < tol


def test_sliding_window_matches_transformers(tmp_path):
    """Mixtral with a window shorter than the sequence: keys older than the window are masked."""
    hf = hf_model("mixtral", seed=4, sliding_window=4)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 320, (1, 12))
    model = load_model(tmp_path, device="cpu")
    with torch.no_grad():
        ref = hf(ids).logits
        cache = model.new_cache(capacity=12)
        got = torch.cat([model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, 12)], 1)
    assert (ref - got).abs().max() <= 1e-4
    assert model.config.sliding_window == 4


def test_tied_embeddings(tmp_path):
    path = write_checkpoint(tmp_path / "tied", "deepseek", tokenizer=False, tie_word_embeddings=True)
    model = load_model(path, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gptq_model_keeps_bf16_head_only_when_exact(tiny_deepseek, tmp_path, monkeypatch):
    """A bf16 checkpoint's embeddings and lm_head stay bf16 on the CPU (half the bytes, the
    same weights); an fp32 checkpoint's are not rounded."""
    from moe_edge.api import load_model
    from moe_edge.hub import DEMO
    from moe_edge.testing import write_gptq_checkpoint
    demo = load_model(DEMO, device="cpu", bf16_weights=True)
    assert demo.kept_bf16 == ["model.embed_tokens"]  # the rest is int4; a 4096x128 head is
    # faster in fp32 (BF16_MIN_LINEAR); on a 16B model the 102400x2048 head stays bf16
    import moe_edge.model.layers as layers
    monkeypatch.setattr(layers, "BF16_MIN_LINEAR", 4096 * 128)
    demo = load_model(DEMO, device="cpu", bf16_weights=True)
    assert sorted(demo.kept_bf16) == ["lm_head", "model.embed_tokens"]
    assert load_model(DEMO, device="cpu", bf16_weights=False).kept_bf16 == []
    assert demo.lm_head.weight.dtype == torch.bfloat16 and demo.dtype == torch.float32
    ids = torch.arange(3, 200)[None]
    with torch.no_grad():
        fast = demo(ids)
        demo.lm_head.__class__ = torch.nn.Linear
        demo.lm_head.weight.data = demo.lm_head.weight.data.float()
        exact = demo(ids)
    assert fast.dtype == torch.float32
    assert ((fast - exact).norm() / exact.norm()).item() < 1e-2
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean().item() >= 0.97
    fp32 = write_gptq_checkpoint(tiny_deepseek, tmp_path / "q")
    assert load_model(fp32, device="cpu", bf16_weights=True).kept_bf16 == []


def test_fast_norm_and_rotary_are_bitwise_the_reference_formulas():
    """RMSNorm's one-op fp32 path and the roll-based rotary equal the textbook forms."""
    from moe_edge.model.layers import RMSNorm, apply_rotary, rotary_cos_sin
    torch.manual_seed(0)
    norm = RMSNorm(256, 1e-6)
    norm.weight.data = torch.randn(256)
    x = torch.randn(2, 5, 256) * 3
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x), norm.weight * h)
    q = torch.randn(1, 4, 5, 64)  # [B, H, T, Hd]
    cos, signed_sin = rotary_cos_sin(torch.arange(7, 12), 64, 10000.0, torch.float32)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    emb = torch.cat([torch.arange(7, 12).float()[:, None] * inv] * 2, -1)  # [T, Hd]
    rotate_half = torch.cat((-q[..., 32:], q[..., :32]), -1)
    assert torch.equal(cos, emb.cos())
    assert torch.equal(apply_rotary(q, cos, signed_sin), q * emb.cos() + rotate_half * emb.sin())


def test_a_named_dtype_is_every_weights_dtype(tmp_path, monkeypatch):
    """load(path, dtype=float32) on a bf16 checkpoint holds every float weight in fp32 and
    gives exact fp32 logits (what bf16_weights=False gives), on any CPU; without a dtype the
    mixed default keeps the large bf16 weights bf16 where the CPU multiplies bf16 natively."""
    import moe_edge.cpu as cpu_caps
    import moe_edge.model.layers as layers
    monkeypatch.setattr(cpu_caps, "native_bf16", lambda: True)  # the mixed default, anywhere
    monkeypatch.setattr(layers, "BF16_MIN_LINEAR", 0)
    path = write_checkpoint(tmp_path / "bf16", "deepseek", tokenizer=False, dtype=torch.bfloat16)
    named = load_model(path, device="cpu", dtype=torch.float32)
    floats = [t for t in list(named.parameters()) + list(named.buffers()) if t.is_floating_point()]
    assert named.kept_bf16 == [] and all(t.dtype == torch.float32 for t in floats)
    exact = load_model(path, device="cpu", bf16_weights=False, lm_head="stored")
    assert "lm_head" in load_model(path, device="cpu").kept_bf16  # no dtype named: mixed
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(named(ids), exact(ids))


def test_a_transposed_fp32_weight_computes_the_same_linear():
    """store_transposed keeps the values and the shape; only the memory order (and so the
    order of the sums) changes: outputs within fp32 rounding, for one row and for many."""
    from moe_edge.model.layers import store_transposed
    torch.manual_seed(0)
    head = torch.nn.Linear(128, 4096, bias=False)
    before = head.weight.detach().clone()
    x = torch.randn(3, 5, 128)
    want = head(x)
    assert store_transposed(head)
    assert torch.equal(head.weight, before) and head.weight.shape == (4096, 128) and not head.weight.is_contiguous()
    torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-5)
    assert not store_transposed(torch.nn.Linear(8, 8).bfloat16())  # fp32 only

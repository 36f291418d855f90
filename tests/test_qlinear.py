"""Each kernel path against dequantise-then-matmul, and GPTQ checkpoints loaded end to end."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from moe_edge.api import load, load_model
from moe_edge.errors import CheckpointError, ConfigError
from moe_edge.quant.format import dequantize
from moe_edge.quant.qlinear import QuantLinear
from moe_edge.testing import edit_weights, gptq_layer, write_gptq_checkpoint

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("N, K, group, act_order", [
    (1408, 2048, 128, False), (2048, 1408, 128, True),  # DeepSeek's expert shapes
    (96, 320, 32, True), (48, 192, 64, False), (64, 256, -1, False), (64, 64, 128, False),
])
@pytest.mark.parametrize("v2", [False, True])
def test_int4_cpu_matches_dequant_matmul(N, K, group, act_order, v2):
    t = gptq_layer(torch.randn(N, K) * 0.05, group, act_order=act_order, v2=v2)
    x = torch.randn(3, 5, K)
    ref = F.linear(x, dequantize(t, v2))
    exact = QuantLinear.from_gptq(t, v2, CPU, torch.float32, compute_dtype=torch.float32)
    assert exact.kernel == "int4-cpu", exact.reason
    assert rel_err(exact(x), ref) < 1e-5
    fast = QuantLinear.from_gptq(t, v2, CPU, torch.float32)  # default: bf16 inside the kernel
    assert fast(x).dtype == torch.float32 and rel_err(fast(x), ref) < 1e-2
    assert rel_err(fast(x.bfloat16()), ref) < 1e-2


@pytest.mark.parametrize("N, K, group", [(40, 64, 32), (48, 96, 24), (32, 48, 8)])
def test_refused_shapes_fall_back_explicitly(N, K, group):
    t = gptq_layer(torch.randn(N, K), group, act_order=True)
    layer = QuantLinear.from_gptq(t, False, CPU)
    assert layer.kernel == "dequant" and layer.reason
    x = torch.randn(4, K)
    assert rel_err(layer(x), F.linear(x, dequantize(t))) < 1e-5
    with pytest.raises(ValueError, match="cannot run"):
        QuantLinear.from_gptq(t, False, CPU, kernel="int4")


def test_bias_is_added():
    bias = torch.randn(32)
    t = gptq_layer(torch.randn(32, 64), 32, bias=bias)
    x = torch.randn(2, 64)
    ref = F.linear(x, dequantize(t), t.bias.float())
    assert rel_err(QuantLinear.from_gptq(t, False, CPU, kernel="dequant")(x), ref) < 1e-5
    assert rel_err(QuantLinear.from_gptq(t, False, CPU, compute_dtype=torch.float32)(x), ref) < 1e-5
    assert rel_err(QuantLinear.from_gptq(t, False, CPU)(x), ref) < 1e-2


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("N, K, act_order", [(1408, 2048, False), (2048, 1408, True)])
def test_int4_cuda_matches_dequant_matmul(N, K, act_order):
    gpu = torch.device("cuda")
    t = gptq_layer(torch.randn(N, K) * 0.05, 128, act_order=act_order)
    layer = QuantLinear.from_gptq(t, False, gpu, torch.bfloat16)
    assert layer.kernel == "int4-cuda"
    x = torch.randn(7, K, device=gpu, dtype=torch.bfloat16)
    ref = F.linear(x.float(), dequantize(t).to(gpu))
    assert rel_err(layer(x), ref) < 1e-2


@pytest.fixture(scope="module")
def gptq_ckpt(tmp_path_factory):
    from moe_edge.testing import write_checkpoint
    root = tmp_path_factory.mktemp("gptq")
    src = write_checkpoint(root / "fp", "deepseek", hidden_size=128, intermediate_size=256,
                           moe_intermediate_size=64)
    return src, write_gptq_checkpoint(src, root / "q", group_size=64, act_order=True)


def test_quantized_checkpoint_loads_with_int4_layers(gptq_ckpt):
    src, dst = gptq_ckpt
    model = load_model(dst, device="cpu")
    assert model.quant_config.group_size == 64 and model.quant_kernels == {"int4-cpu": 3 * 4 + 2 * (8 + 1) * 3 + 3}
    assert not isinstance(model.model.layers[1].mlp.gate, QuantLinear)
    assert not isinstance(model.lm_head, QuantLinear)
    ids = torch.randint(2, 320, (1, 16))
    with torch.no_grad():
        fast = model(ids)
        slow = load_model(dst, device="cpu", kernel="dequant")(ids)
        full = load_model(src, device="cpu")(ids)
    assert rel_err(fast, slow) < 5e-2  # int4 kernel (bf16 inside) ~ dequantise-then-matmul (fp32)
    assert rel_err(fast, full) > 1e-3  # the weights really are quantised


@pytest.mark.parametrize("N, K", [(1408, 2048), (2048, 1408)])
def test_memory_is_about_a_quarter_of_bf16(N, K):
    """DeepSeek's expert shapes, group 128, act-order: packed weights + fp32 scales/zeros + perm."""
    layer = QuantLinear.from_gptq(gptq_layer(torch.randn(N, K), 128, act_order=True), False, CPU)
    assert layer.nbytes() / (2 * N * K) < 0.29


def test_quantized_generation_runs(gptq_ckpt):
    lm = load(gptq_ckpt[1], device="cpu")
    assert lm.generate("hi", temperature=0, max_new_tokens=8).generated_tokens > 0


def test_missing_scales_named(gptq_ckpt, tmp_path):
    dst = shutil.copytree(gptq_ckpt[1], tmp_path / "q")
    edit_weights(dst, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.scales"))
    with pytest.raises(CheckpointError, match="experts.2.up_proj.scales' is missing"):
        load_model(dst, device="cpu")


@pytest.mark.parametrize("name, value, message", [
    ("model.layers.1.mlp.gate.qweight", torch.zeros(16, 8, dtype=torch.int32),
     "mlp.gate.qweight is quantized but .* is a router"),
    ("model.layers.0.self_attn.q_proj.qweight", torch.zeros(32, 128, dtype=torch.int32),
     "q_proj.qweight .* 8-bit values"),
])
def test_bad_quantized_tensors_named(gptq_ckpt, tmp_path, name, value, message):
    dst = shutil.copytree(gptq_ckpt[1], tmp_path / "q")
    edit_weights(dst, lambda t: t.__setitem__(name, value))
    with pytest.raises(CheckpointError, match=message):
        load_model(dst, device="cpu")


@pytest.mark.parametrize("group, seeds", [(32, (1, 1, 2)), (32, (1, 3, 2)), (128, (0, 0, 0))])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [64, 96])  # 96: not a multiple of 64, never fused
def test_quant_mlp_is_bitwise_the_three_quant_linears(group, seeds, compute, width):
    """The fused expert path (one cast, one shared act-order permutation, gate and up in one
    matmul where that is exact, no module lookups) computes exactly what MLP computes with
    the same QuantLinears one by one, for one token (decode) and several (prefill)."""
    from moe_edge.model.layers import MLP
    from moe_edge.quant.qlinear import QuantMLP, use_quant_mlps

    def q(n, k, seed):
        t = gptq_layer(torch.randn(n, k) * 0.05, group, act_order=group < 128, seed=seed)
        return QuantLinear.from_gptq(t, False, CPU, torch.float32, compute_dtype=compute)

    for fuse in (False, True):
        mlp = MLP(128, width)
        mlp.gate_proj, mlp.up_proj = q(width, 128, seeds[0]), q(width, 128, seeds[1])
        mlp.down_proj = q(128, width, seeds[2])
        x = torch.randn(2, 7, 128)
        ref = mlp(x)
        assert use_quant_mlps(mlp, fuse=fuse) == 1 and type(mlp) is QuantMLP
        same_order = group == 128 or seeds[0] == seeds[1]
        fused = fuse and width % 64 == 0 and same_order
        assert hasattr(mlp, "gate_up") == fused
        if group < 128 and not fused:  # act-order: gate and up permuted once when equal
            assert (mlp.up_proj.perm is mlp.gate_proj.perm) == (seeds[0] == seeds[1])
        assert torch.equal(mlp(x), ref)
        assert torch.equal(mlp(x[:, :1]), ref[:, :1])  # decode: one token
        assert torch.equal(mlp(x[:1, :1]), ref[:1, :1])


@pytest.mark.parametrize("width, act_order", [(64, True), (128, False), (192, True)])
@pytest.mark.parametrize("compute, dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.bfloat16)])
def test_experts_run_together_are_bitwise_each_on_its_own(width, act_order, compute, dtype):
    """Decode's k experts with silu, product and cast done once for all of them
    (run_experts) give the bits of each expert run alone; experts that cannot (gate and up
    not fused) take the one-by-one path."""
    from moe_edge.model.layers import MLP
    from moe_edge.quant.qlinear import QuantMLP, run_experts, use_quant_mlps

    def expert(seed, fuse=True):
        mlp = MLP(128, width)
        for name, (n, k) in {"gate_proj": (width, 128), "up_proj": (width, 128), "down_proj": (128, width)}.items():
            t = gptq_layer(torch.randn(n, k) * 0.05, 64, act_order=act_order, seed=seed + (name == "down_proj"))
            setattr(mlp, name, QuantLinear.from_gptq(t, False, CPU, torch.float32, compute_dtype=compute))
        use_quant_mlps(mlp, fuse=fuse)
        return mlp

    experts = [expert(seed) for seed in range(6)]
    assert all(type(m) is QuantMLP and hasattr(m, "gate_up") for m in experts)
    x = torch.randn(1, 128).to(compute)
    each = torch.cat([m.run(x, dtype) for m in experts])
    assert torch.equal(run_experts(experts, x, dtype), each)
    assert torch.equal(run_experts(experts[:1], x, dtype), each[:1])
    mixed = experts[:3] + [expert(7, fuse=False)]
    assert not hasattr(mixed[-1], "gate_up")
    assert torch.equal(run_experts(mixed, x, dtype), torch.cat([m.run(x, dtype) for m in mixed]))


@pytest.mark.parametrize("family", [
    dict(),  # DeepSeek, Mixtral: q and k rotate in one go
    dict(qkv_bias=True),  # Qwen2-MoE
    dict(qk_norm="head"),  # Qwen3-MoE
    dict(qk_norm="full", clip_qkv=0.5),  # OLMoE
    dict(num_kv_heads=2),  # GQA
    dict(head_dim=24),  # widths of 96: never fused
])
def test_fused_qkv_attention_is_bitwise_the_three_projections(family):
    """fuse_qkv joins q, k and v into one int4 matmul and rotates q and k together; prefill
    and cached decode give exactly what the separate projections give."""
    import copy
    from moe_edge.config import ModelConfig
    from moe_edge.model.attention import Attention, KVCache
    from moe_edge.model.layers import rotary_cos_sin
    from moe_edge.quant.qlinear import fuse_qkv

    c = dict(model_type="deepseek", vocab_size=64, hidden_size=128, num_layers=1, num_heads=4,
             num_kv_heads=4, head_dim=32, intermediate_size=64, num_experts=4, top_k=2,
             moe_intermediate_size=64, moe_layers=(False,))
    config = ModelConfig(**{**c, **family})
    attn = Attention(config, 0)
    H, K, Hd = config.num_heads, config.num_kv_heads, config.head_dim
    for i, (name, n) in enumerate([("q_proj", H * Hd), ("k_proj", K * Hd), ("v_proj", K * Hd),
                                   ("o_proj", 128)]):
        t = gptq_layer(torch.randn(n, 128 if name != "o_proj" else H * Hd) * 0.05, 32,
                       act_order=True, seed=0 if name != "o_proj" else 1)
        if config.qkv_bias and name != "o_proj":
            t.bias = torch.randn(n)
        setattr(attn, name, QuantLinear.from_gptq(t, False, CPU, torch.float32))
    fused = copy.deepcopy(attn)
    assert fuse_qkv(fused) == ((H * Hd) % 64 == 0 and (K * Hd) % 64 == 0)
    assert hasattr(fused, "qkv") == (not hasattr(fused, "q_proj"))
    cos, sin = rotary_cos_sin(torch.arange(8), Hd, 10000.0, torch.float32)
    x = torch.randn(2, 8, 128)  # a batch of two: the [B, heads, T, Hd] layout per row
    caches = [KVCache(config, 2, 16, torch.float32) for _ in range(2)]
    outs = [m(x[:, :7], cos[:7], sin[:7], cache, 0) for m, cache in zip((attn, fused), caches)]
    assert torch.equal(outs[0], outs[1])
    outs = [m(x[:, 7:], cos[7:], sin[7:], cache, 7) for m, cache in zip((attn, fused), caches)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(caches[0].k[0], caches[1].k[0]) and torch.equal(caches[0].v[0], caches[1].v[0])


needs_dequant_gemm = pytest.mark.skipif(
    not __import__("moe_edge.quant.int4_cpu", fromlist=["enabled"]).enabled(),
    reason="the CPU kernel's packed layout is not one int4_cpu knows, or the CPU lacks native bf16")


@needs_dequant_gemm
@pytest.mark.parametrize("N, K, group, act_order", [(1408, 2048, 128, False), (2048, 1408, 128, True),
                                                    (192, 320, 32, True), (128, 256, 64, False)])
def test_prefill_dequantised_gemm_uses_the_kernels_own_weights(N, K, group, act_order, monkeypatch):
    """From MIN_ROWS rows on, int4_matmul dequantises once and runs a bf16 GEMM: its weights
    are bit for bit the ones the int4 kernel multiplies by (the kernel applied to the identity),
    chunking does not change them, and the product is as close to the exact one as the kernel's."""
    from moe_edge.quant import int4_cpu
    from moe_edge.quant.qlinear import _INT4_MM, int4_matmul
    t = gptq_layer(torch.randn(N, K) * 0.05, group, act_order=act_order, seed=1)
    layer = QuantLinear.from_gptq(t, False, CPU, torch.float32)
    kernel = _INT4_MM["int4-cpu"]
    wt = int4_cpu.dequantized_t(layer, 0, N)  # [K, N]
    assert torch.equal(wt, kernel(torch.eye(K, dtype=torch.bfloat16), layer.packed, layer.group,
                                  layer.scale_zeros))
    assert torch.equal(int4_cpu.dequantized_t(layer, 64, 128), wt[:, 64:128])
    monkeypatch.setattr(int4_cpu, "CALL_ROWS", 0)  # small test weights: take the path anyway
    x = torch.randn(int4_cpu.MIN_ROWS + 3, K).to(torch.bfloat16)
    assert int4_cpu.usable(layer, x)
    exact = x.float() @ dequantize(t, False).float().T
    xp = x.index_select(1, layer.perm) if layer.perm is not None else x
    by_kernel = kernel(xp, layer.packed, layer.group, layer.scale_zeros)
    y = int4_matmul(layer, x)
    assert rel_err(y, exact) < 1.25 * rel_err(by_kernel, exact) and rel_err(y, by_kernel) < 4e-3
    monkeypatch.setattr(int4_cpu, "CHUNK", 64 * K)  # 64 output rows at a time
    assert rel_err(int4_matmul(layer, x), y) < 1e-3  # GEMM blocking moves a few last bits
    assert not int4_cpu.usable(layer, x[: int4_cpu.MIN_ROWS - 1])  # decode and short prompts: the kernel


def test_int4_cpu_layout_matches_the_kernels_packing():
    """layout_block() names the packing _convert_weight_to_int4pack_for_cpu produced here, or
    0 (the dequantised path off), never a wrong one."""
    from moe_edge.quant import int4_cpu
    block = int4_cpu.layout_block()
    q = torch.randint(0, 16, (256, 128), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    if block:
        assert torch.equal(int4_cpu._unpack(packed, block, 256, 128).int(), q)
    else:
        assert not any(torch.equal(int4_cpu._unpack(packed, b, 256, 128).int(), q) for b in (64, 32))


@pytest.mark.parametrize("N, K", [(64, 64), (128, 256), (2816, 128), (48, 64)])
def test_int4_cpu_pack_is_the_kernels_own_packing(N, K):
    """int4_cpu.pack (uint8 work, used at load) makes the bytes _convert_weight_to_int4pack_for_cpu
    makes from an int32 copy; shapes outside its layout (N not a multiple of the block) are
    left to the kernel's conversion."""
    from moe_edge.quant import int4_cpu
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    packed = int4_cpu.pack(q)
    if not int4_cpu.layout_block() or N % int4_cpu.layout_block():
        assert packed is None
        return
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2))


def test_int8_lm_head_rounds_each_weight_to_its_row_step():
    """Int8Linear: int8 codes and one bf16 scale per row (half the bytes of bf16), every
    weight within one step of its value, products close to the fp32 ones."""
    from moe_edge.quant.int8 import Int8Linear
    w = torch.randn(300, 128) * torch.rand(300, 1)  # rows of different scales
    w[7] = 0  # an all-zero row stays zero
    head = Int8Linear(w, rows=64)  # several blocks of rows
    q, s = head.weight_int8, head.scales.float()[:, None]
    assert q.dtype == torch.int8 and head.scales.dtype == torch.bfloat16 and q.abs().max() <= 127
    assert ((q.float() * s - w).abs() <= s * 0.51 + 1e-6).all()
    assert torch.equal(q[7], torch.zeros(128, dtype=torch.int8))
    x = torch.randn(3, 5, 128)
    assert rel_err(head(x), F.linear(x, w)) < 1e-2 and head(x).shape == (3, 5, 300)


def test_int8_lm_head_native_kernel_is_the_product_of_its_int16_input():
    """On a CPU with VNNI the head runs moe-edge's kernel: x scaled to int16 per row (nearest
    even), exact integer dot products, fp32 out; so within fp32 rounding of that product in
    float64, far closer to the exact head than PyTorch's bf16-input kernel, every row alone."""
    from moe_edge.quant import native
    from moe_edge.quant.int8 import Int8Linear
    if not native.CPU_FLAGS <= native.cpu_flags():
        pytest.skip("CPU without the native kernel's instructions")
    head = Int8Linear(torch.randn(1000, 512) * torch.rand(1000, 1))
    assert head.native
    x = torch.randn(5, 512) * torch.tensor([[1.0], [1e-3], [1e3], [0.0], [1.0]])
    x[4, 7] = 200  # one large input among small ones
    y = head(x)
    assert y.dtype == torch.float32 and y.shape == (5, 1000)
    top = x.abs().amax(1, keepdim=True)
    xq = torch.round(x * torch.where(top > 0, torch.full_like(top, 32767) / top, 0))
    ref = (xq.double() * (top / 32767).double()) @ (head.weight_int8.double() * head.scales.double()[:, None]).T
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    assert torch.equal(y[3], torch.zeros(1000))
    for r in range(5):
        assert torch.equal(head(x[r:r + 1]), y[r:r + 1])
    exact = x.double() @ (head.weight_int8.double() * head.scales.double()[:, None]).T
    head.__dict__["_native"] = False
    theirs = head(x)
    assert rel_err(y, exact) < 1e-4 < rel_err(theirs, exact)


def test_weights_go_onto_huge_pages_once_final(gptq_ckpt, monkeypatch):
    """A CPU load moves the weights onto huge pages after the lm_head is made int8 (a head
    replaced later would leave its copy in the mapping) and before the native decode steps
    take references to them: every weight the model holds is the moved one."""
    import moe_edge.api as api
    from moe_edge.quant.int8 import Int8Linear
    seen = {}
    real = api.onto_huge_pages

    def recording(model, smallest=2**18):
        seen["head"] = type(model.lm_head)
        seen["steps"] = any(layer.native_steps is not None for layer in model.model.layers)
        return real(model, smallest=1)  # every weight, however small: the tiny model's too
    monkeypatch.setattr(api, "onto_huge_pages", recording)
    lm = load(gptq_ckpt[1], device="cpu", lm_head="int8")
    assert seen == {"head": Int8Linear, "steps": False}
    pools = {t.untyped_storage().data_ptr() for n, t in lm.model.named_buffers()
             if n.endswith(".packed") and ".experts." not in n}  # (routed experts: the store's slots)
    assert len(pools) == 1  # every other int4 weight is a view into the one advised mapping
    ids = torch.tensor([lm.encode("Weights on huge pages compute the same.")])
    ref = load(gptq_ckpt[1], device="cpu", lm_head="int8")
    with torch.no_grad():
        assert torch.equal(lm.model(ids), ref.model(ids))


def test_int8_lm_head_load_option(gptq_ckpt):
    """load(lm_head="int8") swaps the checkpoint's head for an Int8Linear, close to it; info
    and the offload plan count its bytes alike; unknown values are refused by name."""
    from moe_edge.api import load_offloaded
    from moe_edge.info import model_info
    from moe_edge.quant.int8 import Int8Linear
    gptq_ckpt = gptq_ckpt[1]
    ref, lm = load(gptq_ckpt, device="cpu"), load(gptq_ckpt, device="cpu", lm_head="int8")
    assert isinstance(lm.model.lm_head, Int8Linear) and lm.model.lm_head_int8
    assert not ref.model.lm_head_int8
    ids = torch.tensor([ref.encode("An int8 head reads half the bytes.")])
    with torch.no_grad():
        assert rel_err(lm.model(ids), ref.model(ids)) < 2e-2
    off = load_offloaded(gptq_ckpt, device="cpu", expert_cache=3, lm_head="int8")
    try:
        plain, int8 = (model_info(gptq_ckpt, "cpu", torch.float32, 3, lm_head=h) for h in ("auto", "int8"))
        assert int8.lm_head_int8 and not plain.lm_head_int8
        V, D = ref.config.vocab_size, ref.config.hidden_size
        assert plain.dense_bytes - int8.dense_bytes == V * D * 4 - (V * D + 2 * V)  # fp32 -> int8
        off_ref = load_offloaded(gptq_ckpt, device="cpu", expert_cache=3)
        assert off_ref.offload.plan.resident_bytes - off.offload.plan.resident_bytes == \
            plain.dense_bytes - int8.dense_bytes
        off_ref.offload.close()
    finally:
        off.offload.close()
    with pytest.raises(ConfigError, match="lm_head 'int4'"):
        load(gptq_ckpt, device="cpu", lm_head="int4")


def test_auto_lm_head_is_int8_on_the_cpu_for_large_untied_heads(gptq_ckpt, monkeypatch):
    """lm_head="auto" (the default) makes a head int8 from AUTO_MIN_WEIGHTS weights on, on
    the CPU, unless it is tied to the embeddings; "stored" never does. Load and info agree."""
    from moe_edge.info import model_info
    from moe_edge.quant import int8
    import moe_edge.cpu as cpu_caps
    gptq_ckpt = gptq_ckpt[1]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(cpu_caps, "native_bf16", lambda: False)  # the kernel takes bf16 activations
    assert not int8.head_in_int8("auto", cpu, 2**30, tied=False)
    monkeypatch.setattr(cpu_caps, "native_bf16", lambda: True)
    assert int8.head_in_int8("auto", cpu, 2**24, tied=False)
    assert not int8.head_in_int8("auto", cpu, 2**24 - 1, tied=False)
    assert not int8.head_in_int8("auto", cpu, 2**30, tied=True)
    assert not int8.head_in_int8("auto", cuda, 2**30, tied=False)
    assert not int8.head_in_int8("stored", cpu, 2**30, tied=False)
    assert int8.head_in_int8("int8", cpu, 1, tied=True)
    for bad, device in ((None, cpu), ("int4", cpu), ("int8", cuda)):
        with pytest.raises(ConfigError, match="lm_head"):
            int8.head_in_int8(bad, device, 2**30, tied=False)
    small = load(gptq_ckpt, device="cpu")  # the default, on a head far below the size
    assert not small.model.lm_head_int8 and not model_info(gptq_ckpt, "cpu").lm_head_int8
    monkeypatch.setattr(int8, "AUTO_MIN_WEIGHTS", 0)
    auto, stored = load(gptq_ckpt, device="cpu"), load(gptq_ckpt, device="cpu", lm_head="stored")
    assert isinstance(auto.model.lm_head, int8.Int8Linear) and not stored.model.lm_head_int8
    infos = {h: model_info(gptq_ckpt, "cpu", lm_head=h) for h in ("auto", "stored")}
    assert infos["auto"].lm_head_int8 and not infos["stored"].lm_head_int8
    assert infos["auto"].dense_bytes < infos["stored"].dense_bytes

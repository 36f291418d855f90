"""GPTQ format: pack/unpack identity, the reference dequant formula, settings, bad tensors."""

import json

import pytest
import torch

from moe_edge.errors import CheckpointError, ConfigError
from moe_edge.quant.format import (GPTQTensors, QuantConfig, check_tensors, dequantize, pack,
                                   pack_along_rows, read_quant_config, unpack)
from moe_edge.quant.gptq import quantize_rtn
from moe_edge.testing import gptq_layer


def random_layer(N, K, group, v2, act_order, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = K if group == -1 else group
    G = -(-K // size)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    lo = 0 if v2 else 1
    zeros = torch.randint(lo, 16, (G, N), generator=g, dtype=torch.int32)
    scales = (torch.rand(G, N, generator=g) * 0.1 + 1e-3).half().float()
    g_idx = torch.arange(K, dtype=torch.int32) // size
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return q, zeros, scales, g_idx


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_pack_unpack_identity(group, v2, act_order):
    q, zeros, scales, g_idx = random_layer(48, 256, group, v2, act_order)
    t = pack(q, zeros, scales, g_idx, v2=v2)
    assert t.qweight.shape == (32, 48) and t.qweight.dtype == torch.int32
    assert t.qzeros.shape == (zeros.shape[0], 6) and t.scales.dtype == torch.float16
    q2, z2, s2, g2 = unpack(t, v2=v2)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)
    assert torch.equal(s2.float(), scales) and torch.equal(g2, g_idx.long())


def test_bit_layout_matches_the_spec():
    """Input row 8r+j sits in bits 4j..4j+3 of qweight[r]."""
    q = torch.randint(0, 16, (16, 3), dtype=torch.uint8)
    packed = pack_along_rows(q)
    for r in range(2):
        for n in range(3):
            word = sum(int(q[8 * r + j, n]) << (4 * j) for j in range(8))
            assert packed[r, n].item() & 0xFFFFFFFF == word


def test_unpacking_by_bytes_equals_the_shifts(monkeypatch):
    """The byte-wise unpacking (little-endian CPUs) gives what int32 shifts give, sign bit
    included, along rows, columns and transposed."""
    import sys

    from moe_edge.quant import format as fmt
    words = torch.randint(-2**31, 2**31 - 1, (5, 24), dtype=torch.int64).to(torch.int32)
    fast = [fmt.unpack_along_rows(words), fmt.unpack_along_cols(words), fmt.unpack_rows_transposed(words)]
    assert all(t.dtype == torch.uint8 and t.is_contiguous() for t in fast)
    for r, n in [(0, 0), (4, 23), (2, 7)]:
        word = words[r, n].item() & 0xFFFFFFFF
        assert [int(fast[0][8 * r + j, n]) for j in range(8)] == [(word >> 4 * j) & 15 for j in range(8)]
        assert [int(fast[1][r, 8 * n + j]) for j in range(8)] == [(word >> 4 * j) & 15 for j in range(8)]
    assert torch.equal(fast[2], fast[0].T)
    assert torch.equal(fmt.unpack_along_rows(words.T.contiguous().T), fast[0])  # strided words
    monkeypatch.setattr(sys, "byteorder", "big")  # the shift path
    slow = [fmt.unpack_along_rows(words), fmt.unpack_along_cols(words), fmt.unpack_rows_transposed(words)]
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_v1_stores_zero_minus_one():
    q, zeros, scales, g_idx = random_layer(8, 32, 32, v2=False, act_order=False)
    v1 = pack(q, zeros, scales, g_idx, v2=False)
    v2 = pack(q, zeros - 1, scales, g_idx, v2=True)
    assert torch.equal(v1.qzeros, v2.qzeros)
    with pytest.raises(ValueError, match=r"zero points must lie in \[1, 16\]"):
        pack(q, torch.zeros_like(zeros), scales, g_idx, v2=False)


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_equals_reference_formula(act_order):
    q, zeros, scales, g_idx = random_layer(16, 64, 32, False, act_order)
    w = dequantize(pack(q, zeros, scales, g_idx))
    ref = torch.empty(16, 64)
    for n in range(16):
        for k in range(64):
            g = int(g_idx[k])
            ref[n, k] = scales[g, n] * (int(q[n, k]) - int(zeros[g, n]))
    assert torch.allclose(w, ref, atol=0, rtol=0)


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_round_trip_error_is_small(sym):
    w = torch.randn(64, 256)
    q, zeros, scales, g_idx = quantize_rtn(w, 128, sym)
    if sym:
        assert (zeros == 8).all()
    deq = dequantize(pack(q, zeros.clamp(min=1), scales, g_idx))
    assert (deq - w).abs().max() <= scales.max() * 1.01  # at most about one step off


def test_act_order_layer_dequantizes_close_to_weight():
    w = torch.randn(32, 128)
    t = gptq_layer(w, 32, act_order=True)
    assert not torch.equal(t.g_idx.sort().values, t.g_idx)  # g_idx really is non-monotone
    sqnr = 10 * torch.log10(w.pow(2).mean() / (dequantize(t) - w).pow(2).mean())
    assert sqnr > 18  # 4-bit RTN with group 32 is ~20 dB on Gaussian weights


def write_config(folder, qcfg, in_config=True):
    folder.mkdir(exist_ok=True)
    cfg = {"model_type": "deepseek"}
    if in_config:
        cfg["quantization_config"] = qcfg
    else:
        (folder / "quantize_config.json").write_text(json.dumps(qcfg))
    (folder / "config.json").write_text(json.dumps(cfg))


def test_quant_config_sources(tmp_path):
    base = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True}
    write_config(tmp_path / "a", base)
    assert read_quant_config(tmp_path / "a").group_size == 64
    write_config(tmp_path / "b", {k: v for k, v in base.items() if k != "quant_method"}, in_config=False)
    assert read_quant_config(tmp_path / "b").checkpoint_format == "gptq"
    write_config(tmp_path / "c", {**base, "checkpoint_format": "gptq_v2"})
    assert read_quant_config(tmp_path / "c").v2
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text('{"model_type": "deepseek"}')
    assert read_quant_config(tmp_path / "d") is None


@pytest.mark.parametrize("change, field", [
    ({"bits": 8}, "quantization_config.bits is 8"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "awq"}, "quant_method 'awq'"),
    ({"group_size": 100}, "group_size 100"),
])
def test_unsupported_settings_name_the_field(tmp_path, change, field):
    write_config(tmp_path, {"quant_method": "gptq", "bits": 4, "group_size": 128, **change})
    with pytest.raises(ConfigError, match=field) as e:
        read_quant_config(tmp_path)
    assert "config.json" in str(e.value)


def test_bad_tensors_are_named():
    cfg = QuantConfig(group_size=32)
    good = gptq_layer(torch.randn(16, 64), 32)
    check_tensors("layer", good, 64, 16, cfg, "ckpt")
    bad_shape = GPTQTensors(good.qweight[:4], good.qzeros, good.scales, good.g_idx)
    with pytest.raises(CheckpointError, match=r"layer.qweight"):
        check_tensors("layer", bad_shape, 64, 16, cfg, "ckpt")
    eight_bit = GPTQTensors(torch.zeros(16, 16, dtype=torch.int32), good.qzeros, good.scales, good.g_idx)
    with pytest.raises(CheckpointError, match="8-bit values, but quantization_config.bits is 4"):
        check_tensors("layer", eight_bit, 64, 16, cfg, "ckpt")
    out_of_range = GPTQTensors(good.qweight, good.qzeros, good.scales, good.g_idx + 1)
    with pytest.raises(CheckpointError, match=r"layer.g_idx has values outside \[0, 2\)"):
        check_tensors("layer", out_of_range, 64, 16, cfg, "ckpt")
    wrong_scales = GPTQTensors(good.qweight, good.qzeros, good.scales[:1], good.g_idx)
    with pytest.raises(CheckpointError, match=r"layer.scales"):
        check_tensors("layer", wrong_scales, 64, 16, cfg, "ckpt")

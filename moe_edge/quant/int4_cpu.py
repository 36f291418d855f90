"""Prefill on the CPU: dequantise an int4 weight to bf16 and run one bf16 GEMM.

PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) computes a few rows at a time and
dequantises the weight again for each: 2048 -> 2816 costs ~66 us per row from 8 rows up, so
a 512-token prompt spends 34 ms in one such matmul. Dequantising the weight once (~3 ms) and
multiplying in bf16 (AMX/AVX512-BF16: 4 ms for 512 rows) is 4x faster at 512 rows
(docs/performance.md has the prefill rates).

The weights are those the kernel uses, rounded once to bf16: logits differ from the kernel's
by ~2e-3 (relative), the size of the bf16 rounding of the activations it already makes.

The packed layout is the kernel's private business and depends on the CPU's vector width,
so it is checked once per process against `_convert_weight_to_int4pack_for_cpu`; when it is
not one this module knows, `layout_block()` is 0 and the kernel does every matmul.
"""
# N=out features, K=in features, M=rows, g=group size, Bn=the kernel's block of output rows

from __future__ import annotations

import functools

import torch

from .. import cpu

# When it pays (2 threads, AMX; 80, 128 and 512 rows through 128x128 ... 2816x2048 weights):
# the kernel costs ~11 ps per weight and row, dequantising ~0.9 ns per weight plus ~0.1 ms a
# call, the bf16 GEMM ~1 ps per weight and row. So rows >= MIN_ROWS + CALL_ROWS / weights:
# ~90 rows for DeepSeek-16B's matrices, ~130 for 512x512, never at the demo's 128x128 sizes.
MIN_ROWS = 90  # dequantising a weight costs what ~85 rows through the kernel do
CALL_ROWS = 10_000_000  # a call's fixed cost, in weight-rows of the kernel
CHUNK = 2**22  # weights dequantised at a time: bounds the transient memory (~24 MiB)


@functools.lru_cache(maxsize=None)
def enabled() -> bool:
    """A known packed layout and a CPU that multiplies bf16 natively (else bf16 GEMMs are slow)."""
    return layout_block() > 0 and cpu.native_bf16()


@functools.lru_cache(maxsize=None)
def layout_block() -> int:
    """Bn when the packed weight is [N/Bn, K, Bn/2] bytes whose low nibble holds row j and
    high nibble row j + Bn/2 of each block (AVX512 builds: 64, AVX2: 32); 0 if neither."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    for block in (64, 32):
        if packed.shape == (128, 32) and torch.equal(_unpack(packed, block, 128, 64).int(), q):
            return block
    return 0


def _unpack(packed: torch.Tensor, block: int, N: int, K: int) -> torch.Tensor:
    """[N, K] uint8 values 0..15 from the packed bytes (see layout_block)."""
    p = packed.view(N // block, K, block // 2)
    return torch.stack([p & 15, p >> 4], 2).view(N // block, K, block).transpose(1, 2).reshape(N, K)


def pack(q: torch.Tensor) -> torch.Tensor:
    """The kernel's packed weight for values q uint8 [N, K]: bit for bit what
    `_convert_weight_to_int4pack_for_cpu(q.int(), 2)` makes, from uint8 work on q (that
    takes an int32 copy, 4 bytes per value). Needs a known layout and N % Bn == 0; else None."""
    block = layout_block()
    N, K = q.shape
    if not block or N % block:
        return None
    p = q.view(N // block, 2, block // 2, K)  # [N/Bn, 2, Bn/2, K]: rows j, then j + Bn/2
    # bytes on contiguous rows, then one transpose of the half-size result: 3x faster at load
    # than the same ops on transposed (strided) views
    return (p[:, 1] << 4 | p[:, 0]).transpose(1, 2).contiguous().view(N, K // 2)  # [N/Bn, K, Bn/2]


def usable(layer, x: torch.Tensor) -> bool:
    """Whether `layer` (an int4-cpu QuantLinear) should multiply `x` [M, K] dequantised."""
    weights = layer.out_features * layer.in_features
    return (x.shape[0] >= MIN_ROWS + CALL_ROWS / weights and x.dtype == torch.bfloat16
            and enabled() and layer.out_features % layout_block() == 0)


def dequantized_t(layer, n0: int, n1: int) -> torch.Tensor:
    """W^T [K, n1 - n0] in bf16 for output rows n0..n1 (multiples of the block):
    bf16((q - 8) * scale + zero), the kernel's own weight rounded once."""
    block, K, g = layout_block(), layer.in_features, layer.group
    n, G = n1 - n0, layer.in_features // layer.group
    b = layer._buffers
    p = b["packed"].view(-1, K, block // 2)[n0 // block:n1 // block]  # [n/Bn, K, Bn/2]
    q = torch.stack([p & 15, p >> 4], 2)  # [n/Bn, K, 2, Bn/2]: rows j, then j + Bn/2
    q = q.sub_(8).view(torch.int8).to(torch.bfloat16).view(n // block, G, g, block)  # exact: -8..7
    sz = b["scale_zeros"][:, n0:n1]  # [G, n, 2]
    scale, zero = (sz[..., i].reshape(G, n // block, 1, block).transpose(0, 1).contiguous()
                   for i in (0, 1))  # [n/Bn, G, 1, Bn]: contiguous, so w comes out like q
    w = torch.addcmul(zero, q, scale)  # [n/Bn, G, g, Bn], computed in fp32, rounded once
    return w.view(n // block, K, block).transpose(0, 1).reshape(K, n)


def matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 (already in the layer's act-order) @ W^T -> [M, N] bf16."""
    N, K = layer.out_features, layer.in_features
    step = max(layout_block(), CHUNK // K // layout_block() * layout_block())
    if step >= N:
        return x @ dequantized_t(layer, 0, N)
    y = x.new_empty(x.shape[0], N)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        y[:, n0:n1] = x @ dequantized_t(layer, n0, n1)
    return y

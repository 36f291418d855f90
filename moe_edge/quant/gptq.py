"""Weight quantisation for one Linear: round-to-nearest (the baseline every GPTQ number is
compared with). Pure tensors, no I/O.
"""
# N=out features, K=in features, G=groups

from __future__ import annotations

import torch

MAXQ = 15  # 4 bits


def group_params(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [N] for the columns `w` [N, k] of one group (GPTQ's conventions:
    symmetric puts the zero at 8; asymmetric spans [min(w, 0), max(w, 0)])."""
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    # scales are stored in fp16: quantise against the rounded value so dequantising is exact
    scale = ((xmax - xmin) / MAXQ).half().float()
    zero = torch.full_like(scale, (MAXQ + 1) // 2) if sym else torch.round(-xmin / scale)
    return scale, zero.clamp(0, MAXQ)


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(w / scale) + zero, 0, 15) for `w` [N, k] with per-row scale and zero."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, MAXQ)


def quantize_rtn(w: torch.Tensor, group_size: int = 128, sym: bool = True):
    """Round-to-nearest 4-bit quantisation of `w` [N, K].

    Returns q uint8 [N, K], zeros int [G, N], scales fp32 [G, N], g_idx int32 [K].
    """
    N, K = w.shape
    size = K if group_size == -1 else group_size
    w = w.float()
    qs, zeros, scales = [], [], []
    for start in range(0, K, size):
        scale, zero = group_params(w[:, start:start + size], sym)
        qs.append(quantize_columns(w[:, start:start + size], scale, zero))
        zeros.append(zero)
        scales.append(scale)
    g_idx = torch.arange(K, dtype=torch.int32) // size
    return (torch.cat(qs, 1).to(torch.uint8), torch.stack(zeros).to(torch.int32),
            torch.stack(scales), g_idx)

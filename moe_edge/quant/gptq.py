"""Weight quantisation for one Linear: round-to-nearest (the baseline every GPTQ number is
compared with) and the GPTQ solver. Pure tensors, no I/O.
"""
# N=out features, K=in features, G=groups, B=columns in a block

from __future__ import annotations

from dataclasses import dataclass

import torch

MAXQ = 15  # 4 bits
MAX_DAMP = 1.0  # relative dampening beyond which H would be mostly the added identity


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


def _params(w: torch.Tensor, sym: bool, zero_range: tuple[int, int]):
    """group_params with the zero clamped into `zero_range` (v1 checkpoints cannot store 0)."""
    scale, zero = group_params(w, sym)
    return scale, zero.clamp(*zero_range)


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(w / scale) + zero, 0, 15) for `w` [N, k] with per-row scale and zero."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, MAXQ)


def quantize_rtn(w: torch.Tensor, group_size: int = 128, sym: bool = True,
                 zero_range: tuple[int, int] = (0, MAXQ)):
    """Round-to-nearest 4-bit quantisation of `w` [N, K].

    Returns q uint8 [N, K], zeros int [G, N], scales fp32 [G, N], g_idx int32 [K].
    """
    N, K = w.shape
    size = K if group_size == -1 else group_size
    w = w.float()
    qs, zeros, scales = [], [], []
    for start in range(0, K, size):
        scale, zero = _params(w[:, start:start + size], sym, zero_range)
        qs.append(quantize_columns(w[:, start:start + size], scale, zero))
        zeros.append(zero)
        scales.append(scale)
    g_idx = torch.arange(K, dtype=torch.int32) // size
    return (torch.cat(qs, 1).to(torch.uint8), torch.stack(zeros).to(torch.int32),
            torch.stack(scales), g_idx)


# ---------------------------------------------------------------------------- results


@dataclass
class GPTQResult:
    """One quantised Linear, in GPTQ checkpoint terms (feed straight to `format.pack`):
    W[n, k] = scales[g_idx[k], n] * (q[n, k] - zeros[g_idx[k], n])."""

    q: torch.Tensor  # uint8 [N, K], original column order
    zeros: torch.Tensor  # int32 [G, N]
    scales: torch.Tensor  # fp32 [G, N], exactly representable in fp16
    g_idx: torch.Tensor  # int32 [K], group of each original input channel
    damp: float  # relative dampening actually used (may exceed the one asked for)
    dead_columns: int  # input channels never active in calibration (weights zeroed)
    loss: float  # relative output error, see `output_error`

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K] the result stands for."""
        g = self.g_idx.long()
        return self.scales[g].T * (self.q.float() - self.zeros[g].T.float())


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor | None) -> float:
    """Relative output error tr((W-Ŵ) H (W-Ŵ)^T) / tr(W H W^T) for weights [N, K] and
    H [K, K]; H=None means isotropic inputs (H = I, plain relative weight error)."""
    w, d = w.float(), w.float() - w_hat.float()
    if H is None:
        num, den = d.pow(2).sum(), w.pow(2).sum()
    else:
        H = H.float()
        num, den = ((d @ H) * d).double().sum(), ((w @ H) * w).double().sum()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)


def rtn_result(w: torch.Tensor, group_size: int = 128, sym: bool = True,
               zero_range: tuple[int, int] = (0, MAXQ),
               H: torch.Tensor | None = None) -> GPTQResult:
    """Round-to-nearest as a GPTQResult, so callers treat both methods alike. `H` only
    feeds the reported loss (None: relative weight error)."""
    _check_zero_range(zero_range, sym)
    q, zeros, scales, g_idx = quantize_rtn(w, group_size, sym, zero_range)
    result = GPTQResult(q, zeros, scales, g_idx, damp=0.0, dead_columns=0, loss=0.0)
    result.loss = output_error(w, result.dequantize(), H)
    return result


# ---------------------------------------------------------------------------- GPTQ


class Hessian:
    """H = 2/n * sum(x x^T) over calibration rows x [K]: the curvature of a Linear's squared
    output error in its weights. Kept as a running mean in fp32 [K, K] so it neither overflows
    nor needs the rows stored.

    >>> h = Hessian(64); h.add(torch.randn(2, 10, 64)); h.add(torch.randn(5, 64)); h.n
    25
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.n = 0
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the rows of x [..., K] (any float dtype, any leading shape)."""
        K = self._H.shape[0]
        if x.shape[-1] != K:
            raise ValueError(f"Hessian.add: inputs have {x.shape[-1]} features, expected {K}")
        x = x.reshape(-1, K).to(self._H.device, torch.float32)  # [R, K]
        total = self.n + x.shape[0]
        if total == self.n:
            return
        # old mean reweighted by n/total, plus the new rows' share 2/total * x^T x
        self._H.addmm_(x.T, x, beta=self.n / total, alpha=2 / total)
        self.n = total

    @property
    def H(self) -> torch.Tensor:
        """fp32 [K, K] (the live buffer: clone before changing it)."""
        if self.n == 0:
            raise ValueError("Hessian.H: no calibration rows were added; run calibration "
                             "inputs through the layer first")
        return self._H


def _check_zero_range(zero_range: tuple[int, int], sym: bool) -> None:
    lo, hi = zero_range
    if not 0 <= lo <= hi <= MAXQ:
        raise ValueError(f"zero_range {zero_range} must satisfy 0 <= lo <= hi <= {MAXQ}")
    if sym and not lo <= (MAXQ + 1) // 2 <= hi:
        raise ValueError(f"zero_range {zero_range} excludes 8, the symmetric zero point")


def _check_args(w, H, group_size, damp, block_size, zero_range, sym) -> None:
    if w.dim() != 2 or tuple(H.shape) != (w.shape[1], w.shape[1]):
        raise ValueError(f"gptq_quantize: weight must be [N, K] and H [K, K], got "
                         f"{list(w.shape)} and {list(H.shape)}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"gptq_quantize: group_size {group_size} must be -1 or positive")
    if damp < 0 or block_size <= 0:
        raise ValueError(f"gptq_quantize: damp {damp} must be >= 0 and block_size "
                         f"{block_size} positive")
    if not torch.isfinite(w).all():
        raise ValueError("gptq_quantize: the weight holds NaN or inf")
    _check_zero_range(zero_range, sym)


def _damp_schedule(damp: float):
    """The requested damp, then x10 steps (from 1e-4 when 0 was asked) up to MAX_DAMP."""
    yield damp
    while damp < MAX_DAMP:
        damp = min(MAX_DAMP, damp * 10 if damp > 0 else 1e-4)
        yield damp


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper factor U of (H + damp*mean(diag H)*I)^-1 = U^T U, raising damp until the
    factorisations succeed (rank-deficient calibration makes H singular)."""
    mean = H.diagonal().mean()
    for d in _damp_schedule(damp):
        Hd = H.clone()
        Hd.diagonal().add_(d * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, d
    raise ValueError(f"gptq_quantize: Cholesky factorisation of the Hessian failed even with "
                     f"damp {MAX_DAMP}; H is not positive semi-definite or holds NaN/inf - "
                     "check the calibration activations")


def _group_weights(W, W1, Err1, U, j: int, i1: int, i2: int, end: int) -> torch.Tensor:
    """Columns [j, end) of the permuted weight as they stand now: the block's own columns
    have every update so far; later columns still lack this block's pending (lazy) one."""
    inside = W1[:, j - i1:min(end, i2) - i1]
    if end <= i2:
        return inside
    pending = Err1[:, :j - i1] @ U[i1:j, i2:end]  # [N, end-i2]
    return torch.cat([inside, W[:, i2:end] - pending], dim=1)


def _solve(W, U, size, group_of, static, sym, zero_range, block_size):
    """Quantise the (permuted) columns of W [N, K] one at a time, spreading each column's
    error over the later ones via U; updates past the block are applied once per block.
    Returns the codes [N, K] (permuted order) and each group's (scale, zero)."""
    N, K = W.shape
    codes = torch.empty_like(W)
    params = list(static) if static is not None else []
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]  # [N, B], [B, B]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if static is None and j % size == 0:  # a group starts: fit it to current weights
                cols = _group_weights(W, W1, Err1, U, j, i1, i2, min(j + size, K))
                params.append(_params(cols, sym, zero_range))
            scale, zero = params[group_of[j]]
            q = quantize_columns(W1[:, i:i + 1], scale, zero)[:, 0]  # [N]
            codes[:, j] = q
            Err1[:, i] = (W1[:, i] - scale * (q - zero)) / U1[i, i]
            W1[:, i:] -= Err1[:, i:i + 1] * U1[i:i + 1, i:]
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codes, params


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, group_size: int = 128, sym: bool = True,
                  act_order: bool = True, damp: float = 0.01, block_size: int = 128,
                  static_groups: bool = False,
                  zero_range: tuple[int, int] = (0, MAXQ)) -> GPTQResult:
    """GPTQ 4-bit quantisation of one Linear's weight `w` [N, K] given its input Hessian `H`
    [K, K] (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers"). The idea: quantise columns one at a time and push each
    column's rounding error onto the not-yet-quantised columns using the inverse Hessian,
    in blocks of `block_size` columns so most of the work is matrix products.

    `act_order` quantises channels by descending diag(H) (g_idx then non-monotone unless
    `static_groups`, which fits every group on the unpermuted weight up front); `damp` is
    relative to mean(diag H) and raised x10 if H is too ill-conditioned; zero points are
    clamped into `zero_range` ((1, 15) for asymmetric v1 checkpoints).

    >>> h = Hessian(64); h.add(torch.randn(256, 64))
    >>> r = gptq_quantize(torch.randn(16, 64), h.H, group_size=32)
    >>> r.q.shape, r.scales.shape, r.g_idx.shape
    (torch.Size([16, 64]), torch.Size([2, 16]), torch.Size([64]))
    """
    _check_args(w, H, group_size, damp, block_size, zero_range, sym)
    N, K = w.shape
    W, H = w.detach().float().clone(), H.detach().float()
    Hf, dead = H.clone(), H.diagonal() == 0
    Hf.diagonal()[dead] = 1  # a never-active input: its weights cannot matter, so zero them
    W[:, dead] = 0
    size = K if group_size == -1 else group_size
    ks = torch.arange(K, device=W.device)
    perm = torch.argsort(Hf.diagonal(), descending=True, stable=True) if act_order else ks
    static = [_params(W[:, s:s + size], sym, zero_range) for s in range(0, K, size)] \
        if static_groups else None
    group_of = perm // size if static_groups else ks // size  # group of permuted column j
    U, used = _inverse_cholesky(Hf[perm][:, perm], damp)
    codes, params = _solve(W[:, perm], U, size, group_of.tolist(), static, sym, zero_range,
                           block_size)
    q, g_idx = torch.empty_like(codes), torch.empty(K, dtype=torch.int32, device=W.device)
    q[:, perm], g_idx[perm] = codes, group_of.to(torch.int32)
    result = GPTQResult(q.to(torch.uint8), torch.stack([z for _, z in params]).to(torch.int32),
                        torch.stack([s for s, _ in params]), g_idx, used, int(dead.sum()), 0.0)
    result.loss = output_error(w, result.dequantize(), H)
    return result

"""An int8 lm_head: per-row symmetric int8 weights on PyTorch's `_weight_int8pack_mm`.

The lm_head is read in full for every token: DeepSeek-MoE-16B's is 102400 x 2048, 0.42 GB in
bf16, a quarter of what a 4-bit decode step reads. In int8 it is half that, and
`_weight_int8pack_mm` with bf16 activations took 14.7 ms against 19.3 ms for the bf16
F.linear (2 threads, AMX). llama.cpp's 4-bit files keep this matrix in Q8_0 or Q6_K for the
same reason, and so does `lm_head="auto"` (the default) on the CPU for heads of real models;
it moves logits by about 0.5% (relative). `lm_head="stored"` keeps the checkpoint's head.
"""
# N=out features (vocab), K=in features (hidden), M=rows

from __future__ import annotations

import torch
from torch import nn

from .. import cpu
from ..errors import ConfigError
from . import native

LM_HEADS = ("auto", "int8", "stored")  # what load(lm_head=...) accepts
# "auto" makes heads of this many weights int8: real models' (DeepSeek-MoE-16B 210M, Mixtral
# 131M, OLMoE 103M), where the head is 10-25% of a 4-bit decode step's bytes; not tiny ones.
AUTO_MIN_WEIGHTS = 2**24


def check_lm_head(lm_head: str, device: torch.device) -> None:
    """ConfigError for an unknown value, or "int8" off the CPU."""
    if lm_head not in LM_HEADS:
        raise ConfigError(f"lm_head {lm_head!r} is not supported; use one of {', '.join(LM_HEADS)} "
                          "(stored keeps the checkpoint's head)")
    if lm_head == "int8" and device.type != "cpu":
        raise ConfigError("lm_head int8 runs on the CPU's _weight_int8pack_mm; on a GPU use "
                          "auto or stored")


def head_in_int8(lm_head: str, device: torch.device, weights: int, tied: bool) -> bool:
    """Whether a 16- or 32-bit lm_head of `weights` weights is made int8 at load: always with
    "int8" (CPU only), never with "stored"; with "auto" on a CPU with native bf16 (where its
    speed was measured; the kernel takes bf16 activations) when it has AUTO_MIN_WEIGHTS or
    more and is not tied to the embeddings (an int8 copy of a tied head adds memory instead
    of replacing it). Bad values raise ConfigError (check_lm_head)."""
    check_lm_head(lm_head, device)
    if lm_head == "auto":
        return device.type == "cpu" and weights >= AUTO_MIN_WEIGHTS and not tied and cpu.native_bf16()
    return lm_head == "int8"


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale per output row, q int8 in [-127, 127], scale bf16. Where moe-edge's
    native kernels run (quant/native.py), its own matmul (csrc/int8_head.cpp: x scaled to int16
    per row, exact integer dot products, fp32 out; 1.4-2.4x PyTorch's on the 16B shape's head,
    AMD EPYC); else PyTorch's `_weight_int8pack_mm`, activations rounded to bf16 for it."""

    def __init__(self, weight: torch.Tensor, rows: int = 8192):
        super().__init__()
        N, K = weight.shape
        self.in_features, self.out_features = K, N
        q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
        scales = torch.empty(N, dtype=torch.bfloat16, device=weight.device)
        for i in range(0, N, rows):  # a block of rows at a time: no fp32 copy of the whole head
            w = weight[i:i + rows].float()
            s = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16)
            scales[i:i + rows] = s
            q[i:i + rows] = (w / s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scales = self._buffers["weight_int8"], self._buffers["scales"]
        if x.device.type == "cpu" and self.native:
            y = native.int8_mm(x.reshape(-1, self.in_features).float(), q, scales)
        else:
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [M, K]
            y = torch.ops.aten._weight_int8pack_mm(x2, q, scales)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @property
    def native(self) -> bool:
        """Whether moe-edge's kernel runs this head (native.int8_usable); cached."""
        ok = self.__dict__.get("_native")
        if ok is None:
            ok = self.__dict__["_native"] = native.int8_usable(self.in_features)
        return ok

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, int8 per-row scales"


def int8_lm_head(model: nn.Module) -> bool:
    """Replace a plain (fp32 or bf16) lm_head by an Int8Linear. -> whether it did (a head the
    checkpoint already quantized, or one with a bias, is left alone)."""
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    model.lm_head = Int8Linear(head.weight.data)
    return True

"""Building blocks shared by every layer: RMSNorm, rotary embeddings, the SiLU-GLU MLP."""
# B=batch, T=tokens, D=hidden, H=heads, Hd=head dim, I=MLP width

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one op, bit for bit the three-step form below in fp32 (checked in the tests)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32, scale in the input dtype: the order transformers and DeepSeek use.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SiLU-GLU: down(silu(gate(x)) * up(x)). Dense layers, shared experts and routed experts."""

    kernel_dtype = None  # QuantMLP: the dtype `run` takes its input in (see ExpertInput in model/moe.py)

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, width, bias=False)
        self.up_proj = nn.Linear(dim, width, bias=False)
        self.down_proj = nn.Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, Hd] for rotate-half rotary embeddings, computed in fp32 then cast;
    they broadcast over activations laid out [B, heads, T, Hd].

    The sin table has its first half negated: rotate_half(x) * sin equals
    roll(x, Hd/2) * signed_sin exactly, one op instead of four (see apply_rotary).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, Hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, : head_dim // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, Hd]; rotate-half convention (Llama, DeepSeek, Qwen, Mixtral, OLMoE), with
    the signed sin of rotary_cos_sin: cat(-x2, x1) * sin == roll(x) * signed_sin, bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Linear16(nn.Linear):
    """A Linear whose weight stays in bf16 while activations are fp32: half the memory and
    half the bytes read per token. The input is rounded to bf16 for the matmul (as in a bf16
    model); the bias, if any, is added in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Embedding16(nn.Embedding):
    """An Embedding stored in bf16 that returns rows in `out_dtype` (exact: a widening cast)."""

    out_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)


def store_transposed(linear: nn.Linear) -> bool:
    """Keep an fp32 CPU Linear's weight as the transposed view of an [in, out] tensor (same
    values, same shape). One row through a 4096x128 head then takes 35 us instead of 63 (MKL's
    GEMV on 2 threads, AMD EPYC), a 32000x1024 one 6.3 ms instead of 9.3; the sums run in
    another order, so logits move in the last fp32 bits. -> whether it changed anything."""
    w = linear.weight
    if type(linear) is not nn.Linear or w.dtype != torch.float32 or w.device.type != "cpu" \
            or not w.is_contiguous() or w.dim() != 2:
        return False
    linear.weight.data = w.detach().t().contiguous().t()
    return True


BF16_KINDS = {nn.Linear: Linear16, nn.Embedding: Embedding16}  # what keep_bf16 converts
# Smaller Linears stay fp32. One token through a weight streamed from DRAM (2 threads, AMX):
# 1408x2048 0.53 ms in bf16 against 0.62-0.75 in fp32; 4096x128 equal; 64x128 0.045 against
# 0.010 ms, oneDNN's bf16 call overhead. Small weights sit in cache anyway.
BF16_MIN_LINEAR = 2**20  # elements


def stays_bf16(kind: type, numel: int) -> bool:
    """Whether keep_bf16 keeps a bf16 weight of this module kind and size in bf16."""
    return kind is nn.Embedding or (kind is nn.Linear and numel >= BF16_MIN_LINEAR)


def keep_bf16(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Give every Linear and Embedding whose weight is bf16 in a model of `dtype` activations
    its bf16 class (Linear16, Embedding16). -> the names converted.

    Which weights are bf16 is decided once, at load: `load_weights(keep16=True)` reads the
    embeddings and large Linears a checkpoint stores in bf16 as they are (`stays_bf16`).
    Routers and norms stay fp32. On DeepSeek-MoE-16B GPTQ the embeddings and lm_head would
    be 1.7 GB of fp32, most of the resident part, and the lm_head is read in full for every
    token; on a bf16 checkpoint every routed expert halves, in memory and per load.
    """
    done = []
    for name, module in model.named_modules():
        cls = BF16_KINDS.get(type(module))
        if cls is None or module.weight.dtype != torch.bfloat16:
            continue
        module.__class__ = cls
        if cls is Embedding16:
            module.out_dtype = dtype
        done.append(name)
    return done

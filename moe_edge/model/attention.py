"""Multi-head attention with GQA, optional q/k norm and qkv bias, and a preallocated KV cache."""
# B=batch, T=new tokens, S=cached+new tokens, H=query heads, K=kv heads, Hd=head dim, D=hidden

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, apply_rotary


class KVCache:
    """Keys and values for every layer, preallocated to `capacity` positions, in `dtype`
    (bf16 on a CPU with native bf16 for fp32 activations: half the bytes, as llama.cpp's f16).

    Decoding writes in place; nothing is allocated per token. A cache kept across requests
    (generation.PrefixCache) is cut back with `truncate` and grown with `reserve`, which
    reallocates at least doubling, up to `limit` positions (default: the model's maximum).
    """

    def __init__(self, config: ModelConfig, batch: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", limit: int | None = None,
                 room=None):
        self.shape = (batch, config.num_kv_heads, 0, config.head_dim)
        self.layers, self.dtype, self.device = config.num_layers, dtype, device
        self.limit = max(limit or config.max_position_embeddings, capacity)
        self.room = room  # offload.cache.KVRoom: memory taken from the expert cache as it grows
        self.k, self.v, self.capacity = [], [], 0
        if room is not None:
            room.make_room(self, 2 * self.layers * self._layer_bytes(capacity))
        self.k, self.v = ([self._zeros(capacity) for _ in range(self.layers)] for _ in range(2))
        self.capacity = capacity
        self.length = 0  # positions filled, advanced by the model after all layers ran

    def _layer_bytes(self, capacity: int) -> int:
        B, K, _, Hd = self.shape
        return B * K * capacity * Hd * self.dtype.itemsize

    def _zeros(self, capacity: int) -> torch.Tensor:
        B, K, _, Hd = self.shape
        return torch.zeros((B, K, capacity, Hd), dtype=self.dtype, device=self.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the next tokens are written there)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of {self.length} positions to {length}")
        self.length = length

    def reserve(self, positions: int) -> None:
        """Room for `positions` in all; the filled ones are kept. Amortised: a reallocation
        at least doubles the capacity, capped at `limit`."""
        if positions <= self.capacity:
            return
        if positions > self.limit:
            raise ValueError(f"context full: {positions} positions needed, the KV cache holds "
                             f"at most {self.limit}; raise the context size")
        capacity = min(max(positions, 2 * self.capacity), self.limit)
        if self.room is not None:  # the growth, and one layer's old tensor alive while it copies
            grown = self._layer_bytes(capacity) - self._layer_bytes(self.capacity)
            self.room.make_room(self, 2 * self.layers * grown + self._layer_bytes(self.capacity))
        for tensors in (self.k, self.v):
            for i, old in enumerate(tensors):  # a tensor at a time: never two caches at once
                tensors[i] = self._zeros(capacity)
                tensors[i].narrow(2, 0, self.length).copy_(old.narrow(2, 0, self.length))
                del old
        self.capacity = capacity

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"context full: {end} positions needed, the KV cache holds "
                             f"{self.capacity}; raise the context size")
        T = end - start
        self.k[layer].narrow(2, start, T).copy_(k)  # narrow: no Python index parsing per call
        self.v[layer].narrow(2, start, T).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer, self.num_heads, self.num_kv_heads = layer, c.num_heads, c.num_kv_heads
        self.head_dim, self.clip, self.window = c.head_dim, c.clip_qkv, c.sliding_window
        self.decode_kernel = None  # one query row over a bf16 cache, no mask (quant.native.decode_attention)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        self.qk_norm = c.qk_norm
        if c.qk_norm is not None:
            # Qwen3 normalises each head; OLMoE the whole projection before the head split.
            q_dim = c.head_dim if c.qk_norm == "head" else c.num_heads * c.head_dim
            k_dim = c.head_dim if c.qk_norm == "head" else c.num_kv_heads * c.head_dim
            self.q_norm = RMSNorm(q_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(k_dim, c.rms_norm_eps)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v [B, H|K, T, Hd], q and k rotated. With q, k and v fused into one
        projection (`qkv`, see quant.qlinear.fuse_qkv), q's and k's heads are adjacent and
        rotate in one go; the views and splits are single calls (decode: per layer and token)."""
        B, T, _ = x.shape
        H, K, Hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._modules.get("qkv")
        if qkv is not None and self.qk_norm is None and self.clip is None:
            qk, v = qkv(x).view(B, T, H + 2 * K, Hd).transpose(1, 2).split((H + K, K), 1)
            q, k = apply_rotary(qk, cos, sin).split((H, K), 1)
            return q, k, v
        if qkv is not None:
            q, k, v = qkv(x).split((H * Hd, K * Hd, K * Hd), -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = (t.view(B, T, -1, Hd).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._project(x, cos, sin)  # [B, H|K, T, Hd]
        if cache is not None:
            cached_k, cached_v = cache.update(self.layer, start, k, v)  # [B, K, S, Hd], the cache's dtype
            if start > 0 or cached_k.dtype == k.dtype:  # a first prompt attends at full precision
                k, v = cached_k, cached_v
        if self.decode_kernel is not None and T == 1 and B == 1 and k.dtype == torch.bfloat16:
            out = self.decode_kernel(q, k, v, self.head_dim ** -0.5)  # [B, H, T, Hd] fp32
        else:  # SDPA in the keys' dtype (a bf16 cache's prompt continuation: 16 bits)
            mask = self._mask(start, T, k.shape[2], x.device)
            out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask,
                                                 is_causal=mask is None and T > 1,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.to(x.dtype).transpose(1, 2).reshape(B, T, -1))

    def _mask(self, start: int, T: int, S: int, device) -> torch.Tensor | None:
        """None when SDPA's own causal flag (or no mask at all) is exact."""
        if self.window is None and (start == 0 or T == 1):
            return None
        q_pos = torch.arange(start, start + T, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        allowed = k_pos <= q_pos  # [T, S]
        if self.window is not None:
            allowed &= q_pos - k_pos < self.window
        return allowed

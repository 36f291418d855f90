"""The decoder: embeddings, pre-norm layers (attention + dense MLP or MoE block), lm_head."""
# B=batch, T=new tokens, D=hidden, V=vocab

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention, KVCache
from .layers import MLP, RMSNorm, rotary_cos_sin
from .moe import MoEBlock


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = (MoEBlock(config) if config.moe_layers[layer]
                    else MLP(config.hidden_size, config.intermediate_size))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # one decode row through each block in one native call, bit for bit these modules'
        # result; set at load where the weights fit (quant/decode_steps.py)
        self.native_steps = None
        # callables tap(x) on the residual stream [B, T, D] before each block, on every path
        # (the offload prefetcher guesses the next experts from them)
        self.before_attention: list = []
        self.before_mlp: list = []

    def forward(self, x, cos, sin, cache: KVCache | None, start: int) -> torch.Tensor:
        steps = self.native_steps
        if steps is not None and x.shape[0] == 1 and x.shape[1] == 1:
            return steps(self, x, cos, sin, cache, start)
        for tap in self.before_attention:
            tap(x)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        for tap in self.before_mlp:
            tap(x)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Holds the `model.*` weights under their Hugging Face names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoEForCausalLM(nn.Module):
    """A config-driven MoE decoder: DeepSeek-MoE, Qwen2/3-MoE, Mixtral, OLMoE.

    >>> model = MoEForCausalLM(config)
    >>> cache = model.new_cache(batch=1, capacity=256)
    >>> logits = model(prompt_ids, cache)             # prefill, [B, T, V]
    >>> logits = model(next_id[:, None], cache)        # one decode step
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.kv_dtype: torch.dtype | None = None  # the KV cache's; None: the activations' (see api._finish)
        self.kv_room = None  # offloaded: the KV caches' memory, taken from the expert cache (offload.cache.KVRoom)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the embeddings may be stored narrower, see keep_bf16)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def moe_blocks(self) -> dict[int, MoEBlock]:
        return {i: l.mlp for i, l in enumerate(self.model.layers) if isinstance(l.mlp, MoEBlock)}

    def new_cache(self, batch: int = 1, capacity: int | None = None) -> KVCache:
        capacity = capacity or self.config.max_position_embeddings
        return KVCache(self.config, batch, capacity, self.kv_dtype or self.dtype, self.device, room=self.kv_room)

    def _rotary(self, start: int, T: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, Hd] for positions start..start+T, from a table built once (per
        device and dtype) instead of six small ops per decode step."""
        table = getattr(self, "_rope_table", None)
        if table is None or table[0].shape[0] < start + T or table[0].device != x.device \
                or table[0].dtype != x.dtype:
            n = max(2 * (start + T), 4096)  # grows by doubling; a 128K-position table is 128 MiB
            positions = torch.arange(n, device=x.device)
            table = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
            self._rope_table = table
        return table[0][start:start + T], table[1][start:start + T]

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) for `input_ids` [B, T].

        With a cache, the tokens continue the cached sequence and are appended to it.
        """
        start = cache.length if cache is not None else 0
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rotary(start, T, x)
        row = T == 1 and input_ids.shape[0] == 1
        for layer in self.model.layers:
            steps = layer.native_steps if row else None
            if steps is not None and steps.direct:  # no hook on the layer: skip nn.Module's call
                x = steps(layer, x, cos, sin, cache, start)
            else:
                x = layer(x, cos, sin, cache, start)
        if cache is not None:
            cache.length = start + T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

"""Predict the next layers' experts and start loading them while this layer computes.

The idea (Eliseev & Mazur 2023, "Fast Inference of Mixture-of-Experts Language Models with
Offloading"): hidden states change slowly across layers, so the router of layer l+1 applied
to layer l's hidden state already names most of the experts layer l+1 will pick.
"""
# T=tokens, D=hidden

from __future__ import annotations

import torch

from .cache import ExpertCache


class Prefetcher:
    """Hooks each layer's post-attention norm: its input is the residual stream after
    attention, which the next MoE layers' norms and routers turn into a prediction."""

    def __init__(self, model, cache: ExpertCache, depth: int = 1):
        moe_ids = sorted(model.moe_blocks())
        self.model, self.cache, self.depth = model, cache, depth
        self.hooks = []
        for l, layer in enumerate(model.model.layers):
            ahead = [m for m in moe_ids if m > l][:depth]
            if ahead:
                self.hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(self._hook(ahead)))

    def _hook(self, ahead: list[int]):
        def hook(module, args):
            h = args[0].reshape(-1, args[0].shape[-1])  # [T, D]
            for layer in ahead:
                self.cache.schedule_prefetch(layer, self.predict(layer, h))
        return hook

    @torch.no_grad()
    def predict(self, layer: int, h: torch.Tensor) -> list[int]:
        """Experts layer `layer` would pick for residual `h`, most requested first."""
        target = self.model.model.layers[layer]
        _, ids = target.mlp.gate(target.post_attention_layernorm(h))
        counts = torch.bincount(ids.reshape(-1), minlength=target.mlp.gate.weight.shape[0])
        order = torch.argsort(counts, descending=True, stable=True)
        return [int(e) for e in order[: self.cache.slots_per_layer] if counts[e] > 0]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

"""Predict the next layers' experts and start loading them while this layer computes.

The idea (Eliseev & Mazur 2023, "Fast Inference of Mixture-of-Experts Language Models with
Offloading"): hidden states change slowly across layers, so the router of layer l+1 applied
to layer l's hidden state already names most of the experts layer l+1 will pick.
"""
# T=tokens, D=hidden

from __future__ import annotations

import statistics
import time

import torch

from .cache import ExpertCache


class PrefetchGovernor:
    """Whether decode prefetches, decided by measuring it: a prefetch pays only when the load
    it hides costs more than predicting it, issuing it and the misses its evictions cause,
    which depends on the disk, the model and its routing. So decode steps alternate in
    epochs of `epoch` tokens between prefetching and not until each side has `explore`
    epochs; the faster side (median step time) then runs for `exploit` steps, and one epoch
    of each is measured again, the oldest epochs forgotten (`keep` per side). A comparison
    that is already `decisive` (one side's median that much slower) after a pair of epochs
    ends the exploring early: measuring the losing side costs what it loses (the 16B-sized
    demo x3 at 35/64 slots under a memory limit: 85 ms steps with prefetch, 70 without).

    `step()` is called once per decode step; `on` says what this step does.
    """

    def __init__(self, epoch: int = 8, explore: int = 3, exploit: int = 192, keep: int = 6,
                 decisive: float | None = 0.1):
        self.epoch, self.exploit, self.keep, self.decisive = epoch, exploit, keep, decisive
        self.times: dict[bool, list[float]] = {True: [], False: []}  # per-epoch median step time
        self.plan: list[bool] = [m for _ in range(explore) for m in (True, False)]  # epochs to measure
        self.on, self.left, self.measuring = True, 0, False
        self.steps: list[float] = []
        self.last: float | None = None
        self.chosen: bool | None = None  # what the last comparison picked
        self.fresh = 0  # epochs measured since the last choice
        self.steps_on = self.steps_off = 0

    def step(self) -> None:
        now = time.perf_counter()
        if self.last is not None and self.measuring:
            self.steps.append(now - self.last)
        self.last = now
        if self.left == 0:
            self._next_phase()
        self.left -= 1
        self.steps_on += self.on
        self.steps_off += not self.on

    def pause(self) -> None:
        """A non-decode call (prefill) came between steps: the next interval is not a step."""
        self.last = None

    def _next_phase(self) -> None:
        if self.measuring and self.steps:
            side = self.times[self.on]
            side.append(statistics.median(self.steps))
            del side[:-self.keep]
            self.fresh += 1
        self.steps = []
        if self.plan and not self._decided():
            self.on, self.left, self.measuring = self.plan.pop(0), self.epoch, True
            return
        self.chosen = statistics.median(self.times[True]) <= statistics.median(self.times[False])
        self.on, self.left, self.measuring, self.fresh = self.chosen, self.exploit, False, 0
        self.plan = [True, False] if self.chosen else [False, True]

    def _decided(self) -> bool:
        """After a whole pair of epochs measured since the last choice: whether one side is
        already `decisive`ly slower."""
        if self.decisive is None or self.fresh < 2 or self.fresh % 2:
            return False
        on, off = statistics.median(self.times[True]), statistics.median(self.times[False])
        return abs(on - off) > self.decisive * min(on, off)

    def summary(self) -> dict:
        return {"chosen": self.chosen, "steps_on": self.steps_on, "steps_off": self.steps_off,
                "step_ms_on": _ms(self.times[True]), "step_ms_off": _ms(self.times[False])}


def _ms(times: list[float]) -> float | None:
    return round(1e3 * statistics.median(times), 3) if times else None


class Prefetcher:
    """Two guesses per MoE layer m. Early: after each earlier layer's attention (the input
    of its post-attention norm), for the next `depth` MoE layers, issued behind that layer's
    own loads; most lead time. Refined (`refine`): at m's own input, before its attention,
    issued at once; one attention block of lead time but a much closer residual. On the demo
    model recall at top-6 / top-12 is 0.54 / 0.74 from layer m's input against 0.28 / 0.45
    from the layer before's post-attention residual for the first MoE layer, and
    0.73-0.78 / 0.94-0.95 against 0.66-0.68 / 0.87-0.89 for the others. With a governor
    (the default of load_offloaded) decode steps prefetch only while that measures faster.
    """

    def __init__(self, model, cache: ExpertCache, depth: int = 1, width: int | None = None,
                 refine: bool = True, governor: PrefetchGovernor | None = None):
        """`width`: experts predicted per layer (default top-k); wider trades bandwidth for
        recall. `governor`: decides per decode step whether to prefetch (None: always)."""
        moe_ids = sorted(model.moe_blocks())
        self.model, self.cache, self.depth, self.governor = model, cache, depth, governor
        self.width = min(width or model.config.top_k, cache.slots_per_layer)
        self.hooks = []
        if governor is not None:  # a step starts at the first layer's input, before any guess
            self.hooks.append(model.model.layers[0].input_layernorm.register_forward_pre_hook(self._step))
        for l, layer in enumerate(model.model.layers):
            ahead = [m for m in moe_ids if m > l][:depth]
            if ahead:
                self.hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(self._hook(ahead)))
            if refine and l in moe_ids:
                self.hooks.append(layer.input_layernorm.register_forward_pre_hook(self._hook([l], now=True)))

    def _step(self, module, args) -> None:
        if args[0].shape[:-1].numel() == 1:
            self.governor.step()
        else:
            self.governor.pause()

    def _hook(self, layers: list[int], now: bool = False):
        def hook(module, args):
            h = args[0].reshape(-1, args[0].shape[-1])  # [T, D]
            if self.governor is not None and h.shape[0] == 1 and not self.governor.on:
                return  # decode, and measured not to pay
            for layer in layers:
                self.cache.schedule_prefetch(layer, self.predict(layer, h), now)
        return hook

    @torch.no_grad()
    def predict(self, layer: int, h: torch.Tensor) -> list[int]:
        """The `width` experts layer `layer` would rank highest for residual `h` [T, D]
        (over several tokens: the most often ranked, most first)."""
        target = self.model.model.layers[layer]
        # .forward, not __call__: calling the norm would fire the prefetch hook on it, which
        # would predict the layer after from this residual, and so on down the model
        probs = target.mlp.gate.probs(target.post_attention_layernorm.forward(h))  # [T, E]
        ids = probs.topk(self.width, dim=-1).indices
        if ids.shape[0] == 1:  # decode: one token, already ordered
            return ids[0].tolist()
        counts = torch.bincount(ids.reshape(-1), minlength=probs.shape[1])
        order = torch.argsort(counts, descending=True, stable=True)[: self.cache.slots_per_layer]
        return [e for e, c in zip(order.tolist(), counts[order].tolist()) if c > 0]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

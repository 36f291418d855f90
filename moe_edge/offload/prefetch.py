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
    which depends on the disk, the model and its routing.

    Decode steps run in pairs of epochs of `epoch` steps, one without prefetch and one with,
    back to back within one generation; a pair gives one ratio, the median step time with
    prefetch over the median without. Only the two halves of one pair are compared, because
    step times drift more between generations than prefetch changes them (a warm-up reply
    that hits in cache against a long one that misses: 28 against 79 ms a step on the
    16B-sized demo x3). So a prefill in the middle of a pair drops the pair, and the first
    step of each epoch is not measured (the other side's loads still land in it). A side
    also leaves the cache to the next epoch (prefetched experts that were never used, in
    slots that held useful ones), so pairs alternate which side goes first. After up to
    `explore` pairs the side the median ratio favours runs for `exploit` steps, then one
    pair is measured again, the oldest ratios forgotten (`keep`); each re-measure that
    confirms the choice doubles the next run, up to `exploit_max` steps (a choice that flips
    starts again from `exploit`). Prefetch must win by
    `favour_off`: what it leaves behind and the CPU its reads take from other threads fall
    outside its own epochs (the 16B-sized demo x3, unlimited, 35 of 64 slots: pairs measured
    it 1.02 and 0.68 of off, and 96 steps with it ran at 0.91 of off). A median ratio
    `decisive` against prefetch (above 1 + decisive) ends the exploring early: measuring
    the losing side costs what it loses. One pair for prefetch never does: a pair can be
    that far off by noise (the 16B-sized demo x3 under a memory limit: 0.88 after one pair,
    then 17.6 tok/s with prefetch against 22.9 without), and a wrong "on" costs more than
    a wrong "off" (its reads delay the misses and its guesses evict used experts).

    Prefetch starts off, unmeasured, for the first `start_after` decode steps (counted over
    every generation): on every model and tier measured here it loses, and measuring it costs
    what it loses, which a short reply cannot earn back (the 16B-sized demo x3 under a
    limit of dense + 25%, 48 tokens: 11.2-11.7 tok/s governed from the first step against
    12.5 with prefetch off; its exploring epochs read 7-30 MiB a token more).

    `step()` is called once per decode step; `on` says what this step does.
    """

    def __init__(self, epoch: int = 6, explore: int = 3, exploit: int = 192, keep: int = 6,
                 decisive: float | None = 0.1, favour_off: float = 0.05, start_after: int = 128,
                 exploit_max: int = 1536):
        if epoch < 2:
            raise ValueError(f"a governor epoch of {epoch} steps measures nothing: its first step is not measured")
        if explore < 1:
            raise ValueError(f"a governor must measure at least one pair of epochs before choosing, not {explore}")
        self.epoch, self.keep, self.decisive = epoch, keep, decisive
        self.exploit_base, self.exploit_max, self.exploit = exploit, max(exploit, exploit_max), exploit
        self.favour_off = favour_off
        self.ratios: list[float] = []  # per measured pair: median step with prefetch / without
        self.pairs_left = explore  # pairs to measure before choosing
        self.pair: dict[bool, float] = {}  # the current pair's measured epochs: side -> median step
        self.on, self.left, self.measuring = False, start_after, False
        self.steps: list[float] = []
        self.last: float | None = None
        self.chosen: bool | None = None  # what the last comparison picked
        self.fresh = 0  # pairs measured since the last choice
        self.pairs = 0  # pairs started: they alternate which side goes first
        self.steps_on = self.steps_off = 0

    def step(self) -> None:
        now = time.perf_counter()
        if self.last is not None and self.measuring and self.left < self.epoch:  # not an epoch's first step
            self.steps.append(now - self.last)
        self.last = now
        if self.left == 0:
            self._next_phase()
        self.left -= 1
        self.steps_on += self.on
        self.steps_off += not self.on

    def pause(self) -> None:
        """A non-decode call (prefill) came between steps: the next interval is not a step,
        and a pair being measured is measured again from the start."""
        self.last = None
        if self.measuring:
            self.pair, self.steps, self.left = {}, [], 0

    def _next_phase(self) -> None:
        if self.measuring and self.steps:
            self.pair[self.on] = statistics.median(self.steps)
            if len(self.pair) == 2:
                self.ratios = (self.ratios + [self.pair[True] / self.pair[False]])[-self.keep:]
                self.pair, self.fresh, self.pairs_left = {}, self.fresh + 1, self.pairs_left - 1
        self.steps = []
        if self.pair:  # the pair's other half
            self.on, self.left = not self.on, self.epoch
        elif self.pairs_left > 0 and not self._decided():
            self.on, self.left, self.measuring = self.pairs % 2 == 1, self.epoch, True
            self.pairs += 1
        else:
            chosen = statistics.median(self.ratios) < 1.0 - self.favour_off
            confirmed = chosen == self.chosen
            self.exploit = min(2 * self.exploit, self.exploit_max) if confirmed else self.exploit_base
            self.chosen = chosen
            self.on, self.left, self.measuring = chosen, self.exploit, False
            self.fresh, self.pairs_left = 0, 1

    def _decided(self) -> bool:
        """Whether the pairs measured since the last choice already rule prefetch out."""
        if self.decisive is None or self.fresh == 0:
            return False
        return statistics.median(self.ratios[-self.fresh:]) > 1.0 + self.decisive

    def summary(self) -> dict:
        return {"chosen": self.chosen, "steps_on": self.steps_on, "steps_off": self.steps_off,
                "ratios": [round(r, 3) for r in self.ratios]}


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
        self.taps: list[tuple[list, object]] = []  # (a layer's tap list, our tap in it)
        if governor is not None:  # a step starts at the first layer's input, before any guess
            self._tap(model.model.layers[0].before_attention, self._step)
        for l, layer in enumerate(model.model.layers):
            ahead = [m for m in moe_ids if m > l][:depth]
            if ahead:
                self._tap(layer.before_mlp, self._guess(ahead))
            if refine and l in moe_ids:
                self._tap(layer.before_attention, self._guess([l], now=True))

    def _tap(self, taps: list, tap) -> None:
        taps.append(tap)
        self.taps.append((taps, tap))

    def _step(self, x: torch.Tensor) -> None:
        if x.shape[:-1].numel() == 1:
            self.governor.step()
        else:
            self.governor.pause()

    def _guess(self, layers: list[int], now: bool = False):
        def tap(x: torch.Tensor) -> None:
            h = x.reshape(-1, x.shape[-1])  # [T, D]
            if self.governor is not None and h.shape[0] == 1 and not self.governor.on:
                return  # decode, and measured not to pay
            for layer in layers:
                self.cache.schedule_prefetch(layer, self.predict(layer, h), now)
        return tap

    @torch.no_grad()
    def predict(self, layer: int, h: torch.Tensor) -> list[int]:
        """The `width` experts layer `layer` would rank highest for residual `h` [T, D]
        (over several tokens: the most often ranked, most first)."""
        target = self.model.model.layers[layer]
        # .forward, not __call__: no nn.Module dispatch per guess, and no hook anyone put on
        # the norm fires for a guess the model did not run
        probs = target.mlp.gate.probs(target.post_attention_layernorm.forward(h))  # [T, E]
        ids = probs.topk(self.width, dim=-1).indices
        if ids.shape[0] == 1:  # decode: one token, already ordered
            return ids[0].tolist()
        counts = torch.bincount(ids.reshape(-1), minlength=probs.shape[1])
        order = torch.argsort(counts, descending=True, stable=True)[: self.cache.slots_per_layer]
        return [e for e, c in zip(order.tolist(), counts[order].tolist()) if c > 0]

    def remove(self) -> None:
        for taps, tap in self.taps:
            taps.remove(tap)
        self.taps.clear()

"""The fast tier: a fixed pool of expert slots per MoE layer, replaced by a policy (LRFU by default).

Slots are allocated once; a load copies one expert's buffer from the store into a slot
(on a worker thread for host stores, on a side CUDA stream for a GPU). All bookkeeping runs
on the caller's thread; workers only move bytes. A load in flight is awaited, never issued
twice; experts the current layer has asked for and not finished are pinned.
"""
# E=experts of a layer, S=slots of a layer

from __future__ import annotations

import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from ..memory import release_pages
from ..model.layers import MLP
from ..model.moe import ExpertInput
from ..quant.decode_steps import native_mlp
from ..quant.experts import apply_together
from .loader import Loader
from .policy import DEFAULT, POLICIES
from .stats import LayerStats, OffloadStats
from .store import ExpertLayout, expert_from_buffer, slot_buffers


RECENT = 64  # prompt tokens whose picks the policy replays: LRFU's weight on older ones is < 2^-6


@dataclass
class Slot:
    buf: torch.Tensor  # uint8 [stride], on the fast device
    expert: int | None = None
    handle: object = None  # a pending load (Future or CUDA event); None once ready
    module: MLP | None = None  # views into buf; reused while experts share a layout
    layout: ExpertLayout | None = None
    prefetched: bool = False  # loaded by a prefetch and not used since
    native: object = None  # the module as a native Int4Mlp (False: it has none); kept with the module


@dataclass
class LayerCache:
    slots: list[Slot]
    policy: object
    where: dict[int, int] = field(default_factory=dict)  # expert -> slot index
    pinned: set[int] = field(default_factory=set)
    stats: LayerStats = field(default_factory=LayerStats)
    predicted: set[int] = field(default_factory=set)  # the prefetcher's guess for the next call
    started: set[int] = field(default_factory=set)  # demand loads started ahead (`start`), not yet asked for


class ExpertCache:
    """Experts of every MoE layer: `slots_per_layer` resident at a time, the rest in `store`.

    >>> cache = ExpertCache(store, layouts, index_of, slots_per_layer=8, device=torch.device("cpu"),
    ...                     hidden=2048, width=1408)
    >>> for e, expert in cache.experts_for(layer=3, ids=[5, 9, 41]):
    ...     y = expert(x_rows)
    """

    def __init__(self, store, layouts: dict[tuple[int, int], ExpertLayout],
                 index_of: Callable[[int, int], int], slots_per_layer: int, device: torch.device,
                 hidden: int, width: int, policy: str = DEFAULT, threaded: bool = True, reads: int = 4):
        same: dict[ExpertLayout, ExpertLayout] = {}  # equal layouts as one object: compared by identity
        layouts = {key: same.setdefault(layout, layout) for key, layout in layouts.items()}
        self.store, self.layouts, self.index_of = store, layouts, index_of
        self.device, self.hidden, self.width = device, hidden, width
        self.slots_per_layer = slots_per_layer
        self.loader = Loader(store, device, threaded, reads)
        layers = sorted({layer for layer, _ in layouts})
        bufs = iter(slot_buffers(store.stride, slots_per_layer * len(layers), device))
        self.layers = {l: LayerCache([Slot(next(bufs)) for _ in range(slots_per_layer)], POLICIES[policy]())
                       for l in layers}
        self._prefetch_queue: list[tuple[int, list[int]]] = []

    # --- bookkeeping -------------------------------------------------------------------
    def resident(self, layer: int) -> list[int]:
        return sorted(self.layers[layer].where)

    def stats(self) -> OffloadStats:
        return OffloadStats({l: c.stats for l, c in self.layers.items()})

    def reset_stats(self) -> None:
        for c in self.layers.values():
            c.stats = LayerStats()

    def _victim(self, lc: LayerCache, prefetch: bool = False) -> int | None:
        """A free slot, else the policy's pick among ready, unpinned experts; for a prefetch,
        not one predicted for the layer's next call too (one guess never evicts another)."""
        slots, pinned = lc.slots, lc.pinned
        if len(lc.where) < len(slots):
            return next(i for i, slot in enumerate(slots) if slot.expert is None)
        spare = lc.predicted if prefetch else ()
        ready = [e for e, i in lc.where.items() if e not in pinned and e not in spare
                 and (slots[i].handle is None or Loader.done(slots[i].handle))]
        e = lc.policy.victim(ready)
        if e is None and prefetch:
            return None
        if e is None:  # a prefetch still queued gives its slot up before anyone waits
            e = next((e for e, i in lc.where.items() if e not in lc.pinned and self._cancel(lc.slots[i])), None)
            lc.stats.bytes_moved -= self.store.stride if e is not None else 0  # never read
        return None if e is None else lc.where[e]

    @staticmethod
    def _cancel(slot: Slot) -> bool:
        if slot.prefetched and Loader.cancel(slot.handle):
            slot.handle = None
            return True
        return False

    def request(self, layer: int, expert: int, prefetch: bool = False) -> Slot | None:
        """Make `expert` resident or loading; returns its slot (None: a prefetch with no room)."""
        lc = self.layers[layer]
        if expert in lc.where:
            slot = lc.slots[lc.where[expert]]
            if not prefetch:
                self._asked_for(lc, layer, slot)
            return slot
        i = self._victim(lc, prefetch)
        if i is None:
            if prefetch:
                return None
            raise RuntimeError(f"layer {layer}: every one of {len(lc.slots)} slots is pinned; the "
                               "cache needs at least top-k slots per layer")
        return self._load_into(layer, lc, i, expert, prefetch)

    def _asked_for(self, lc: LayerCache, layer: int, slot: Slot) -> None:
        """A step asks for the resident (or loading) expert in `slot`: a hit, counted and
        touched, its prefetch made a demand load if still queued; or, loaded by `start` this
        step, a miss counted already."""
        if slot.expert in lc.started:
            lc.started.discard(slot.expert)
            return
        if slot.prefetched and self._cancel(slot):  # still queued: not behind the other guesses
            slot.handle = self.loader.start(self.index_of(layer, slot.expert), slot.buf)
        lc.stats.hits += 1
        lc.stats.prefetch_used += slot.prefetched
        slot.prefetched = False
        lc.policy.touch(slot.expert)

    def _load_into(self, layer: int, lc: LayerCache, i: int, expert: int, prefetch: bool) -> Slot:
        slot = lc.slots[i]
        self._evict(lc, slot)
        if slot.module is not None and self.layouts[(layer, expert)] is not slot.layout:
            slot.module = slot.native = None  # same layout: the module's views already show the new bytes
        slot.expert, slot.prefetched, slot.layout = expert, prefetch, self.layouts[(layer, expert)]
        lc.where[expert] = i
        (lc.policy.admit if prefetch else lc.policy.touch)(expert)  # a guess is no use
        slot.handle = self.loader.start(self.index_of(layer, expert), slot.buf, prefetch)
        lc.stats.bytes_moved += self.store.stride
        if prefetch:
            lc.stats.prefetch_issued += 1
        else:
            lc.stats.misses += 1
        return slot

    @staticmethod
    def _evict(lc: LayerCache, slot: Slot) -> None:
        if slot.expert is not None:
            lc.stats.prefetch_wasted += slot.prefetched
            del lc.where[slot.expert]
            lc.policy.forget(slot.expert)
            slot.expert, slot.prefetched = None, False

    def give_up_slots(self) -> int:
        """One slot fewer in every layer, for the KV cache (KVRoom): the policy's victim (a
        free slot first) is evicted and the slot's pages go back to the OS. Between forward
        passes only. The bytes freed (0 where the memory cannot be returned: GPU slots)."""
        if self.device.type != "cpu":
            return 0
        for lc in self.layers.values():
            for slot in lc.slots:  # loads in flight land first: their slots become evictable
                if slot.handle is not None:
                    Loader.wait_host(slot.handle)
                    slot.handle = None
            i = self._victim(lc)
            if i is None:
                raise RuntimeError("no slot can be given up: every slot is pinned by a forward pass")
            slot = lc.slots[i]
            self._evict(lc, slot)
            lc.slots[i] = lc.slots[-1]  # the last slot takes the freed index
            lc.slots.pop()
            if lc.slots[i:] and lc.slots[i].expert is not None:
                lc.where[lc.slots[i].expert] = i
            release_pages(slot.buf)
        self.slots_per_layer -= 1
        return self.store.stride * len(self.layers)

    def _ready(self, lc: LayerCache, slot: Slot, layer: int) -> MLP:
        if slot.handle is not None:
            t0 = time.perf_counter()
            Loader.wait(slot.handle)
            lc.stats.stall_seconds += time.perf_counter() - t0
            slot.handle = None
        if slot.module is None:
            slot.module = expert_from_buffer(self.layouts[(layer, slot.expert)], slot.buf, self.hidden, self.width)
        return slot.module

    # --- prefetch ----------------------------------------------------------------------
    def schedule_prefetch(self, layer: int, experts: list[int], now: bool = False) -> None:
        """Queued, and issued after the current layer's own loads (so they go first);
        `now` issues at once (between layers, when no layer is loading its own)."""
        self._prefetch_queue.append((layer, experts))
        self.layers[layer].predicted |= set(experts)
        if now:
            self._issue_prefetches()

    def _issue_prefetches(self) -> None:
        queue, self._prefetch_queue = self._prefetch_queue, []
        for layer, experts in queue:
            for e in experts[: self.slots_per_layer]:
                self.request(layer, e, prefetch=True)

    # --- the ExpertProvider protocol, per layer -----------------------------------------
    def start(self, layer: int, ids: list[int]) -> None:
        """Start the loads of the missing ones of `ids` (a decode step's experts, at most as
        many as slots) now; `experts_for(ids)`, which must follow, finds them in flight.
        Every one of `ids` is pinned until then, so none is evicted for another. Where only
        loads still in flight could make room, the rest are left to `experts_for`."""
        lc = self.layers[layer]
        lc.pinned.update(ids)
        for e in ids:
            if e not in lc.where:
                i = self._victim(lc)
                if i is None:
                    return
                self._load_into(layer, lc, i, e, prefetch=False)
                lc.started.add(e)

    def experts_for(self, layer: int, ids: Iterable[int], hold: bool = False,
                    routing: torch.Tensor | None = None) -> Iterator[tuple[int, MLP]]:
        """Resident experts first, then the others as their loads land; more experts than
        slots (prefill) stream through the slots, loading ahead while one computes. With
        `hold` (at most as many ids as slots) each stays pinned until the iterator is closed.
        `routing` ([T, A], the experts each token picked, in token order): the policy sees
        the last RECENT tokens' picks in turn, as if they had been decoded, and a stream keeps
        resident the experts that ranks highest (see `_keep`)."""
        lc = self.layers[layer]
        ids = list(ids)
        if hold and len(ids) > self.slots_per_layer:
            raise ValueError(f"cannot hold {len(ids)} experts in {self.slots_per_layer} slots")
        self._record_prediction(lc, ids)
        picks = routing[-RECENT:].tolist() if routing is not None else []
        keep = self._keep(lc, ids, picks) if not hold else set()
        lc.pinned.update(keep & lc.where.keys())
        pending = deque(sorted(ids, key=lambda e: (e not in lc.where, e in keep)))
        active: deque[tuple[int, Slot]] = deque()
        try:
            while pending or active:
                while pending and (pending[0] in lc.where or self._victim(lc) is not None):
                    e = pending.popleft()
                    lc.pinned.add(e)
                    active.append((e, self.request(layer, e)))
                self._issue_prefetches()
                if not active:  # every free slot is taken by prefetches still in flight
                    self._land_one_prefetch(lc)
                    continue
                e, slot = self._next_ready(active)
                yield e, self._ready(lc, slot, layer)
                if not hold and e not in keep:
                    lc.pinned.discard(e)
        finally:
            self._release(lc)
            for token in picks:
                for e in token:
                    if e in lc.where:
                        lc.policy.touch(e)

    def _keep(self, lc: LayerCache, ids: list[int], picks: list[list[int]]) -> set[int]:
        """Of a stream's experts (more than the slots), those the layer's policy would rank
        highest after seeing `picks` token by token: they stay pinned once resident, and load
        last, so the stream ends with them in the slots and the next tokens (decode after a
        prompt) find them. A window of slots (`reads`, at least two) is left to the stream.
        Without this the slots end holding whatever streamed last (by expert id)."""
        room = self.slots_per_layer - max(2, len(self.loader.workers))
        if not picks or len(ids) <= self.slots_per_layer or room <= 0:
            return set()
        policy = type(lc.policy)()
        for token in picks:
            for e in token:
                policy.touch(e)
        return set(policy.ranked(ids)[-room:])

    def _drop_stale_prefetches(self, lc: LayerCache) -> None:
        """The layer has run: its prefetches still queued guessed wrong for this step, and
        read now they would only take disk time from the next layers' loads. Cancelled, their
        slots are free again (what they held was evicted when they were issued)."""
        for slot in lc.slots:
            if slot.prefetched and self._cancel(slot):
                lc.stats.bytes_moved -= self.store.stride  # never read
                self._evict(lc, slot)

    @staticmethod
    def _land_one_prefetch(lc: LayerCache) -> None:
        """Wait for one in-flight load of this layer, which makes its slot evictable."""
        for slot in lc.slots:
            if slot.handle is not None and slot.expert not in lc.pinned:
                t0 = time.perf_counter()
                Loader.wait_host(slot.handle)
                lc.stats.stall_seconds += time.perf_counter() - t0
                slot.handle = None
                return
        raise RuntimeError("no slot can be freed: every slot is pinned by the current layer")

    @staticmethod
    def _next_ready(active: deque) -> tuple[int, Slot]:
        for item in active:
            if Loader.done(item[1].handle):
                active.remove(item)
                return item
        return active.popleft()

    @staticmethod
    def _record_prediction(lc: LayerCache, ids: list[int]) -> None:
        if lc.predicted:
            lc.stats.predicted += len(lc.predicted)
            lc.stats.predicted_correct += len(lc.predicted & set(ids))
            lc.stats.actual += len(ids)
            lc.predicted = set()

    def hits(self, layer: int, ids: list[int]) -> list[tuple[int, MLP]] | None:
        """`(e, module)` for sorted `ids` when every one is resident with its load landed (a
        miss `start` loaded this step included), counted and touched as
        `experts_for(sorted(ids), hold=True)` would (then closed); else None, with nothing
        counted. A decode step's common case without the generator's bookkeeping."""
        lc = self.layers[layer]
        slots = self._landed(lc, sorted(ids))
        return None if slots is None else [(slot.expert, slot.module) for slot in self._use(lc, layer, slots)]

    def native_parts(self, layer: int, ids: list[int]) -> Iterator[tuple[list[int], list]] | None:
        """A decode step's experts `ids` as native Int4Mlps (decode_steps.native_mlp) in groups
        for an MlpStep: (positions in `ids`, ascending; their Int4Mlps), first every one that
        has landed, then each other one as its load (issued by `start`) lands, so the first
        compute while the rest load. Counted, touched, pinned and let go as
        `experts_for(sorted(ids), hold=True)` does, from the first group to closing.
        None, with nothing counted, where one of `ids` is neither resident nor loading (`start`
        found no room), has no native form, or the layouts differ (one mlps call takes a group)."""
        lc = self.layers[layer]
        if any(e not in lc.where for e in ids):
            return None
        slots = [lc.slots[lc.where[e]] for e in ids]
        if any(slot.layout is not slots[0].layout for slot in slots):
            return None
        try:
            for slot, e in zip(slots, ids):
                if slot.native is None:  # views into the slot: built before its bytes land
                    if slot.module is None:
                        slot.module = expert_from_buffer(self.layouts[(layer, e)], slot.buf, self.hidden, self.width)
                    slot.native = native_mlp(slot.module, len(ids)) or False
        except BaseException:  # the step ends here: what `start` pinned is let go
            self._release(lc)
            raise
        if any(slot.native is False for slot in slots):
            return None
        return self._as_landed(lc, layer, slots)

    def _as_landed(self, lc: LayerCache, layer: int, slots: list[Slot]) -> Iterator[tuple[list[int], list]]:
        # counted and touched in expert order, as experts_for(sorted(ids)) does; on the first
        # next(): a generator never started holds nothing
        self._take(lc, layer, sorted(slots, key=lambda slot: slot.expert))
        try:
            first = [a for a, slot in enumerate(slots) if Loader.done(slot.handle)]
            rest = deque(a for a, slot in enumerate(slots) if a not in first)
            for a in first:
                self._ready(lc, slots[a], layer)  # a failed load raises here
            if first:
                yield first, [slots[a].native for a in first]
            while rest:
                a = next((a for a in rest if Loader.done(slots[a].handle)), rest[0])
                rest.remove(a)
                self._ready(lc, slots[a], layer)
                yield [a], [slots[a].native]
        finally:
            self._release(lc)

    def _landed(self, lc: LayerCache, ids: list[int]) -> list[Slot] | None:
        slots = []
        for e in ids:
            i = lc.where.get(e)
            if i is None or not Loader.done(lc.slots[i].handle):
                return None
            slots.append(lc.slots[i])
        return slots

    def _use(self, lc: LayerCache, layer: int, slots: list[Slot]) -> list[Slot]:
        """What experts_for(hold=True) does for landed experts, from the hit counts to closing."""
        self._take(lc, layer, slots)
        try:
            for slot in slots:
                self._ready(lc, slot, layer)
        finally:
            self._release(lc)
        return slots

    def _take(self, lc: LayerCache, layer: int, slots: list[Slot]) -> None:
        """A step's experts, resident or loading (a miss `start` issued): pinned before any
        prefetch is issued (as in experts_for), each asked for as `request` does; on failure
        let go."""
        lc.pinned.update(slot.expert for slot in slots)
        try:
            self._record_prediction(lc, [slot.expert for slot in slots])
            for slot in slots:
                self._asked_for(lc, layer, slot)
            self._issue_prefetches()
        except BaseException:
            self._release(lc)
            raise

    def _release(self, lc: LayerCache) -> None:
        """A layer's call has ended: its pins and started loads are let go, its stale
        prefetches dropped."""
        lc.pinned.clear()
        lc.started.clear()
        self._drop_stale_prefetches(lc)

    def all_ready(self, layer: int, ids: Iterable[int]) -> bool:
        """Whether every one of `ids` is resident with its load landed (a hit costs no wait)."""
        return self._landed(self.layers[layer], list(ids)) is not None

    def provider(self, layer: int) -> "LayerExperts":
        return LayerExperts(self, layer)

    def close(self) -> None:
        self.loader.close()


class KVRoom:
    """The memory KV caches may use: `held` bytes planned for them at load. A KV cache about to
    grow past it takes a slot of every layer from the expert cache, then another, down to
    `floor` slots; a slot given up is not taken back. So a short chat keeps the experts the
    memory allows, and a long one still fits in the plan's memory."""

    def __init__(self, cache: ExpertCache, held: int, floor: int):
        self.cache, self.held, self.floor = cache, held, floor
        self.kvs: weakref.WeakSet = weakref.WeakSet()  # the live KV caches

    def make_room(self, kv, nbytes: int) -> None:
        """Before `kv` allocates `nbytes` more (its current tensors still alive)."""
        self.kvs.add(kv)
        need = sum(c.nbytes() for c in self.kvs) + nbytes
        while need > self.held and self.cache.slots_per_layer > self.floor:
            freed = self.cache.give_up_slots()
            if not freed:
                return
            self.held += freed


class LayerExperts:
    """The ExpertProvider a MoE block sees for one layer."""

    def __init__(self, cache: ExpertCache, layer: int):
        self.cache, self.layer = cache, layer

    def experts_for(self, ids: Iterable[int], hold: bool = False,
                    routing: torch.Tensor | None = None) -> Iterator[tuple[int, MLP]]:
        return self.cache.experts_for(self.layer, ids, hold, routing)

    def start(self, ids: list[int]) -> None:
        self.cache.start(self.layer, ids)

    def native_parts(self, ids: list[int]) -> Iterator[tuple[list[int], list]] | None:
        """For a native MLP step (quant.decode_steps): see ExpertCache.native_parts."""
        return self.cache.native_parts(self.layer, ids)

    def apply(self, inputs: ExpertInput, ids: list[int]) -> torch.Tensor:
        """[A, D] for one decode row: when all have landed, in one call, as resident experts
        run; else cached experts first, gate+up rows computed as the others land (see
        quant.experts.apply_together)."""
        held = self.cache.hits(self.layer, ids)
        if held is not None:
            return apply_together(iter_closable(held), inputs, ids, on_arrival=False)
        return apply_together(self.experts_for(sorted(ids), hold=True), inputs, ids, on_arrival=True)


def iter_closable(items: list) -> Iterator:
    """An iterator over `items` with the close() apply_together calls on a provider's."""
    yield from items

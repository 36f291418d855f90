"""Offloaded experts: same output as resident, slot limits, LRU and prefetch accounting."""

import threading
import time

import psutil
import pytest
import torch

from moe_edge.api import load, load_offloaded
from moe_edge.errors import ConfigError
from moe_edge.model.layers import MLP
from moe_edge.offload import cache as cache_mod
from moe_edge.offload.cache import ExpertCache
from moe_edge.offload.plan import parse_size
from moe_edge.offload.store import RamStore, pack_expert
from moe_edge.testing import write_checkpoint, write_gptq_checkpoint

SHAPE = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("off")
    src = write_checkpoint(root / "fp", "deepseek", **SHAPE)
    return {"fp": src, "gptq": write_gptq_checkpoint(src, root / "q", group_size=64, act_order=True),
            "gptq-plain": write_gptq_checkpoint(src, root / "q2", group_size=64),
            "bf16": write_checkpoint(root / "bf16", "deepseek", seed=3, dtype=torch.bfloat16, **SHAPE)}


@pytest.mark.parametrize("kind", ["fp", "gptq", "gptq-plain"])
@pytest.mark.parametrize("slots", [3, 6, 8])  # top-k, 2x top-k, all 8 experts
@pytest.mark.parametrize("depth", [0, 1])
def test_offloaded_equals_resident(ckpts, kind, slots, depth):
    ref = load(ckpts[kind], device="cpu")
    tier = "disk" if slots == 3 else "ram"
    lm = load_offloaded(ckpts[kind], device="cpu", expert_cache=slots, prefetch_depth=depth, slow_tier=tier)
    try:
        counts = []
        for layer, block in lm.model.moe_blocks().items():
            block.register_forward_hook(lambda m, a, o, l=layer: counts.append(len(lm.offload.cache.resident(l))))
        prompt = "Offloading keeps hot experts close."
        assert lm.generate(prompt, temperature=0, max_new_tokens=24).token_ids == \
            ref.generate(prompt, temperature=0, max_new_tokens=24).token_ids
        ids = torch.tensor([lm.encode(prompt)])
        with torch.no_grad():
            assert torch.allclose(lm.model(ids), ref.model(ids), atol=1e-4, rtol=1e-4)
        assert counts and max(counts) <= slots  # checked after every MoE layer call
        # gate and up fused in the resident model and the store alike: without act-order (this
        # act-order fixture gives gate and up different random orders, so it is not fused)
        fused = kind == "gptq-plain"
        assert hasattr(ref.model.model.layers[1].mlp.experts[0], "gate_up") == fused
        assert {lay.projections for lay in lm.offload.cache.layouts.values()} == \
            {("gate_up", "down_proj") if fused else ("gate_proj", "up_proj", "down_proj")}
        stats = lm.offload_stats().total
        assert stats.hits > 0 and stats.misses + stats.prefetch_issued > 0  # experts were paged in
        assert (stats.predicted > 0) == (depth > 0)
    finally:
        lm.offload.close()


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfuda", "lrfu"])
@pytest.mark.parametrize("reads", [1, 4])
def test_offloaded_equals_resident_under_every_policy_and_reads_in_flight(ckpts, policy, reads):
    """Greedy tokens equal resident ones whatever the policy evicts and however many loads
    are in flight (every-step prefetch: the most loads, the most evictions)."""
    ref = load(ckpts["gptq"], device="cpu")
    lm = load_offloaded(ckpts["gptq"], device="cpu", expert_cache=4, policy=policy, reads=reads,
                        prefetch="always", slow_tier="disk")
    try:
        prompt = "Policies choose what leaves, never what is computed."
        assert lm.generate(prompt, temperature=0, max_new_tokens=24).token_ids == \
            ref.generate(prompt, temperature=0, max_new_tokens=24).token_ids
        assert lm.offload_stats().total.misses > 0
    finally:
        lm.offload.close()


@pytest.mark.parametrize("kind", ["gptq", "gptq-plain"])
@pytest.mark.parametrize("offloaded", [False, True])
def test_experts_sharing_one_input_cast_is_bitwise(ckpts, kind, offloaded, monkeypatch):
    """ExpertInput casts a layer's input once for all its int4 experts and keeps their
    outputs in the kernel's dtype (and at decode runs them together, resident or offloaded); prefill
    and decode logits equal those of every expert casting its own input and output."""
    from moe_edge.model.moe import ExpertInput
    from moe_edge.offload.cache import LayerExperts
    from moe_edge.quant.experts import QuantResidentExperts
    lm = load_offloaded(ckpts[kind], device="cpu", expert_cache=3) if offloaded else load(ckpts[kind], device="cpu")
    ids = torch.tensor([lm.encode("One cast per layer, not one per expert.")])

    def logits():
        cache = lm.model.new_cache(1, 64)
        with torch.no_grad():
            return lm.model(ids[:, :-1], cache), lm.model(ids[:, -1:], cache)
    try:
        fast = logits()
        monkeypatch.setattr(ExpertInput, "__call__",  # every expert called on its own
                            lambda self, expert, rows=None: expert(self.x if rows is None else self.x[rows]))

        def one_by_one(self, inputs, ids):  # each expert whole, while the provider holds it
            ys = {e: expert(inputs.x) for e, expert in self.experts_for(sorted(ids))}
            return torch.cat([ys[e] for e in ids])
        for provider in (QuantResidentExperts, LayerExperts):
            monkeypatch.setattr(provider, "apply", one_by_one)
        slow = logits()
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    finally:
        if offloaded:
            lm.offload.close()


def test_long_prompt_prefill_dequantised_offloaded_equals_resident(ckpts, monkeypatch):
    """A prompt long enough for the dequantised prefill GEMM (int4_cpu.MIN_ROWS rows): the
    offloaded model still equals the resident one bit for bit, and the logits are as close
    to exact fp32 arithmetic (kernel="dequant") as the int4 kernel's own."""
    from moe_edge.api import load_model
    from moe_edge.quant import int4_cpu
    monkeypatch.setattr(int4_cpu, "CALL_ROWS", 0)  # these small weights would not take it
    ref = load(ckpts["gptq-plain"], device="cpu")
    lm = load_offloaded(ckpts["gptq-plain"], device="cpu", expert_cache=3, slow_tier="disk")
    ids = torch.randint(3, 250, (1, 2 * int4_cpu.MIN_ROWS))
    try:
        with torch.no_grad():
            fast = ref.model(ids)
            assert torch.equal(lm.model(ids), fast)
            exact = load_model(ckpts["gptq-plain"], device="cpu", kernel="dequant")(ids)
            monkeypatch.setattr(int4_cpu, "MIN_ROWS", 10**9)  # the int4 kernel for every matmul
            kernel = ref.model(ids)
        err = lambda a: ((a - exact).norm() / exact.norm()).item()
        assert err(fast) < 1.25 * err(kernel)
    finally:
        lm.offload.close()


@pytest.mark.parametrize("bf16_weights", [True, False])
def test_bf16_experts_stay_bf16_in_store_slots_and_resident(ckpts, bf16_weights, monkeypatch):
    """A bf16 checkpoint on the CPU: experts keep their bf16 bytes in the store, the slots
    and the resident model alike (half what a miss reads), and the outputs stay equal."""
    import moe_edge.model.layers as layers
    import moe_edge.model.weights as weights
    from moe_edge.info import model_info
    monkeypatch.setattr(layers, "BF16_MIN_LINEAR", 0)  # these test experts are tiny
    assigned, assign, read, get = {}, weights._assign, [], weights.WeightMap.get
    monkeypatch.setattr(weights, "_assign", lambda m, name, t: (assigned.__setitem__(name, t), assign(m, name, t)))
    monkeypatch.setattr(weights.WeightMap, "get", lambda self, name: read.append(get(self, name)) or read[-1])
    ref = load(ckpts["bf16"], device="cpu", bf16_weights=bf16_weights)
    # kept weights are loaded as stored, never widened to fp32 on the way, and never left
    # pointing into the checkpoint's memory map
    kept = {f"{name}.weight" for name in ref.model.kept_bf16}
    assert bool(kept) == bf16_weights and all(assigned[n].dtype == torch.bfloat16 for n in kept)
    assert all(t.dtype == torch.float32 for n, t in assigned.items() if n not in kept)
    assert not {t.data_ptr() for t in read} & {t.data_ptr() for t in assigned.values()}
    lm = load_offloaded(ckpts["bf16"], device="cpu", expert_cache=3, prefetch_depth=1,
                        slow_tier="disk", bf16_weights=bf16_weights)
    try:
        width = 2 if bf16_weights else 4
        D, I = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"]
        assert lm.offload.plan.expert_bytes == 3 * D * I * width  # gate, up, down
        resident_expert = ref.model.model.layers[1].mlp.experts[0]
        assert resident_expert.down_proj.weight.dtype == (torch.bfloat16 if bf16_weights else torch.float32)
        assert ref.model.dtype == lm.model.dtype == torch.float32  # activations
        info = model_info(ckpts["bf16"], "cpu", torch.float32, 3, bf16_weights=bf16_weights)
        assert info.expert_bytes == lm.offload.plan.expert_bytes
        assert info.dense_bytes == lm.offload.plan.resident_bytes
        prompt = "Half the bytes per miss."
        assert lm.generate(prompt, temperature=0, max_new_tokens=16).token_ids == \
            ref.generate(prompt, temperature=0, max_new_tokens=16).token_ids
        ids = torch.tensor([lm.encode(prompt)])
        with torch.no_grad():
            assert torch.equal(lm.model(ids), ref.model(ids))  # the same code on the same bytes
        assert lm.offload_stats().total.misses > 0
    finally:
        lm.offload.close()


class CountingStore(RamStore):
    """A RAM store that counts loads and can hold them until released."""

    def __init__(self, *a, gate: threading.Event | None = None, **k):
        super().__init__(*a, **k)
        self.loads, self.gate = [], gate

    def read_into(self, index, dst, non_blocking=False):
        if self.gate is not None:
            self.gate.wait(5)
        self.loads.append(index)
        super().read_into(index, dst)


def tiny_cache(slots, experts=6, gate=None, threaded=False, reads=4):
    torch.manual_seed(0)
    layouts, bufs = {}, []
    for e in range(experts):
        layout, buf = pack_expert(MLP(8, 4))
        layouts[(1, e)] = layout
        bufs.append(buf)
    store = CountingStore(bufs[0].numel(), experts, gate=gate)
    for e, buf in enumerate(bufs):
        store.write(e, buf)
    return ExpertCache(store, layouts, lambda l, e: e, slots, torch.device("cpu"), 8, 4, policy="lru",
                       threaded=threaded, reads=reads), store


def run(cache, ids):
    return [e for e, _ in cache.experts_for(1, ids)]


def test_lru_order_and_counts_by_hand():
    cache, store = tiny_cache(slots=3)
    run(cache, [0, 1])      # miss 0, miss 1
    run(cache, [1, 2])      # hit 1, miss 2
    run(cache, [3])         # miss 3, evicts 0 (least recently used)
    assert cache.resident(1) == [1, 2, 3]
    run(cache, [1, 0])      # hit 1; miss 0 evicts 2 (1 was just touched)
    assert cache.resident(1) == [0, 1, 3]
    assert cache.layers[1].policy.order() == [3, 1, 0]
    s = cache.stats().layers[1]
    assert (s.hits, s.misses) == (2, 5) and store.loads == [0, 1, 2, 3, 0]
    assert s.bytes_moved == 5 * store.stride


def test_resident_experts_computed_first():
    cache, _ = tiny_cache(slots=4)
    run(cache, [4])
    assert run(cache, [2, 4, 5]) == [4, 2, 5]


def test_prefetch_accounting_by_hand():
    cache, store = tiny_cache(slots=3)
    run(cache, [0, 1, 2])
    cache.schedule_prefetch(1, [3])
    cache._issue_prefetches()   # prefetch 3 evicts 0
    cache.schedule_prefetch(1, [4])
    cache._issue_prefetches()   # prefetch 4 evicts 1: not 3, also predicted (admitted first in line)
    assert run(cache, [3, 2]) == [3, 2]   # 3 used (hit), 2 hit
    cache.schedule_prefetch(1, [5])
    cache._issue_prefetches()   # evicts LRU among ready: 4 (prefetched, never used) -> wasted
    s = cache.stats().layers[1]
    assert (s.prefetch_issued, s.prefetch_used, s.prefetch_wasted) == (3, 1, 1)
    assert (s.hits, s.misses) == (2, 3)
    # every prediction made before the call ({3} and {4}) is scored against what it used ({3, 2})
    assert (s.predicted, s.predicted_correct, s.actual) == (2, 1, 2)


def test_a_wrong_guess_is_evicted_before_the_experts_that_were_used():
    """A prefetch is a guess, not a use: never used, its expert is the next victim, ahead of
    experts used before it was loaded (LRU here)."""
    cache, _ = tiny_cache(slots=3)
    run(cache, [0, 1, 2])
    cache.schedule_prefetch(1, [3], now=True)  # evicts 0
    run(cache, [1])  # the guess was wrong
    run(cache, [4])
    assert cache.resident(1) == [1, 2, 4]


def test_started_loads_are_counted_once_and_keep_the_steps_experts():
    """`start` (a decode step's experts, before its shared experts) loads the missing ones
    at once without evicting another of the step's experts; the `experts_for` that follows
    finds them in flight: one miss each, one hit for each cached one, one read each."""
    gate = threading.Event()
    cache, store = tiny_cache(slots=3, gate=gate, threaded=True)
    gate.set()
    run(cache, [0, 1, 2])
    gate.clear()
    cache.start(1, [2, 3, 4])  # 2 cached; 3 and 4 must evict 0 and 1, not 2
    assert sorted(cache.resident(1)) == [2, 3, 4]
    assert cache.all_ready(1, [2]) and not cache.all_ready(1, [3])  # 3 and 4 are still reading
    gate.set()
    assert sorted(run(cache, [2, 3, 4])) == [2, 3, 4]
    cache.close()
    s = cache.stats().layers[1]
    assert (s.hits, s.misses) == (1, 5) and store.loads == [0, 1, 2, 3, 4]
    assert not cache.layers[1].started and not cache.layers[1].pinned


def test_in_flight_load_is_never_duplicated():
    gate = threading.Event()
    cache, store = tiny_cache(slots=3, gate=gate, threaded=True)
    cache.schedule_prefetch(1, [2])
    cache._issue_prefetches()             # load of 2 is now blocked in the worker
    slot_a = cache.request(1, 2)          # demand for the same expert while in flight
    slot_b = cache.request(1, 2, prefetch=True)
    assert slot_a is slot_b
    gate.set()
    assert run(cache, [2]) == [2]
    cache.close()
    assert store.loads == [2]


def test_demand_loads_go_before_queued_prefetches_and_take_their_slots():
    """One reader, blocked on a prefetch: a later demand load runs before the prefetches
    queued behind it; a queued prefetch gives its slot to a demand load instead of being
    waited for, and a demanded expert whose prefetch is still queued becomes a demand load."""
    gate = threading.Event()
    cache, store = tiny_cache(slots=3, gate=gate, threaded=True, reads=1)
    first = cache.request(1, 0, prefetch=True).handle
    while not first.running():  # 0 is read (blocked on the gate) ...
        time.sleep(0.001)
    for e in (1, 2):
        cache.request(1, e, prefetch=True)  # ... while 1 and 2 queue behind it
    got = cache.experts_for(1, [2, 3])  # 2: promoted; 3: takes 1's slot (cancelled, unread)
    gate.set()
    assert sorted(e for e, _ in got) == [2, 3]
    cache.close()
    assert store.loads == [0, 2, 3]
    s = cache.stats().layers[1]
    assert s.bytes_moved == 3 * store.stride and cache.resident(1) == [0, 2, 3]


def test_a_layers_queued_prefetches_are_dropped_once_it_has_run():
    """Prefetches of a layer still queued when the layer has run guessed wrong: they are
    cancelled (never read, their slots free again) instead of taking disk time from the
    loads of the layers after it. One being read is left to land."""
    gate = threading.Event()
    cache, store = tiny_cache(slots=3, gate=gate, threaded=True, reads=1)
    gate.set()
    run(cache, [0])
    gate.clear()
    reading = cache.request(1, 5, prefetch=True).handle
    while not reading.running():  # the one reader is busy with 5 ...
        time.sleep(0.001)
    cache.schedule_prefetch(1, [1], now=True)  # ... while 1 queues behind it
    assert run(cache, [0]) == [0]  # a hit: the layer runs without waiting
    assert cache.resident(1) == [0, 5]
    s = cache.stats().layers[1]
    assert s.bytes_moved == 2 * store.stride and (s.prefetch_issued, s.prefetch_wasted) == (2, 1)
    gate.set()
    assert sorted(run(cache, [1, 2])) == [1, 2]  # the freed slot takes a demand load
    cache.close()
    assert store.loads == [0, 5, 1, 2]


def test_several_reads_in_flight_give_the_same_experts():
    """Four readers, loads landing in any order: every expert computes what the store holds."""
    cache, store = tiny_cache(slots=3, experts=6, threaded=True, reads=4)
    ref, _ = tiny_cache(slots=6, experts=6)
    x = torch.randn(2, 8)
    want = {e: m(x) for e, m in ref.experts_for(1, range(6))}
    for ids in ([0, 1, 2], [3, 4, 5], [5, 0, 2], [1, 3, 4]):
        for e, m in cache.experts_for(1, ids):
            assert torch.equal(m(x), want[e])
    cache.close()


def test_pinned_experts_are_never_evicted():
    cache, _ = tiny_cache(slots=2)
    gen = cache.experts_for(1, [0, 1])
    next(gen)                              # 0 and 1 are pinned while the layer computes
    assert cache.request(1, 4, prefetch=True) is None  # a prefetch finds no room
    with pytest.raises(RuntimeError, match="pinned"):
        cache.request(1, 5)
    list(gen)
    assert cache.request(1, 4, prefetch=True) is not None


def test_held_experts_stay_pinned_until_the_iterator_closes():
    """hold=True (decode, experts finished together): every yielded expert stays pinned, even
    after the last one is handed over, until close(); more ids than slots are refused."""
    cache, _ = tiny_cache(slots=3)
    gen = cache.experts_for(1, [0, 1, 2], hold=True)
    got = [next(gen) for _ in range(3)]
    assert [e for e, _ in got] == [0, 1, 2] and cache.layers[1].pinned == {0, 1, 2}
    assert cache.request(1, 4, prefetch=True) is None  # no slot may be reused yet
    gen.close()
    assert not cache.layers[1].pinned and cache.request(1, 4, prefetch=True) is not None
    plain = cache.experts_for(1, [0, 1])
    next(plain)
    assert cache.layers[1].pinned == {0, 1}  # the first handed over: pinned until the next is asked for
    second, _ = next(plain)
    assert cache.layers[1].pinned == {second}
    plain.close()
    with pytest.raises(ValueError, match="cannot hold 4 experts in 3 slots"):
        next(cache.experts_for(1, [0, 1, 2, 3], hold=True))


def test_landed_hits_are_pinned_against_a_queued_prefetch():
    """`hits` hands over what experts_for(hold=True) would: a prefetch it issues may not
    evict one of the step's experts, with or without `start` having pinned them."""
    cache, _ = tiny_cache(slots=2)
    run(cache, [0, 1])
    cache.schedule_prefetch(1, [5])  # queued: issued by the next layer call, which finds no room
    assert [e for e, _ in cache.hits(1, [1, 0])] == [0, 1]
    assert cache.resident(1) == [0, 1] and not cache.layers[1].pinned
    s = cache.stats().layers[1]
    assert (s.hits, s.misses) == (2, 2)
    cache.close()


def native_step(cache, ids):
    """The experts `native_parts` hands a native step, in the order it hands them."""
    return [ids[a] for positions, _ in cache.native_parts(1, ids) for a in positions]


def test_native_parts_count_and_let_go_as_experts_for_does(monkeypatch):
    """A step through `native_parts` (after `start`) counts, touches and reads what the same
    step through `experts_for(hold=True)` does, and leaves nothing pinned or started."""
    monkeypatch.setattr(cache_mod, "native_mlp", lambda mlp, k: object())  # any expert runs natively
    counts = []
    for step in (lambda c, ids: run(c, sorted(ids)), native_step):
        cache, store = tiny_cache(slots=3, threaded=True, reads=2)
        for ids in ([0, 1], [1, 2], [3, 0], [2, 3, 1], [4]):
            cache.start(1, ids)
            assert sorted(step(cache, ids)) == sorted(ids)
            assert not cache.layers[1].pinned and not cache.layers[1].started
        cache.close()
        s = cache.stats().layers[1]
        counts.append((s.hits, s.misses, sorted(store.loads), cache.resident(1), cache.layers[1].policy.order()))
    assert counts[0] == counts[1]


def test_a_needed_experts_queued_prefetch_is_read_before_other_guesses(monkeypatch):
    """One reader, busy: a step's expert whose prefetch is still queued becomes a demand load
    and is read before the guesses queued ahead of it, as `request` does."""
    monkeypatch.setattr(cache_mod, "native_mlp", lambda mlp, k: object())
    gate = threading.Event()
    cache, store = tiny_cache(slots=4, gate=gate, threaded=True, reads=1)
    cache.schedule_prefetch(1, [1, 2, 3], now=True)  # 1 is read (held at the gate), 2 and 3 queue
    while not cache.layers[1].slots[cache.layers[1].where[1]].handle.running():
        time.sleep(0.001)
    cache.start(1, [3])
    threading.Timer(0.05, gate.set).start()  # once the step has asked for 3
    assert native_step(cache, [3]) == [3]
    cache.close()
    assert store.loads[:2] == [1, 3]


def test_a_failed_native_form_lets_the_step_go(monkeypatch):
    """Building the native experts fails: the step ends, and what `start` pinned is let go."""
    def broken(mlp, k):
        raise RuntimeError("no native form")
    monkeypatch.setattr(cache_mod, "native_mlp", broken)
    cache, _ = tiny_cache(slots=3)
    cache.start(1, [0, 1])
    with pytest.raises(RuntimeError, match="no native form"):
        cache.native_parts(1, [0, 1])
    assert not cache.layers[1].pinned and not cache.layers[1].started


def test_a_stream_leaves_resident_what_its_last_tokens_used():
    """Prefill streams more experts than slots; with the tokens' routing the slots end holding
    what the policy ranks highest after the tokens, so the next token hits; without it the
    slots hold whatever streamed last."""
    picks = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [0, 1], [0, 2], [1, 2]])  # [T, A]
    ids = sorted(set(picks.flatten().tolist()))
    for routing, resident in ((picks, [0, 1, 2, 6, 7]), (None, [3, 4, 5, 6, 7])):
        cache, store = tiny_cache(slots=5, experts=8, threaded=True, reads=2)
        assert run_with(cache, ids, routing) == ids  # every expert computed once
        assert cache.resident(1) == resident and len(store.loads) == 8
        if routing is not None:  # the policy saw the tokens in order: 1 and 2 last, 6 and 7 never
            assert cache.layers[1].policy.order()[-3:] == [0, 1, 2]
            cache.reset_stats()
            run(cache, [1, 2])
            assert cache.stats().layers[1].hits == 2
        cache.close()


def run_with(cache, ids, routing):
    return sorted(e for e, _ in cache.experts_for(1, ids, routing=routing))


def test_more_experts_than_slots_stream_through(ckpts):
    """Prefill touches every expert: with top-k slots they stream through the slots."""
    cache, store = tiny_cache(slots=2)
    assert sorted(run(cache, [0, 1, 2, 3, 4, 5])) == [0, 1, 2, 3, 4, 5]
    assert len(cache.resident(1)) == 2 and len(store.loads) == 6


def test_budget_too_small_names_the_minimum(ckpts):
    with pytest.raises(ConfigError, match=r"too small: 2 slots per layer, but top-k is 3; the minimum is"):
        load_offloaded(ckpts["fp"], device="cpu", expert_cache=2)
    with pytest.raises(ConfigError, match="too small"):
        load_offloaded(ckpts["fp"], device="cpu", expert_cache="10KB")


def test_plan_and_sizes(ckpts):
    assert parse_size("6GB") == 6 * 10**9 and parse_size("512MiB") == 512 * 2**20
    lm = load_offloaded(ckpts["gptq"], device="cpu", expert_cache="50%", slow_tier="ram")
    plan = lm.offload.plan
    assert plan.slots_per_layer == 4 and plan.moe_layers == 2 and plan.cache_bytes == 8 * plan.expert_bytes
    assert "4/8 experts" in plan.describe()
    auto = load_offloaded(ckpts["gptq"], device="cpu", expert_cache="auto", slow_tier="ram")
    assert auto.offload.plan.slots_per_layer == 8 and auto.offload.plan.available_bytes > 0
    lm.offload.close(), auto.offload.close()


@pytest.mark.slow
def test_soak_2000_decode_steps_smallest_cache(ckpts):
    lm = load_offloaded(ckpts["gptq"], device="cpu", expert_cache=3, prefetch_depth=1, slow_tier="disk")
    try:
        lm.generate("warm up", temperature=1.0, seed=0, max_new_tokens=100, eos_token_ids=())
        rss0 = psutil.Process().memory_info().rss
        result = lm.generate("soak", temperature=1.0, seed=1, max_new_tokens=2000, eos_token_ids=())
        growth = psutil.Process().memory_info().rss - rss0
        assert result.generated_tokens == 2000
        stats = lm.offload_stats().total
        assert stats.misses > 0 and stats.prefetch_issued > 0
        print(f"soak: {result.generated_tokens} steps, RSS growth {growth / 2**20:.1f} MiB")
        assert growth < 64 * 2**20  # the KV cache for 2,100 positions is preallocated up front
    finally:
        lm.offload.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offloaded_equals_resident(ckpts):
    ref = load(ckpts["gptq"], device="cuda")
    lm = load_offloaded(ckpts["gptq"], device="cuda", expert_cache=3, prefetch_depth=1)
    assert lm.offload.cache.store.data.is_pinned()
    prompt = "Offloading on a GPU"
    assert lm.generate(prompt, temperature=0, max_new_tokens=16).token_ids == \
        ref.generate(prompt, temperature=0, max_new_tokens=16).token_ids


def test_disk_store_is_reused_by_the_next_load(ckpts, tmp_path, monkeypatch):
    first = load_offloaded(ckpts["gptq"], device="cpu", expert_cache=4, slow_tier="disk", offload_dir=tmp_path)
    tokens = first.generate("reuse", temperature=0, max_new_tokens=12).token_ids
    first.offload.close()
    assert len(list(tmp_path.glob("*/experts.bin"))) == 1
    import moe_edge.offload.build as build
    monkeypatch.setattr(build, "expert_module", lambda *a, **k: pytest.fail("experts converted again"))
    again = load_offloaded(ckpts["gptq"], device="cpu", expert_cache=4, slow_tier="disk", offload_dir=tmp_path)
    assert again.generate("reuse", temperature=0, max_new_tokens=12).token_ids == tokens
    again.offload.close()
    monkeypatch.undo()
    other = load_offloaded(ckpts["gptq"], device="cpu", expert_cache=4, slow_tier="disk",
                           offload_dir=tmp_path, kernel="dequant")  # other settings: a new store
    other.offload.close()
    assert len(list(tmp_path.glob("*/experts.bin"))) == 2


def test_prediction_does_not_cascade(ckpts):
    """One layer's hook predicts only the next `depth` MoE layers (a prediction must not
    trigger the hooks of the layers it looks at)."""
    lm = load_offloaded(ckpts["fp"], device="cpu", expert_cache=8, prefetch_depth=1, slow_tier="ram",
                        prefetch="always")  # the hooks, whatever a governor would pick
    scheduled = []
    original = lm.offload.cache.schedule_prefetch
    lm.offload.cache.schedule_prefetch = lambda layer, experts, now=False: (
        scheduled.append((layer, now)), original(layer, experts, now))
    with torch.no_grad():
        lm.model(torch.tensor([[5]]))
    # early guesses after layer 0's (dense) and layer 1's attention; refined ones at the
    # inputs of layers 1 and 2
    assert scheduled == [(1, False), (1, True), (2, False), (2, True)]
    lm.offload.close()


def _drive(monkeypatch, gov, steps: int, ms, pause_at=()) -> list[bool]:
    """Run `gov` for `steps` decode steps, step i taking ms(i, on) milliseconds, with a long
    prefill before each step in `pause_at`; -> what each step did."""
    from moe_edge.offload import prefetch
    clock = [0.0]
    monkeypatch.setattr(prefetch.time, "perf_counter", lambda: clock[0])
    seen = []
    for i in range(steps):
        if i in pause_at:
            gov.pause()
            clock[0] += 1.0  # a long prefill: must not count against either side
        gov.step()
        seen.append(gov.on)
        clock[0] += ms(i, gov.on) / 1e3
    return seen


@pytest.mark.parametrize("on_ms, off_ms, chosen", [(2.0, 1.0, False), (1.0, 3.0, True), (0.97, 1.0, False)])
def test_prefetch_governor_keeps_the_side_that_measures_faster(monkeypatch, on_ms, off_ms, chosen):
    """Decode steps run pairs of epochs without and with prefetch, each pair starting with
    the side the one before ended with, then the faster side runs (and is measured again
    later); prefetch must win by more than `favour_off` (5%): 3% faster is not enough."""
    from moe_edge.offload import prefetch
    gov = prefetch.PrefetchGovernor(start_after=0, epoch=4, explore=2, exploit=10, decisive=None)
    seen = _drive(monkeypatch, gov, 16 + 10 + 8, lambda i, on: on_ms if on else off_ms)
    assert seen[:16] == [False] * 4 + [True] * 4 + [True] * 4 + [False] * 4
    assert gov.chosen is chosen and seen[16:26] == [chosen] * 10
    assert seen[26:34] == [False] * 4 + [True] * 4
    assert gov.summary()["ratios"] == pytest.approx([on_ms / off_ms] * 2, rel=1e-3)  # the re-measured pair ends with the next step


def test_a_prefill_inside_a_pair_drops_the_pair(monkeypatch):
    """Only the two halves of one pair, measured in one generation, are compared: a short
    reply whose steps hit in cache (fast, prefetch on) must not be weighed against a long
    one whose steps miss (slow, prefetch off). With the pair dropped at the prefill and
    measured again inside the long reply, the side that is faster there wins."""
    from moe_edge.offload import prefetch
    gov = prefetch.PrefetchGovernor(start_after=0, epoch=4, explore=1, exploit=10, decisive=None)
    # steps 0-5: a short warm reply (1 ms whatever the side); from step 6 on, a long reply in
    # which prefetch costs (3 ms against 2 ms)
    seen = _drive(monkeypatch, gov, 6 + 8 + 10, lambda i, on: 1.0 if i < 6 else 3.0 if on else 2.0,
                  pause_at=(6,))
    assert seen[:6] == [False] * 4 + [True] * 2  # the pair cut short by the prefill
    assert seen[6:14] == [True] * 4 + [False] * 4  # measured again, the other side first
    assert gov.chosen is False and seen[14:] == [False] * 10
    assert gov.summary()["ratios"] == [1.5]


def test_an_epochs_first_step_is_not_measured(monkeypatch):
    """The other side's loads still land in an epoch's first step: it carries their cost,
    so it is left out of the epoch's median."""
    from moe_edge.offload import prefetch
    gov = prefetch.PrefetchGovernor(start_after=0, epoch=3, explore=1, exploit=10, decisive=None)
    # the first step of every epoch is slow (the side before it left work); the rest equal
    _drive(monkeypatch, gov, 6 + 1, lambda i, on: 9.0 if i % 3 == 0 else 1.0)
    assert gov.summary()["ratios"] == [1.0]


@pytest.mark.parametrize("on_ms, off_ms, pairs", [(1.3, 1.0, 1), (0.7, 1.0, 3), (1.05, 1.0, 3)])
def test_prefetch_governor_stops_exploring_once_decisive(monkeypatch, on_ms, off_ms, pairs):
    """Prefetch 30% slower after one pair of epochs is not measured again; 5% is within the
    margin, and 30% faster is not trusted from one pair (a wrong "on" costs more than a
    wrong "off"), so every planned pair is measured before choosing."""
    from moe_edge.offload import prefetch
    gov = prefetch.PrefetchGovernor(start_after=0, epoch=4, explore=3, exploit=10, decisive=0.1)
    seen = _drive(monkeypatch, gov, 8 * pairs + 10, lambda i, on: on_ms if on else off_ms)
    order = ([False] * 4 + [True] * 8 + [False] * 4) * 2  # pairs alternate which side goes first
    assert seen[:8 * pairs] == order[:8 * pairs]
    assert gov.chosen is (on_ms < off_ms) and seen[8 * pairs:] == [gov.chosen] * 10


def test_a_decisive_governor_still_remeasures_after_exploiting(monkeypatch):
    """An early choice is not final: after `exploit` steps both sides are measured again, so
    when prefetch becomes the faster side (a warm disk, a routing change) it is chosen."""
    from moe_edge.offload import prefetch
    gov = prefetch.PrefetchGovernor(start_after=0, epoch=4, explore=3, exploit=10, keep=1, decisive=0.1)
    # prefetch loses at first, wins from the re-measure on
    seen = _drive(monkeypatch, gov, 8 + 10 + 8 + 10,
                  lambda i, on: (1.3 if i < 18 else 0.5) if on else 1.0)
    assert seen[8:18] == [False] * 10  # decided after one pair
    assert seen[18:26] == [True] * 4 + [False] * 4  # re-measured
    assert seen[26:] == [True] * 10 and gov.chosen is True


def test_each_confirmed_choice_runs_twice_as_long_before_the_next_measure(monkeypatch):
    """Measuring the losing side costs what it loses: while re-measures keep confirming the
    choice, the runs between them double (10, 20, 40 steps here), up to `exploit_max`."""
    from moe_edge.offload import prefetch
    gov = prefetch.PrefetchGovernor(start_after=0, epoch=4, explore=1, exploit=10, exploit_max=40,
                                    decisive=None)
    F, T = [False], [True]
    pair, pair_on_first = F * 4 + T * 4, T * 4 + F * 4  # pairs alternate which side goes first
    want = pair + F * 10 + pair_on_first + F * 20 + pair + F * 40 + pair_on_first + F * 40
    assert _drive(monkeypatch, gov, len(want), lambda i, on: 2.0 if on else 1.0) == want
    assert gov.chosen is False


def test_prefetch_starts_off_and_is_measured_only_after_start_after_steps(monkeypatch):
    """A short reply runs without prefetch and without measuring it, even where prefetch
    would win; once `start_after` steps (over all generations) have run, pairs are measured."""
    from moe_edge.offload import prefetch
    gov = prefetch.PrefetchGovernor(start_after=10, epoch=4, explore=1, exploit=10, decisive=None)
    seen = _drive(monkeypatch, gov, 6, lambda i, on: 0.5 if on else 1.0)  # a short reply
    assert gov.summary()["ratios"] == []
    seen += _drive(monkeypatch, gov, 4 + 8 + 2, lambda i, on: 0.5 if on else 1.0, pause_at=(0,))  # the next
    assert seen[:10] == [False] * 10
    assert seen[10:18] == [False] * 4 + [True] * 4 and seen[18:] == [True] * 2
    assert gov.chosen is True


def test_a_governor_must_have_something_to_measure():
    from moe_edge.offload import prefetch
    with pytest.raises(ValueError, match="epoch"):
        prefetch.PrefetchGovernor(epoch=1)
    with pytest.raises(ValueError, match="pair"):
        prefetch.PrefetchGovernor(explore=0)


def test_governed_prefetch_keeps_offloaded_tokens_equal_to_resident(ckpts):
    """Whatever the governor picks step by step, greedy tokens equal the resident model's."""
    ref = load(ckpts["gptq"], device="cpu")
    lm = load_offloaded(ckpts["gptq"], device="cpu", expert_cache=3, prefetch="auto", reads=4)
    try:
        gov = lm.offload.prefetcher.governor
        gov.epoch, gov.left = 2, 0  # measure from the first step, switching sides often
        want = ref.generate("Prefetch or not", temperature=0, max_new_tokens=24).token_ids
        got = lm.generate("Prefetch or not", temperature=0, max_new_tokens=24).token_ids
        assert got == want and gov.steps_on > 0 and gov.steps_off > 0
    finally:
        lm.offload.close()


def test_giving_up_a_slot_evicts_the_policys_victim_and_keeps_the_rest():
    cache, store = tiny_cache(slots=4)
    run(cache, [0, 1, 2])   # 0, 1, 2 in slots, one slot free
    assert cache.give_up_slots() == store.stride and cache.slots_per_layer == 3
    assert cache.resident(1) == [0, 1, 2] and len(cache.layers[1].slots) == 3  # the free slot went
    run(cache, [1, 2])      # 0 is now least recently used
    cache.give_up_slots()
    lc = cache.layers[1]
    assert cache.resident(1) == [1, 2] and len(lc.slots) == 2
    assert all(lc.slots[i].expert == e for e, i in lc.where.items())  # the index map follows the moves
    loads = len(store.loads)
    assert run(cache, [1, 2]) == [1, 2] and len(store.loads) == loads  # still hits
    assert sorted(run(cache, [3, 4])) == [3, 4]  # and misses load into the slots left


def test_a_slot_given_up_returns_its_pages():
    from moe_edge.memory import release_pages
    from moe_edge.offload.store import slot_buffers
    proc = psutil.Process()
    bufs = slot_buffers(16 * 2**20, 2, torch.device("cpu"))
    for b in bufs:
        b.fill_(7)
    before = proc.memory_info().rss
    assert release_pages(bufs[0])
    assert before - proc.memory_info().rss > 12 * 2**20
    assert int(bufs[1][-1]) == 7 and not release_pages(bufs[1][1:])  # its neighbour untouched; unaligned refused


def test_kv_cache_growth_takes_slots_and_decode_stays_resident(tmp_path, monkeypatch):
    """expert_cache="auto" on a CPU plans the KV cache of the first 512 tokens and lends the
    rest to the experts: a longer context takes slots back as its KV cache grows, never below
    top-k, the KV caches never exceed what the plan holds for them, and tokens stay exact."""
    import moe_edge.offload.plan as plan_mod
    src = write_checkpoint(tmp_path / "m", "deepseek", **{**SHAPE, "max_position_embeddings": 1024})
    ref = load(src, device="cpu")
    probe = load_offloaded(src, device="cpu", expert_cache=3, slow_tier="ram")
    p = probe.offload.plan
    row = p.expert_bytes * p.moe_layers
    probe.offload.close()
    # free memory for top-k slots at a full context: all 8 at first, as the KV cache is small
    seen = p.resident_bytes + plan_mod.MARGIN_MIN + p.kv_cache_bytes + 3 * row + row // 2
    monkeypatch.setattr(plan_mod, "available_memory", lambda device: seen)
    lm = load_offloaded(src, device="cpu", expert_cache="auto", slow_tier="ram")
    try:
        plan, cache = lm.offload.plan, lm.offload.cache
        assert plan.slots_per_layer == 8 and plan.slots_at_full_context == 3
        room = lm.model.kv_room
        prompt = torch.randint(2, 300, (800,), generator=torch.Generator().manual_seed(0)).tolist()
        from moe_edge.generation import SamplingParams, generate_ids
        params = SamplingParams(temperature=0, max_new_tokens=12, eos_token_ids=())
        got = list(generate_ids(lm.model, prompt, params))
        assert got == list(generate_ids(ref.model, prompt, params))
        kv = sum(c.nbytes() for c in room.kvs)
        assert 3 <= cache.slots_per_layer < 8 and kv <= room.held
        assert room.held == plan.kv_start_bytes + (8 - cache.slots_per_layer) * row
        assert all(len(lc.slots) == cache.slots_per_layer for lc in cache.layers.values())
        from moe_edge import cli_ui
        from moe_edge.serve import offload_metrics
        assert offload_metrics(lm)["slots_per_layer"] == cache.slots_per_layer  # what is, not what was planned
        assert f"now {cache.slots_per_layer} slots per layer" in cli_ui.cache_text(lm)
        long = prompt + prompt[:200]  # the cache grows to the model's 1024 positions
        got = list(generate_ids(lm.model, long, params))
        assert got == list(generate_ids(ref.model, long, params))
        assert cache.slots_per_layer >= 3 and sum(c.nbytes() for c in room.kvs) <= room.held
    finally:
        lm.offload.close()

"""Cache policies: eviction order by hand, trace replay against a hand count and against the
runtime's ExpertCache, Belady as the floor (and equal to an exhaustive search)."""

import importlib.util
import random
from itertools import combinations
from pathlib import Path

import pytest
import torch

from moe_edge.model.layers import MLP
from moe_edge.offload.cache import ExpertCache
from moe_edge.offload.policy import LFU, LFUDA, LRFU, LRU, POLICIES
from moe_edge.offload.store import RamStore, pack_expert

_spec = importlib.util.spec_from_file_location("bench_trace", Path(__file__).parents[1] / "bench" / "trace.py")
bench_trace = importlib.util.module_from_spec(_spec)  # by path: `trace` is also a stdlib module
_spec.loader.exec_module(bench_trace)
belady, compare, replay, shared_steps = (bench_trace.belady, bench_trace.compare, bench_trace.replay,
                                         bench_trace.shared_steps)


def touched(policy, *experts):
    for e in experts:
        policy.touch(e)
    return policy


def test_lru_evicts_least_recent():
    p = touched(LRU(), 1, 2, 3, 1)
    assert p.victim({1, 2, 3}) == 2 and p.victim({1, 3}) == 3 and p.victim(set()) is None


def test_lfu_evicts_least_used_and_remembers_after_eviction():
    p = touched(LFU(), 1, 1, 2, 3, 3, 2, 4)
    assert p.victim({1, 2, 3, 4}) == 4
    assert p.victim({1, 2, 3}) == 1  # a tie of two uses: the least recently used of them
    p.forget(1)
    touched(p, 1)
    assert p.uses[1] == 3 and p.victim({1, 2, 3}) == 3  # 2 was used after 3


def test_lfuda_ages_out_a_once_hot_expert():
    p = touched(LFUDA(), 1, 1, 1, 2)  # keys: 1 -> 3, 2 -> 1
    assert p.victim({1, 2}) == 2
    p.forget(2)                       # L = 1
    touched(p, 3, 4)                  # keys 2, 2
    assert p.victim({1, 3, 4}) == 3   # tie on 2: least recent
    p.forget(3)                       # L = 2
    touched(p, 5)                     # key 3
    assert p.victim({1, 4, 5}) == 4
    p.forget(4)
    touched(p, 6)                     # key 3: every key is now 3
    assert p.victim({1, 5, 6}) == 1   # plain LFU would keep 1 for ever
    assert touched(LFU(), 1, 1, 1, 5, 6).victim({1, 5, 6}) == 5


def test_lrfu_half_life_moves_it_between_lru_and_lfu():
    seq = (1, 1, 1, 2, 3)
    assert touched(LRFU(half_life=1), *seq).victim({1, 2, 3}) == 1  # 1.75 / 4 < 2's 0.5
    assert touched(LRFU(half_life=1000), *seq).victim({1, 2, 3}) == 2
    p = touched(LRFU(half_life=1), *seq)
    p.forget(1)
    assert p.victim({2, 3}) == 2


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_an_admitted_guess_goes_before_anything_used(policy):
    """A prefetch admits an expert without a use: never used, it is the next victim, ahead
    of experts used once long ago; used, it ranks as any used expert does."""
    p = touched(POLICIES[policy](), 1, 2, 3, 2, 3)
    p.admit(4)
    assert p.victim({1, 2, 3, 4}) == 4
    touched(p, 4, 4, 4)
    assert p.victim({1, 2, 3, 4}) == 1


def test_lrfu_ranks_an_admitted_expert_by_its_past_uses():
    """Scores outlive an eviction: a guess for an expert that was hot ranks by that past,
    above a colder resident's."""
    p = touched(LRFU(), 7, 7, 7, 1)
    p.forget(7)
    touched(p, 2, 3)
    p.admit(7)
    assert p.victim({1, 2, 3, 7}) == 1


def test_replay_counts_by_hand():
    steps = [[0, 1], [1, 2], [0, 1], [3, 0]]
    # LRU, 3 slots: miss 0 1 | hit 1, miss 2 | hit 0 1 | hit 0, miss 3 evicts 2 (1 and 0 are newer)
    assert replay(steps, LRU(), 3) == 4
    # LFU: after step 2 the uses are 0:2 1:3 2:1, so 3 evicts 2 as well; then 2 misses again
    assert replay(steps + [[2]], LFU(), 3) == 5
    assert replay([[0], [1], [2], [0], [1]], LRU(), 2) == 5
    assert belady([[0], [1], [2], [0], [1]], 2) == 4  # 2 evicts 1 (used later than 0)
    with pytest.raises(ValueError, match="more than 1 slots"):
        replay([[0, 1]], LRU(), 1)


def test_compare_sums_layers_and_shares_the_slots():
    trace = {1: [(0,), (1,), (2,), (0,)], 2: [(5,), (5,), (5,), (5,)]}
    assert shared_steps(trace)[:3] == [[(1, 0)], [(2, 5)], [(1, 1)]]
    row = compare(trace, [2])[2]
    # 2 slots each: layer 1's LRU loads 0 1 2 0, Belady keeps 0 for its return; layer 2 loads 5
    assert (row["lru"], row["belady"]) == (4 + 1, 3 + 1)
    # 4 shared slots: layer 1 borrows the slot layer 2 leaves idle
    assert (row["lru-shared"], row["belady-shared"]) == (4, 4)


def exhaustive(steps, slots) -> int:
    """Fewest misses over every sequence of eviction choices (tiny traces only)."""
    best = {frozenset(): 0}
    for step in steps:
        nxt: dict[frozenset, int] = {}
        for cache, cost in best.items():
            need = set(step) - cache
            spare = sorted(cache - set(step))
            over = max(0, len(cache) + len(need) - slots)
            for out in combinations(spare, over):
                state = frozenset((cache - set(out)) | need)
                nxt[state] = min(nxt.get(state, 1 << 30), cost + len(need))
        best = nxt
    return min(best.values())


def random_steps(rng, n, experts, k, skew=1.2):
    weights = [1 / (e + 1) ** skew for e in range(experts)]
    return [rng.sample(range(experts), k) if rng.random() < 0.3
            else list(dict.fromkeys(rng.choices(range(experts), weights, k=k * 3)))[:k]
            for _ in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_belady_is_the_exhaustive_optimum(seed):
    rng = random.Random(seed)
    steps = random_steps(rng, 10, 6, 2)
    slots = rng.choice([2, 3, 4])
    assert belady(steps, slots) == exhaustive(steps, slots)


@pytest.mark.parametrize("seed", range(5))
def test_belady_is_a_floor_for_every_policy(seed):
    rng = random.Random(seed)
    trace = {l: [tuple(s) for s in random_steps(rng, 300, 16, 3)] for l in (1, 2, 3)}
    for slots in (3, 6, 10):
        row = compare(trace, [slots])[slots]
        for name in [*POLICIES, "lru-shared"]:
            assert row["belady"] <= row[name], (name, slots)
        assert row["belady-shared"] <= row["lru-shared"]


def tiny_cache(slots, policy, experts=6):
    torch.manual_seed(0)
    layouts, store = {}, None
    for e in range(experts):
        layout, buf = pack_expert(MLP(8, 4))
        store = store or RamStore(buf.numel(), experts)
        layouts[(1, e)] = layout
        store.write(e, buf)
    return ExpertCache(store, layouts, lambda l, e: e, slots, torch.device("cpu"), 8, 4,
                       policy=policy, threaded=False)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_replay_matches_the_runtime_cache(policy):
    steps = random_steps(random.Random(7), 60, 6, 2)
    cache = tiny_cache(3, policy)
    for step in steps:
        list(cache.experts_for(1, step))
    s = cache.stats().layers[1]
    misses = replay(steps, POLICIES[policy](), 3)
    assert (s.hits, s.misses) == (2 * len(steps) - misses, misses)


def test_lrfu_evicts_the_smallest_decayed_sum_of_past_uses():
    """LRFU's victim is, by definition, the candidate whose sum of 2^(-age / half_life) over
    its past uses is smallest (age in touches); checked against that sum computed directly."""
    rng = random.Random(0)
    for half_life in (1.0, 16.0, 64.0):
        p, uses, clock, resident = LRFU(half_life), {}, 0, set()
        for _ in range(3000):
            e = min(31, int(rng.expovariate(0.15)))
            if e not in resident and len(resident) >= 12:
                decayed = {c: sum(2.0 ** (-(clock - t) / half_life) for t in uses[c]) for c in resident}
                victim = p.victim(resident)
                assert decayed[victim] <= min(decayed.values()) * (1 + 1e-9)
                resident.discard(victim)
                p.forget(victim)
            clock += 1
            uses.setdefault(e, []).append(clock)
            resident.add(e)
            p.touch(e)

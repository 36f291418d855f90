"""Prefix reuse: a KV cache kept across generations gives the logits and tokens of a fresh
full prefill, while running only the tokens it did not hold (the bundled demo, resident and
offloaded)."""

import pytest
import torch

from moe_edge import ChatSession
from moe_edge.api import load, load_offloaded
from moe_edge.generation import PrefixCache, SamplingParams, generate_ids
from moe_edge.hub import DEMO
from moe_edge.model.attention import KVCache
from moe_edge.tokenizer import format_chat

TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def resident():
    return load(DEMO, device="cpu")


@pytest.fixture(scope="module")
def offloaded():
    lm = load_offloaded(DEMO, device="cpu", expert_cache="25%", slow_tier="disk")
    yield lm
    lm.offload.close()


@pytest.fixture(scope="module")
def exact():
    """The demo before quantization, fp32 everywhere: prefill and decode round alike."""
    fp = DEMO.parent / "deepseek-moe-tiny"
    lm = load_offloaded(fp, device="cpu", expert_cache="25%", dtype="float32")
    yield {"resident": load(fp, device="cpu", dtype="float32").model, "offloaded": lm.model}
    lm.offload.close()


@pytest.fixture(params=["resident", "offloaded"])
def lm(request):
    return request.getfixturevalue(request.param)


def full_prefill(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, -1]


def fed_counts(model, monkeypatch) -> list[int]:
    """How many tokens each model call runs, recorded."""
    counts, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda ids, *a, **kw: counts.append(ids.shape[1]) or forward(ids, *a, **kw))
    return counts


def test_kv_cache_truncates_and_grows_keeping_what_it_holds(resident):
    config = resident.config
    kv = KVCache(config, 1, 4, torch.float32, limit=20)
    k = torch.randn(1, config.num_kv_heads, 3, config.head_dim)
    kv.update(0, 0, k, k)
    kv.length = 3
    kv.reserve(4)
    assert kv.capacity == 4  # room already: nothing reallocated
    kv.reserve(5)
    assert kv.capacity == 8 and torch.equal(kv.k[0][:, :, :3], k)  # doubled, contents kept
    kv.reserve(17)
    assert kv.capacity == 17  # what is asked when doubling is not enough
    kv.reserve(20)
    assert kv.capacity == 20  # doubling capped at the limit
    with pytest.raises(ValueError, match="context full: 21 positions"):
        kv.reserve(21)
    kv.truncate(1)
    assert kv.length == 1
    with pytest.raises(ValueError, match="cannot truncate"):
        kv.truncate(2)


@pytest.mark.parametrize("where", ["resident", "offloaded"])
@pytest.mark.parametrize("kernels", ["fp32", "default"])
@pytest.mark.parametrize("cached", ["decoded", "diverging prompt", "whole prompt"])
def test_logits_after_reuse_equal_a_full_prefill(request, exact, resident, where, kernels, cached):
    """Keys and values left by decode steps, by a prompt that diverges halfway (truncated
    there), or by the very same prompt (its last token fed again) give a full prefill's
    logits: to fp32 rounding when every kernel is fp32; with the default int4 kernels and
    bf16 KV cache within the rounding that separates any decode step from a prefill (the
    activations enter them as bf16, or as int8 where the native kernel's int8 variant runs,
    and the cache keeps keys in bf16), with the same argmax."""
    model = exact[where] if kernels == "fp32" else request.getfixturevalue(where).model
    ids = resident.encode(TEXT)
    cache = PrefixCache(model)
    if cached == "decoded":
        generated = list(generate_ids(model, ids[:20], GREEDY, cache=cache))
        ids = ids[:20] + generated + ids[20:30]
        expect = 20 + len(generated) - 1  # the last sampled token was never fed
    elif cached == "diverging prompt":
        with torch.inference_mode():
            cache.prefill(ids[:25] + resident.encode(" something else entirely"))
        expect = 25
    else:
        with torch.inference_mode():
            cache.prefill(ids)
        expect = len(ids) - 1
    with torch.inference_mode():
        logits, reused = cache.prefill(ids)
    assert reused == expect and cache.ids == ids and cache.kv.length == len(ids)
    ref = full_prefill(model, ids)
    if kernels == "fp32" or (cached != "decoded" and model.kv_dtype == model.dtype):
        assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-5), (logits - ref).abs().max()
    else:  # bf16 activations: under 1%; int8 ones: 1.4% at most here
        from moe_edge.quant import native
        int8 = native.available() and native.dots() == "int8"
        assert (logits - ref).norm() / ref.norm() < (3e-2 if int8 else 1e-2)
    assert logits.argmax() == ref.argmax()


def test_second_request_prefills_only_its_new_tokens(resident, monkeypatch):
    ids = resident.encode(TEXT)
    cache = PrefixCache(resident.model)
    counts = fed_counts(resident.model, monkeypatch)
    first = list(generate_ids(resident.model, ids[:30], GREEDY, cache=cache))
    assert counts[0] == 30 and counts[1:] == [1] * (len(first) - 1)
    counts.clear()
    timings = {}
    second = list(generate_ids(resident.model, ids[:30] + first + ids[30:], GREEDY, timings=timings, cache=cache))
    # prefill: the last sampled token of the first request, then the new prompt tokens
    assert counts[0] == 1 + len(ids) - 30 and timings["cached_tokens"] == 30 + len(first) - 1
    fresh = list(generate_ids(resident.model, ids[:30] + first + ids[30:], GREEDY))
    assert second == fresh


def test_chat_turns_equal_with_and_without_reuse(lm):
    """A scripted conversation, greedy: the same replies when every turn prefills the whole
    history; with reuse every later turn takes its history from the cache."""
    turns = ["What is a list?", "And a dict?", "How do I sort it?", "Thanks."]
    params = lm.defaults.with_(temperature=0, max_new_tokens=12)
    reusing, fresh = ChatSession(lm, "Be brief.", params=params), ChatSession(lm, "Be brief.", params=params)
    for i, text in enumerate(turns):
        a = reusing.ask(text)
        "".join(a)
        fresh.cache.clear()
        b = fresh.ask(text)
        "".join(b)
        assert a.result.token_ids == b.result.token_ids and a.result.text == b.result.text
        assert b.result.cached_tokens == 0
        assert (a.result.cached_tokens > 0) == (i > 0)
    assert reusing.messages == fresh.messages


def common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def answered(reply):
    "".join(reply)
    return reply


def test_clear_interrupt_and_dropped_exchanges_recompute_what_changed(resident):
    """Each reply equals a fresh generation on the same prompt after an interrupted reply,
    /clear, and exchanges dropped to fit the context; each reuses only a true prefix."""
    params = resident.defaults.with_(temperature=0, max_new_tokens=16, eos_token_ids=())
    session = ChatSession(resident, "Be brief.", context=128, params=params)
    reply = session.ask("What is a list?")
    next(iter(reply))
    reply.close()  # interrupted after its first piece: the cache holds what was fed
    replies = [answered(session.ask("Go on."))]
    session.clear()
    replies.append(answered(session.ask("What is a tuple?")))
    before = format_chat(resident.tokenizer, [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "What is a list?"}])
    # what the history shared with the new prompt: its system prompt and "What is a"
    assert replies[-1].result.cached_tokens == common_prefix(before, replies[-1].stream.prompt_ids)
    for i in range(3):  # outgrow the 128-token context: the oldest exchanges go
        replies.append(answered(session.ask(f"Question number {i} about lists and tuples?")))
    assert sum(r.dropped_turns for r in replies) > 0
    for r in replies:
        prompt = r.stream.prompt_ids
        assert r.result.token_ids == list(generate_ids(resident.model, prompt, params))
        assert r.result.cached_tokens < len(prompt)


def test_loaded_model_calls_reuse_the_last_conversation():
    """lm.chat on a conversation that extends the previous call's prefills only the new
    tokens, and replies as a fresh model does (fp32 demo: reuse is exact there)."""
    fp = DEMO.parent / "deepseek-moe-tiny"
    lm, fresh = load(fp, dtype="float32"), load(fp, dtype="float32")
    first = [{"role": "user", "content": "Write a function that adds two numbers."}]
    reply = lm.chat(first, temperature=0, max_new_tokens=12)
    second = first + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And subtract?"}]
    again = lm.chat(second, temperature=0, max_new_tokens=12)
    assert again.cached_tokens > reply.prompt_tokens // 2
    assert again.token_ids == fresh.chat(second, temperature=0, max_new_tokens=12).token_ids

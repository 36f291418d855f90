import json
from types import SimpleNamespace

import pytest
import torch

from moe_edge.api import load
from moe_edge.errors import ConfigError
from moe_edge.generation import SamplingParams, TextStream, read_generation_config, sample
from moe_edge.testing import byte_tokenizer
from moe_edge.tokenizer import IncrementalDetokenizer, format_chat

TOK = byte_tokenizer()
GREEDY = SamplingParams(temperature=0, max_new_tokens=64, eos_token_ids=(1,))


class ScriptedModel:
    """Emits a fixed token sequence (one-hot logits), whatever the input: drives the
    generation loop without a real network."""

    def __init__(self, script, vocab=320):
        self.script, self.vocab, self.calls = list(script), vocab, 0
        self.config = SimpleNamespace(max_position_embeddings=512)
        self.device = torch.device("cpu")

    def new_cache(self, batch=1, capacity=None):
        return FakeKV()

    def __call__(self, ids, cache, last_only=False):
        logits = torch.full((1, 1, self.vocab), -10.0)
        logits[0, 0, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        cache.length += ids.shape[1]
        return logits


class FakeKV:
    length = 0

    def truncate(self, length):
        self.length = length

    def reserve(self, positions):
        pass


def text_ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def run(script, params=GREEDY, prompt=(0,)):
    stream = TextStream(ScriptedModel(script), TOK, list(prompt), params)
    pieces = list(stream)
    return pieces, stream.result


def test_streaming_multibyte_pieces_are_whole_characters():
    text = "naïve café — 日本語 🐍 done"
    pieces, result = run(text_ids(text) + [1])
    assert "".join(pieces) == result.text == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 10 and result.finish_reason == "eos"
    assert result.generated_tokens == len(text_ids(text)) + 1


def test_incremental_detokenizer_matches_decode_of_all():
    ids = text_ids("ß∑ 𝄞 mixed ascii ✓")
    detok = IncrementalDetokenizer(TOK)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == TOK.decode(ids)


def test_stop_string_cut_and_never_streamed():
    pieces, result = run(text_ids("Hello World\nUser: more"), GREEDY.with_(stop=("\nUser:",)))
    assert result.text == "Hello World" and result.finish_reason == "stop"
    assert "".join(pieces) == "Hello World"


def test_partial_stop_prefix_is_released_at_the_end():
    pieces, result = run(text_ids("ends with \nUs"), GREEDY.with_(stop=("\nUser:",), max_new_tokens=13))
    assert "".join(pieces) == result.text == "ends with \nUs"
    assert result.finish_reason == "length"


def test_max_new_tokens_and_context_limit():
    _, result = run(text_ids("abcdefgh"), GREEDY.with_(max_new_tokens=3))
    assert result.text == "abc" and result.finish_reason == "length"
    stream = TextStream(ScriptedModel(text_ids("abcdefgh")), TOK, [0] * 5, GREEDY, context=8)
    list(stream)
    assert stream.result.generated_tokens == 3  # 5 prompt + 3 new fill the context of 8


def test_prompt_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="context holds 4"):
        list(TextStream(ScriptedModel([5]), TOK, [0] * 4, GREEDY, context=4))


def test_close_keeps_partial_reply():
    stream = TextStream(ScriptedModel(text_ids("abcdefgh")), TOK, [0], GREEDY)
    got = [next(stream), next(stream)]
    stream.close()
    assert stream.result.finish_reason == "interrupted" and stream.result.text == "".join(got)


def test_sampling_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    none = torch.tensor([], dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    assert sample(logits.clone(), SamplingParams(temperature=0), none, None) == 1
    for params in [SamplingParams(temperature=5, top_k=1), SamplingParams(temperature=5, top_p=0.01),
                   SamplingParams(temperature=5, min_p=0.99)]:
        assert {sample(logits.clone(), params, none, g) for _ in range(50)} == {1}
    top2 = {sample(logits.clone(), SamplingParams(temperature=5, top_k=2), none, g) for _ in range(200)}
    assert top2 == {1, 2}
    # penalty 100 on the seen argmax makes token 2 the greedy choice
    assert sample(logits.clone(), SamplingParams(temperature=0, repetition_penalty=100.0),
                  torch.tensor([1]), None) == 2


def test_sampling_params_validated():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.3, "top_p": 0.9, "eos_token_id": [5, 7], "max_new_tokens": 99}))
    p = read_generation_config(tmp_path, (1,))
    assert (p.temperature, p.top_p, p.max_new_tokens, p.eos_token_ids) == (0.3, 0.9, 99, (1, 5, 7))
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert read_generation_config(tmp_path).temperature == 0


def test_chat_format_template_and_fallback_agree():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    expected = "Be brief.\n\nUser: hi\n\nAssistant: hello<｜end▁of▁sentence｜>User: again\n\nAssistant:"
    with_template = format_chat(TOK, messages)
    without = format_chat(byte_tokenizer(chat_template=None), messages)
    assert with_template == without
    assert with_template[0] == 0 and with_template.count(0) == 1  # exactly one BOS
    assert TOK.decode(with_template[1:]) == expected


def test_real_model_streaming_equals_generate_and_seed_reproducible(tiny_deepseek):
    lm = load(tiny_deepseek, device="cpu")
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=40, seed=7)
    stream = lm.stream("Hello", **kw)
    streamed = "".join(stream)
    again = lm.generate("Hello", **kw)
    assert streamed == stream.result.text == again.text
    assert stream.result.token_ids == again.token_ids
    other = lm.generate("Hello", **{**kw, "seed": 8})
    assert other.token_ids != again.token_ids
    greedy = [lm.generate("Hello", temperature=0, max_new_tokens=20).token_ids for _ in range(2)]
    assert greedy[0] == greedy[1]
    assert again.prompt_tokens == len(lm.encode("Hello")) and again.decode_tps > 0


@pytest.mark.parametrize("prompt_len, trims", [(8, 0), (64, 1)])
def test_long_prompts_hand_their_temporaries_back_once(prompt_len, trims, monkeypatch):
    """After a long prompt's prefill the freed heap goes back to the OS (once, not per token)."""
    import moe_edge.generation as generation
    calls = []
    monkeypatch.setattr(generation, "trim_heap", lambda: calls.append(1))
    run(text_ids("abcdefgh") * 4 + [1], prompt=[5] * prompt_len)
    assert len(calls) == trims


def test_cancel_event_stops_at_the_next_token():
    import threading
    model, cancel = ScriptedModel(text_ids("abcdefgh")), threading.Event()
    stream = TextStream(model, TOK, [0], GREEDY, cancel=cancel)
    first = next(stream)
    cancel.set()
    assert list(stream) == [] and model.calls == 2  # the token in hand is dropped, no more steps
    assert stream.result.finish_reason == "interrupted" and stream.result.text == first

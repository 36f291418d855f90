"""Chat templates are untrusted code: rendered in a worker process under a time, a memory
and an output bound, with a one-line error past each; the text is transformers' own."""

import json
import time

import pytest

from moe_edge import chat_template
from moe_edge.chat_template import TemplateWorker
from moe_edge.errors import ChatTemplateError, CheckpointError
from moe_edge.testing import DEEPSEEK_CHAT_TEMPLATE, byte_tokenizer
from moe_edge.tokenizer import format_chat, load_tokenizer

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"},
         {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]


@pytest.fixture(scope="module")
def worker():
    w = TemplateWorker(timeout=1.5, max_chars=100_000, memory=256 << 20)
    yield w
    w.close()


def test_rendered_text_is_what_transformers_renders(worker):
    tok = byte_tokenizer()
    ours = worker.render(DEEPSEEK_CHAT_TEMPLATE, HELLO, True, tok.special_tokens_map, "m")
    assert ours == tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     r"m: the chat template did not finish within 1.5 s"),
    ("{{ 'x' * 10**10 }}", "needed more than 256 MiB of memory"),
    ("{{ '%*s' % (10**10, '') }}", "needed more than 256 MiB of memory"),
    ("{{ 'x'|center(10**10) }}", "needed more than 256 MiB of memory"),
    ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "wrote more than 100,000 characters"),
    ("{{ raise_exception('Conversation roles must alternate') }}",
     r"failed \(TemplateError: Conversation roles must alternate\)"),
    ("{% if %}", r"failed \(TemplateSyntaxError"),
])
def test_hostile_template_is_bounded_with_one_line(worker, template, message):
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=message) as e:
        worker.render(template, HELLO, True, {}, "m")
    assert "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 60  # bounded (a restart of the worker included)
    assert worker.render("{{ messages[1]['content'] }}", HELLO, False, {}, "m") == "héllo"  # still serving


def test_format_chat_refuses_a_looping_template_of_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_template, "_WORKER", TemplateWorker(timeout=1.0))
    byte_tokenizer("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                   ).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    with pytest.raises(ChatTemplateError, match=f"{tmp_path}: the chat template did not finish"):
        format_chat(tok, HELLO)
    chat_template._WORKER.close()


def test_custom_tokenizer_code_is_refused_without_trust_remote_code_advice(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path)
    f = tmp_path / "tokenizer_config.json"
    raw = json.loads(f.read_text())
    raw.update(tokenizer_class="DeepseekTokenizer",
               auto_map={"AutoTokenizer": ["tokenization_deepseek.DeepseekTokenizer", None]})
    f.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="custom tokenizer class .* never runs checkpoint code") as e:
        load_tokenizer(tmp_path)
    assert "trust_remote_code" not in str(e.value) and "\n" not in str(e.value)

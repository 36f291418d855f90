"""`moe-edge serve` driven by the official `openai` client (and raw HTTP for what the client
will not send) against a real server on a free loopback port, with the bundled demo."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client drives the server (the test extra)")
httpx = pytest.importorskip("httpx")

from moe_edge.api import load_offloaded  # noqa: E402
from moe_edge.hub import DEMO  # noqa: E402
import uvicorn  # noqa: E402

from moe_edge.serve import Engine, Server, ServerThread, create_app  # noqa: E402
from moe_edge.tokenizer import format_chat  # noqa: E402

KEY = "sk-test-key"
CONTEXT, MAX_BODY = 512, 64 * 1024
USER = [{"role": "user", "content": "What is a list?"}]
MOE_EDGE = str(Path(sys.executable).parent / "moe-edge")


@pytest.fixture(scope="module")
def lm():
    """The demo before quantization, fp32 throughout (the KV cache too), half its experts
    offloaded: a reused prefix then rounds as a fresh prefill does, so greedy texts of
    requests in any order can be compared exactly (int4 kernels and a bf16 KV cache round
    a reused prefix differently, see test_prefix_reuse)."""
    lm = load_offloaded(DEMO.parent / "deepseek-moe-tiny", device="cpu", expert_cache="50%",
                        dtype="float32")
    yield lm
    lm.offload.close()


@pytest.fixture(scope="module")
def app(lm):
    """Context 512, one generating and one waiting at most, an API key."""
    return create_app(lm, "demo", CONTEXT, queue_size=1, api_key=KEY, max_body=MAX_BODY)


@pytest.fixture(scope="module")
def url(app):
    """The app served from a thread on a free loopback port."""
    running = ServerThread(app)
    yield running.url
    running.stop()
    assert not running.thread.is_alive()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def engine(app):
    return app.state.engine


def metrics(url):
    return httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()


def idle(url, timeout=30):
    deadline = time.monotonic() + timeout
    while (m := metrics(url))["requests"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return m


def chat(client, **kw):
    return client.chat.completions.create(model="demo", **{"messages": USER, "temperature": 0,
                                                           "max_tokens": 12, **kw})


def streamed(stream):
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_chat_streaming_equals_non_streaming_with_usage(client, lm):
    whole = chat(client)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert whole.usage.prompt_tokens == len(format_chat(lm.tokenizer, USER))
    assert whole.usage.completion_tokens == 12 and whole.object == "chat.completion"
    text, chunks = streamed(chat(client, stream=True, stream_options={"include_usage": True}))
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    text, chunks = streamed(chat(client, stream=True, max_completion_tokens=5))
    assert chunks[-1].usage is None and text == lm.tokenizer.decode(lm.encode(text), skip_special_tokens=True)


def test_raw_stream_is_openai_sse_ending_in_done(url):
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": USER, "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completions_text_and_token_ids(client, lm):
    first = client.completions.create(model="demo", prompt="def fibonacci(n):", max_tokens=10, temperature=0)
    assert first.object == "text_completion" and first.choices[0].finish_reason == "length"
    by_ids = client.completions.create(model="demo", prompt=lm.encode("def fibonacci(n):"), max_tokens=10,
                                       temperature=0)
    assert by_ids.choices[0].text == first.choices[0].text
    stream = client.completions.create(model="demo", prompt="def fibonacci(n):", max_tokens=10,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == first.choices[0].text
    assert first.usage.prompt_tokens == len(lm.encode("def fibonacci(n):"))


def test_models_health_and_metrics(client, url):
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # no key needed
    m = metrics(url)
    assert m["model"] == "demo" and m["requests"]["queue_size"] == 1
    off = m["offload"]
    assert 0 < off["hit_rate"] <= 1 and off["bytes_paged"] > 0 and off["slots_per_layer"] == 32
    assert m["kv_cache"]["context"] == CONTEXT and 0 < m["kv_cache"]["capacity"] <= CONTEXT


def test_stop_strings_cut_the_text(client):
    full = chat(client, max_tokens=24).choices[0].message.content
    stop = full[8:11]
    cut = chat(client, max_tokens=24, stop=stop).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(stop)]
    listed = chat(client, max_tokens=24, stop=["never appears", stop], stream=True)
    assert streamed(listed)[0] == cut.message.content


def test_seed_reproduces_sampling(client):
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=16)
    a, b = (chat(client, seed=5, **kw).choices[0].message.content for _ in range(2))
    others = {chat(client, seed=s, **kw).choices[0].message.content for s in (6, 7)}
    assert a == b and others != {a}


def test_cached_tokens_count_a_shared_prefix(client, lm, engine):
    first = chat(client, max_tokens=8)
    cached = list(engine.cache.ids)  # the prompt and the reply, but its last token
    turn = USER + [{"role": "assistant", "content": first.choices[0].message.content},
                   {"role": "user", "content": "And a dict?"}]
    ids = format_chat(lm.tokenizer, turn)
    expected = next(i for i, (a, b) in enumerate(zip(cached, ids)) if a != b)
    second = chat(client, messages=turn, max_tokens=8)
    assert second.usage.prompt_tokens == len(ids)
    assert second.usage.prompt_tokens_details.cached_tokens == expected >= len(format_chat(lm.tokenizer, USER)) - 1
    again = chat(client, messages=turn, max_tokens=8)
    assert again.usage.prompt_tokens_details.cached_tokens == len(ids) - 1  # the last token is fed again
    assert again.choices[0].message.content == second.choices[0].message.content


def test_disconnect_mid_stream_stops_the_generation(client, url):
    before = metrics(url)["requests"]["cancelled"]
    with client.completions.create(model="demo", prompt="class Queue:", max_tokens=400, temperature=0,
                                   stream=True) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break  # leaving the block closes the connection
    m = idle(url)
    assert m["requests"]["cancelled"] == before + 1
    last = m["last_request"]
    assert last["finish_reason"] == "interrupted" and last["generated_tokens"] < 100
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"  # and it serves on


def test_disconnect_while_waiting_for_a_whole_answer_stops_it(url):
    before = metrics(url)["requests"]["cancelled"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5,
                   json={"prompt": "class Queue:", "max_tokens": 400, "temperature": 0})
    m = idle(url)
    assert m["requests"]["cancelled"] == before + 1 and m["last_request"]["generated_tokens"] < 400


def test_a_failing_chat_template_is_a_400(url, lm, monkeypatch):
    from moe_edge.errors import ChatTemplateError
    from moe_edge import openai_format

    def refuse(tokenizer, messages):
        raise ChatTemplateError("Conversation roles must alternate user/assistant")
    monkeypatch.setattr(openai_format, "format_chat", refuse)
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": USER})
    assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_error"
    assert "roles must alternate" in r.json()["error"]["message"]


def test_a_full_queue_answers_429(client, url):
    opened = [client.completions.create(model="demo", prompt="class Queue:", max_tokens=400,
                                        temperature=0, stream=True) for _ in range(2)]
    try:
        next(iter(opened[0]))  # one generating, one waiting: the queue (size 1) is full
        with pytest.raises(openai.RateLimitError) as e:
            chat(client, max_tokens=2)
        assert e.value.status_code == 429 and "busy" in e.value.message and "--queue-size" in e.value.message
        assert e.value.body["code"] == "queue_full"
    finally:
        for s in opened:
            s.close()
    idle(url)
    assert metrics(url)["requests"]["rejected"] >= 1 and chat(client, max_tokens=2).choices


LONG = "word " * 700

BAD = [  # (method, path, body, status, param or None, fragment)
    ("POST", "/v1/chat/completions", b"{not json", 400, None, "not valid JSON"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("POST", "/v1/chat/completions", {"messages": USER, "temperature": "hot"}, 422, "temperature", "a number"),
    ("POST", "/v1/chat/completions", {"messages": "hello"}, 422, "messages", "an array"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 422,
     "messages[0].content", "a string or an array"),
    ("POST", "/v1/chat/completions", {"messages": USER, "stream": "yes"}, 422, "stream", "a boolean"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages", "must not be empty"),
    ("POST", "/v1/chat/completions", {}, 400, "messages", "required"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role", "one of system"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages", "context holds 512"),
    ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": -1}, 400, "max_tokens", ">= 1"),
    ("POST", "/v1/chat/completions", {"messages": USER, "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("POST", "/v1/chat/completions", {"messages": USER, "n": 2}, 400, "n", "only 'n': 1"),
    ("POST", "/v1/chat/completions", {"messages": USER, "stop": ["a", 3]}, 400, "stop[1]", "a string"),
    ("POST", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt", "token ids"),
    ("POST", "/v1/completions", {"prompt": LONG}, 400, "prompt", "context holds 512"),
    ("POST", "/v1/chat/completions", b'{"messages": "' + b"x" * MAX_BODY + b'"}', 413, None, "over 65536 bytes"),
    ("GET", "/v1/nothing", None, 404, None, "no route /v1/nothing"),
    ("GET", "/v1/chat/completions", None, 405, None, "GET is not allowed"),
]


@pytest.mark.parametrize("method, path, body, status, param, fragment", BAD,
                         ids=[f"{b[3]}-{b[5]}" for b in BAD])
def test_bad_requests_get_openai_error_bodies(url, method, path, body, status, param, fragment):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    r = httpx.request(method, f"{url}{path}", content=content,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert fragment in error["message"] and "Traceback" not in r.text and "\n" not in error["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_api_key_guards_every_route_but_health(url):
    for path in ("/v1/models", "/metrics", "/v1/chat/completions"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request("POST" if "chat" in path else "GET", f"{url}{path}", headers=headers, json={})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_sigterm_or_sigint_stops_generating_and_a_second_sigint_forces(app):
    for sig in (signal.SIGTERM, signal.SIGINT):
        srv = Server(uvicorn.Config(app), Engine(app.state.engine.lm, CONTEXT, 0))
        srv.handle_exit(sig, None)
        assert srv.should_exit and not srv.force_exit and srv.engine.stopping
    srv.handle_exit(signal.SIGINT, None)
    assert srv.force_exit


@pytest.mark.skipif(not os.path.exists(MOE_EDGE), reason="the moe-edge script is not installed")
def test_ctrl_c_stops_the_server_cleanly_mid_stream(tmp_path):
    """SIGINT (SIGTERM takes the same path, above) while a stream runs: the stream is cut
    at its next token and told why, the process leaves with status 0."""
    env = {**os.environ, "MOE_EDGE_CACHE": str(tmp_path)}
    proc = subprocess.Popen([MOE_EDGE, "serve", "--port", "0", "-c", "512"], stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        lines = []
        while not (lines and "listening" in lines[-1]):
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)
        url = lines[-1].split()[1].removesuffix("/v1")
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "class Queue:", "max_tokens": 400, "stream": True}) as r:
            events = r.iter_lines()
            next(events)
            proc.send_signal(signal.SIGINT)
            rest = [line for line in events if line]
        assert rest[-1] == "data: [DONE]" and "shutting_down" in rest[-2]  # cut short, and told so
        assert proc.wait(30) == 0
        err = "".join(lines) + proc.stderr.read()
        assert "moe-edge serve: stopped" in err and "Traceback" not in err
    finally:
        proc.kill()

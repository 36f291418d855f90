"""The `moe-edge` CLI driven as a user would: CliRunner for flows, a real terminal for Ctrl-C."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from moe_edge.chat import ChatSession
from moe_edge.cli import main
from moe_edge.hub import resolve_model
from moe_edge.info import model_info
from moe_edge.errors import CheckpointError
from moe_edge.quant import native
from moe_edge.testing import random_model

GREEDY = ["--temp", "0", "-n", "6"]


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def assert_one_line_error(r, *fragments):
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.output
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def gptq(tiny_deepseek, tmp_path_factory):
    """The tiny model quantized by `moe-edge quantize` (RTN: the flow, not the quality)."""
    out = tmp_path_factory.mktemp("q") / "tiny-gptq"
    r = run("quantize", tiny_deepseek, "-o", out, "--method", "rtn", "--group-size", "32")
    assert r.exit_code == 0, r.output
    native.available()  # built before the commands below, whose stderr holds no build notice
    return out


def test_help_lists_every_command():
    r = run("--help")
    for command in ("chat", "generate", "info", "bench", "quantize", "serve"):
        assert command in r.output
    assert run("--version").output.startswith("moe-edge, version")


def test_one_shot_prints_only_the_reply(gptq):
    r = run("chat", gptq, "hello", *GREEDY, "--expert-cache", "4")
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and r.stdout.strip() and ">>>" not in r.stdout and "moe-edge" not in r.stdout


def test_piped_stdin_answers_once_and_matches_the_argument(gptq):
    piped = run("chat", gptq, *GREEDY, "--expert-cache", "50%", input="hello\n")
    given = run("chat", gptq, "hello", *GREEDY)
    assert piped.exit_code == 0 and piped.stderr == ""
    assert piped.stdout == given.stdout  # greedy: same reply, offloaded (piped) or resident (auto)


@pytest.mark.skipif(not native.CPU_FLAGS <= native.cpu_flags(),
                    reason="CPU without AVX512-BF16/VBMI: PyTorch's kernel runs, nothing is built")
def test_the_kernel_build_is_announced_once_and_not_when_cached(gptq, tmp_path, monkeypatch):
    """A first chat that compiles the native kernel says so on stderr, once; the next, which
    finds it built, says nothing. The build: the cached one, as if just compiled in tmp_path."""
    from torch.utils import cpp_extension
    real_folder, real_load = native._folder(), cpp_extension.load

    def load(name, sources, build_directory, **kw):
        (Path(build_directory) / f"{name}.so").touch()
        return real_load(name, sources, build_directory=str(real_folder), **kw)
    monkeypatch.setattr(native, "_folder", lambda: tmp_path)
    monkeypatch.setattr(cpp_extension, "load", load)
    runs = []
    try:
        for _ in range(2):
            native.available.cache_clear()
            runs.append(run("chat", gptq, "hello", *GREEDY))
    finally:
        native.available.cache_clear()
    first, again = runs
    notice = "moe-edge: compiling the native int4 kernel and decode steps (once, ~30 s)...\n"
    assert first.exit_code == again.exit_code == 0, first.output
    assert first.stderr == notice and again.stderr == ""
    assert first.stdout == again.stdout and (tmp_path / "moe_edge_int4.so").exists()


def test_json_and_stats(gptq):
    r = run("chat", gptq, "hello", *GREEDY, "--expert-cache", "50%", "--json")
    out = json.loads(r.stdout)
    assert out["generated_tokens"] <= 6 and out["offload"]["misses"] > 0 and out["peak_bytes"] > 0
    r = run("generate", gptq, "-p", "hello", "--raw", *GREEDY, "--expert-cache", "50%")
    assert r.exit_code == 0 and "tok/s" in r.stderr and "experts" in r.stderr and "hit" in r.stderr


def test_lm_head_int8_flag_reaches_the_model_and_the_plan(gptq):
    """--lm-head int8 loads an int8 head (resident and offloaded) and `info` plans for it."""
    for cache in ("auto", "50%"):
        r = run("generate", gptq, "-p", "hello", "--raw", *GREEDY, "--expert-cache", cache,
                "--lm-head", "int8", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["generated_tokens"] >= 1
    plain, int8 = (json.loads(run("info", gptq, "--json", *flags).stdout)
                   for flags in ((), ("--lm-head", "int8")))
    assert int8["dense_bytes"] < plain["dense_bytes"] and int8["lm_head_int8"] and not plain["lm_head_int8"]
    assert "lm_head       int8" in run("info", gptq, "--lm-head", "int8").stdout
    assert "Invalid value for '--lm-head'" in run("generate", gptq, "-p", "x", "--lm-head", "int4").output
    banner = run("chat", gptq, "-i", "--lm-head", "int8", input="/bye\n").stderr
    assert "lm_head       int8" in banner and "lm_head" not in run("chat", gptq, "-i", input="/bye\n").stderr


def test_interactive_session_runs_every_slash_command(gptq, tmp_path):
    transcript = tmp_path / "chat.json"
    turns = "\n".join([
        "hello", "/show settings", "/set temp 0", "/set top_k 5", "/set top_p 0.9", "/set min_p 0.05",
        "/set max_tokens 4", "/set seed 7", "/set system Be brief.", "/show model", "/show cache",
        "/regen", '"""first line', 'second line"""', "/set temp -1", "/set top_k many", "/frobnicate",
        "/?", f"/save {transcript}", "/clear", "/show nothing", "/bye", "never read",
    ]) + "\n"
    r = run("chat", gptq, "-i", "--expert-cache", "50%", "-n", "4", input=turns)
    assert r.exit_code == 0, r.output
    err = r.stderr
    assert "moe-edge" in err and "expert cache" in err  # banner
    assert err.count("[prompt ") == 3  # a stats line per reply: hello, /regen, the multi-line turn
    for shown in ("(temp = 0.0)", "(top_k = 5)", "(max_tokens = 4)", "(system = Be brief.)",
                  "parameters", "hit rate", "temperature must be >= 0", "top_k needs an integer",
                  "unknown command /frobnicate; type /? for the list", "/regen", "saved to",
                  "conversation cleared, system prompt kept", "usage: /show"):
        assert shown in err, shown
    saved = json.loads(transcript.read_text())
    assert saved["settings"]["temp"] == 0.0 and saved["settings"]["seed"] == 7
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]  # /regen replaced one answer
    assert saved["messages"][3]["content"] == "first line\nsecond line"
    assert "Traceback" not in r.output


def test_save_never_overwrites_unless_asked_with_save_bang(gptq, tmp_path):
    transcript = tmp_path / "chat.json"
    transcript.write_text("keep me")
    r = run("chat", gptq, "-i", "-n", "2", input=f"hello\n/save {transcript}\n/save!\n")
    assert r.exit_code == 0, r.output
    assert f"error: {transcript} exists; pick another name, or /save! {transcript} to overwrite it" in r.stderr
    assert "usage: /save! FILE" in r.stderr and transcript.read_text() == "keep me"
    r = run("chat", gptq, "-i", "-n", "2", input=f"hello\n/save! {transcript}\n")
    assert f"(saved to {transcript})" in r.stderr
    assert json.loads(transcript.read_text())["messages"][0]["content"] == "hello"


def test_ctrl_d_exits_cleanly(gptq):
    r = run("chat", gptq, "-i", input="")
    assert r.exit_code == 0 and "Traceback" not in r.output


@pytest.mark.parametrize("args, fragments", [
    (["--temp", "-1"], ["temperature must be >= 0"]),
    (["--top-p", "2"], ["top_p"]),
    (["--expert-cache", "1KB"], ["expert cache too small", "minimum"]),
    (["--expert-cache", "lots"], ["expert cache size 'lots'"]),
    (["--expert-cache", "150%"], ["percentage"]),
    (["--dtype", "int3"], ["dtype 'int3'"]),
])
def test_bad_settings_are_one_line(gptq, args, fragments):
    assert_one_line_error(run("chat", gptq, "hi", *args), *fragments)


def test_serve_on_a_port_in_use_is_one_line_before_loading():
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert_one_line_error(run("serve", "--port", port), f"cannot listen on 127.0.0.1:{port}",
                              "pick another --port")


def test_missing_model_and_unknown_flag(tmp_path):
    assert_one_line_error(run("chat", tmp_path / "nope", "hi"), "no such model folder")
    assert_one_line_error(run("info", "nobody/nothing-here", "--offline"), "not in the local", "--offline")
    r = run("chat", "--frobnicate")
    assert r.exit_code == 2 and "No such option" in r.output


def test_hub_id_resolves_from_the_local_cache(tiny_deepseek, tmp_path):
    import shutil
    repo = tmp_path / "models--acme--tiny-moe"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_deepseek, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert resolve_model("acme/tiny-moe", offline=True, cache_dir=tmp_path) == snapshot
    with pytest.raises(CheckpointError, match="--offline"):
        resolve_model("acme/other", offline=True, cache_dir=tmp_path)


def test_info_counts_parameters(tiny_deepseek, gptq):
    cfg = json.loads((tiny_deepseek / "config.json").read_text())
    model = random_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    fp, q = model_info(tiny_deepseek), model_info(gptq)
    assert fp.total_params == q.total_params == total
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    k, E = cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    assert fp.active_params == total - experts + experts * k // E
    r = run("info", gptq, "--json", "--devices", "--expert-cache", "50%")
    out = json.loads(r.stdout)
    assert out["plan"]["slots_per_layer"] == E // 2 and out["devices"][0]["name"] == "cpu"
    assert out["quantization"]["bits"] == 4 and out["expert_bytes"] < fp.expert_bytes / 4


def test_bench_sweeps_caches_and_depths(gptq):
    r = run("bench", gptq, "--expert-cache", "50%,100%", "--prefetch-depth", "0,1",
            "-p", "8", "-n", "4", "-r", "1", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [(row["expert_cache"], row["prefetch_depth"]) for row in rows] == [
        ("50%", 0), ("50%", 1), ("100%", 0), ("100%", 1)]
    full = [row for row in rows if row["expert_cache"] == "100%"]
    assert all(row["hit_rate"] == 1.0 and row["bytes_paged"] == 0 for row in full)  # warmed
    assert all(row["decode_tps"] > 0 for row in rows)
    half = rows[0]  # beside the measured rate, the range `info --forecast` gives for the plan
    assert 0 < half["forecast_no_reuse_tps"] < half["forecast_resident_tps"]
    assert full[0]["forecast_no_reuse_tps"] == full[0]["forecast_resident_tps"]  # nothing to page
    table = run("bench", gptq, "--expert-cache", "50%", "--prefetch-depth", "1", "-p", "8", "-n", "4", "-r", "1")
    assert table.stdout.startswith("| cache |") and table.stdout.count("\n") == 3
    assert "forecast tok/s" in table.stdout


def test_history_outgrowing_the_context_drops_oldest_turns(tiny_deepseek):
    from moe_edge import load
    lm = load(tiny_deepseek, device="cpu")
    session = ChatSession(lm, system="sys", context=96, params=lm.defaults.with_(
        temperature=0, max_new_tokens=8))
    dropped = 0
    for i in range(6):
        reply = session.ask(f"message number {i} " * 2)
        list(reply)
        dropped += reply.dropped_turns
        assert reply.result.prompt_tokens + 8 <= 96
    assert dropped > 0 and session.conversation()[0]["role"] == "system"
    assert session.messages[-2]["content"].startswith("message number 5")


def test_interrupted_reply_keeps_its_text(tiny_deepseek):
    from moe_edge import load
    lm = load(tiny_deepseek, device="cpu")
    session = ChatSession(lm, params=lm.defaults.with_(temperature=0, max_new_tokens=50,
                                                       eos_token_ids=()))
    reply = session.ask("hello")
    first = next(iter(reply))
    reply.close()
    assert reply.result.finish_reason == "interrupted"
    assert session.messages[-1] == {"role": "assistant", "content": reply.result.text}
    assert reply.result.text.startswith(first)


def test_info_predicts_the_loaded_size_of_the_demo():
    """Header-only sizes, including the bf16 head a GPTQ model keeps on the CPU, within 5%
    of what load_model actually holds."""
    from moe_edge.api import load_model
    from moe_edge.hub import DEMO
    info = model_info(DEMO)
    model = load_model(DEMO, device="cpu")
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    predicted = info.dense_bytes + info.moe_layers * info.experts_per_layer * info.expert_bytes
    assert abs(predicted - held) / held < 0.05

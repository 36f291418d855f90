"""Bad input: a project exception whose message names the file and the problem."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from moe_edge.api import load, load_model
from moe_edge.cli import main
from moe_edge.errors import CheckpointError, ConfigError, MoeEdgeError
from moe_edge.testing import edit_weights


@pytest.fixture
def ckpt(tiny_deepseek, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_deepseek, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such model folder"):
        load(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config.json: not found"):
        load(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        load(ckpt)


def test_unsupported_model_type(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="'gpt2' is not supported; supported: deepseek"):
        load(ckpt)


def test_missing_tensor(ckpt):
    edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.experts.3.up_proj.weight' is missing"):
        load_model(ckpt, device="cpu")


def test_wrongly_shaped_tensor(ckpt):
    def edit(t):
        t["model.layers.2.mlp.gate.weight"] = torch.zeros(7, 64)
    edit_weights(ckpt, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt, device="cpu")
    message = str(e.value)
    assert "model.safetensors" in message and "mlp.gate.weight" in message and "[7, 64]" in message
    assert "[8, 64]" in message


def test_unexpected_tensor(ckpt):
    def edit(t):
        t["model.layers.1.mlp.experts.99.up_proj.weight"] = torch.zeros(32, 64)
    edit_weights(ckpt, edit)
    with pytest.raises(CheckpointError, match="does not use"):
        load_model(ckpt, device="cpu")


def test_truncated_safetensors(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable.*truncated"):
        load_model(ckpt, device="cpu")


def test_pickle_only_refused_and_never_loaded(ckpt, monkeypatch):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not really a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*Convert them to safetensors"):
        load_model(ckpt, device="cpu")


def test_missing_tokenizer(ckpt):
    for f in ckpt.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load(ckpt)


def test_all_project_errors_share_a_base():
    assert issubclass(ConfigError, MoeEdgeError) and issubclass(CheckpointError, MoeEdgeError)


def test_cli_prints_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "nope"), "-p", "hi"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no such model folder" in lines[0]
    assert "Traceback" not in result.output


def test_cli_generate_runs(tiny_deepseek):
    result = CliRunner().invoke(main, ["generate", str(tiny_deepseek), "-p", "hi", "-n", "5",
                                       "--temp", "0", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["generated_tokens"] <= 5 and out["prompt_tokens"] > 0


@pytest.mark.parametrize("args", [["generate", "demo", "-p", "-"], ["chat"]])
def test_stdin_that_is_not_utf8_is_one_line(args):
    result = CliRunner().invoke(main, args, input=b"caf\xe9 au lait\n")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "stdin: byte 3" in result.output and "is not UTF-8" in result.output

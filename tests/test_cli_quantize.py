"""What `moe-edge quantize` prints: a plain line per layer when stderr is not a terminal (a
nohup run's log; CliRunner's stderr is not one either), no third-party warnings unless -v."""

import json
import logging
import re
import shutil
import warnings

import pytest
from click.testing import CliRunner

from moe_edge.cli import main
from moe_edge.quant import quantizer

FAST = ["--method", "rtn", "--group-size", "32", "--calib-samples", "4", "--calib-seq-len", "32"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def src(tiny_deepseek, tmp_path):
    """The tiny checkpoint with a 64-token tokenizer limit: tokenizing the calibration text
    makes transformers log "Token indices sequence length is longer than ..."."""
    folder = shutil.copytree(tiny_deepseek, tmp_path / "tiny")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    return folder


def test_a_line_per_layer_when_stderr_is_not_a_terminal(src, tmp_path):
    r = run("quantize", src, "-o", tmp_path / "q", *FAST)
    assert r.exit_code == 0, r.output
    lines = [l for l in r.stderr.splitlines() if l.startswith("layer ")]
    assert [l.split(",")[0] for l in lines] == ["layer 1/3 done", "layer 2/3 done", "layer 3/3 done"]
    clock = r"\d+:\d\d:\d\d"
    assert all(re.fullmatch(rf"layer \d/3 done, elapsed {clock}, eta {clock}", l) for l in lines), lines
    assert lines[-1].endswith("eta 0:00:00") and "\r" not in r.stderr  # no bar
    assert r.stdout.startswith("wrote")


def test_third_party_warnings_stay_out_unless_verbose(src, tmp_path, monkeypatch):
    from transformers import PretrainedConfig
    real = quantizer.load_tokenizer

    def load_tokenizer(folder):  # transformers' own FutureWarning, raised while quantize runs
        PretrainedConfig().rope_scaling = {"rope_type": "default"}
        return real(folder)
    monkeypatch.setattr(quantizer, "load_tokenizer", load_tokenizer)
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        for flags, shown in (((), False), (("-v",), True)):
            logged.clear()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                r = run("quantize", src, "-o", tmp_path / "q", "--overwrite", *FAST, *flags)
            assert r.exit_code == 0, r.output
            warned = [str(w.message) for w in seen]
            assert any("rope_scaling" in w for w in warned) is shown, warned
            assert any("Token indices sequence length" in m for m in logged) is shown, logged
            assert "rope_scaling" not in r.stderr and "Token indices" not in r.stderr
    finally:
        logging.getLogger("transformers").removeHandler(handler)

"""The streaming quantizer end to end on tiny checkpoints."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from moe_edge.api import load_model
from moe_edge.checkpoint import CheckpointReader
from moe_edge.cli import main
from moe_edge.errors import MoeEdgeError
from moe_edge.quant.format import GPTQTensors, dequantize
from moe_edge.quant.quantizer import QuantizeOptions, plan, quantize
from moe_edge.testing import write_checkpoint

SMALL = QuantizeOptions(group_size=64, calib_samples=8, calib_seq_len=64, min_expert_tokens=16)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("q") / "src", "deepseek", hidden_size=128,
                            intermediate_size=256, moe_intermediate_size=64)


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory):
    return quantize(src, tmp_path_factory.mktemp("out") / "q", SMALL)


def test_output_is_a_standard_gptq_checkpoint(src, quantized):
    out = quantized.out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4 and config["quantization_config"]["group_size"] == 64
    assert config["quantization_config"]["checkpoint_format"] == "gptq"
    assert json.loads((out / "quantize_config.json").read_text())["desc_act"] is True
    for f in ("tokenizer.json", "generation_config.json", "quantization_report.json"):
        assert (out / f).exists(), f
    reader = CheckpointReader(out)
    names = set(reader.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.qweight" in names
    assert "model.layers.1.mlp.shared_experts.up_proj.g_idx" in names
    assert "model.layers.0.self_attn.q_proj.qzeros" in names
    for kept in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert kept in names  # routers, embeddings, lm_head stay 16-bit
    assert not [n for n in names if n.endswith(".weight") and "_proj" in n]
    assert not list(out.parent.glob(".*partial"))


def test_loaded_checkpoint_reproduces_in_memory_quantized_model(quantized):
    """The quantizer's last-layer activations (computed with the quantised weights) equal
    those of the model loaded from the written checkpoint."""
    model = load_model(quantized.out, device="cpu", kernel="dequant")
    captured = []
    model.model.norm.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(quantized.calibration_ids)
    assert torch.allclose(captured[0], quantized.final_hidden, atol=1e-4, rtol=1e-4)


def test_report_names_every_expert(quantized):
    report = json.loads((quantized.out / "quantization_report.json").read_text())
    moe_layers = [l for l in report["layers"] if l["experts"]]
    assert len(moe_layers) == 2
    for layer in moe_layers:
        assert [e["expert"] for e in layer["experts"]] == list(range(8))
        assert sum(e["tokens"] for e in layer["experts"]) == 8 * 64 * 3  # top-3 of every token
        assert all(e["method"] in ("gptq", "gptq-all-tokens") for e in layer["experts"])
    s = report["summary"]
    assert 4.0 < s["bits_per_weight"] < 5.5 and s["median_sqnr_db"] > 15
    assert s["size_after_bytes"] < s["size_before_bytes"] / 3


def test_gptq_beats_rtn_on_the_layer_outputs(src, quantized, tmp_path):
    rtn = quantize(src, tmp_path / "rtn", QuantizeOptions(**{**SMALL.__dict__, "method": "rtn"}))
    err = lambda r: sum(v["rel_error"] for l in r.report["layers"] for v in l["linears"].values())  # noqa: E731
    assert err(quantized) < 0.9 * err(rtn)


def test_starved_experts_fall_back_and_are_not_zero(tmp_path):
    """Router rows of experts 6 and 7 are zero while the others are large: those two almost
    never win the top-2, so their Hessians would be near-empty."""
    src = write_checkpoint(tmp_path / "src", "deepseek", hidden_size=128, intermediate_size=256,
                           moe_intermediate_size=64, num_experts_per_tok=2)
    file = src / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for layer in (1, 2):
        gate = tensors[f"model.layers.{layer}.mlp.gate.weight"]
        gate *= 50
        gate[6:] = 0
    save_file(tensors, str(file))
    result = quantize(src, tmp_path / "q", QuantizeOptions(**{**SMALL.__dict__, "min_expert_tokens": 64}))
    experts = {e["expert"]: e for e in result.report["layers"][1]["experts"]}
    assert experts[6]["tokens"] < 64 and experts[6]["method"] == "gptq-all-tokens"
    assert experts[0]["method"] == "gptq"
    assert any("expert 6" in f for f in result.report["summary"]["fallback_experts"])
    reader = CheckpointReader(result.out)
    p = "model.layers.1.mlp.experts.6.down_proj"
    w = dequantize(GPTQTensors(*(reader.get(f"{p}.{x}") for x in ("qweight", "qzeros", "scales", "g_idx"))))
    original = tensors[f"{p}.weight"]
    assert w.abs().sum() > 0
    assert (w - original).norm() / original.norm() < 0.3


def test_resume_after_interrupt_gives_the_same_output(src, quantized, tmp_path):
    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        quantize(src, tmp_path / "q", SMALL, progress=interrupt)
    assert not (tmp_path / "q").exists() and (tmp_path / ".q.partial").exists()
    resumed = quantize(src, tmp_path / "q", SMALL, resume=True)
    a, b = CheckpointReader(resumed.out), CheckpointReader(quantized.out)
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.keys())


def test_plan_projects_the_size(src, quantized):
    p = plan(src, None, SMALL)
    assert p["out"].endswith("src-gptq-w4g64") and p["layers"] == 3
    actual = quantized.report["summary"]["size_after_bytes"]
    assert abs(p["projected_size_bytes"] - actual) / actual < 0.05


def run_cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_cli_dry_run_and_quantize(src, tmp_path):
    r = run_cli("quantize", src, "--dry-run")
    assert r.exit_code == 0 and "-> about" in r.output and "src-gptq-w4g128" in r.output
    assert not list(src.parent.glob("src-gptq-*"))
    r = run_cli("quantize", src, "-o", tmp_path / "q", "--group-size", "64", "--calib-samples", "4",
                "--calib-seq-len", "32", "--method", "rtn")
    assert r.exit_code == 0, r.output
    assert "bits per quantized weight" in r.output and "next" in r.output
    r = run_cli("quantize", src, "-o", tmp_path / "q", "--method", "rtn")
    assert r.exit_code == 1 and "already exists" in r.output


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / "calib.txt").write_bytes(b"\xff\xfe\x00bad"), "cannot read calibration text"),
    (lambda d: (d / "calib.txt").write_text("   \n"), "calibration text is empty"),
])
def test_cli_bad_calibration(src, tmp_path, setup, message):
    setup(tmp_path)
    r = run_cli("quantize", src, "-o", tmp_path / "q", "--calib", tmp_path / "calib.txt")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_cli_output_is_a_file_and_unsupported_model(src, tmp_path):
    (tmp_path / "f").write_text("x")
    r = run_cli("quantize", src, "-o", tmp_path / "f", "--overwrite")
    assert r.exit_code == 1 and "is a file" in r.output
    bad = shutil.copytree(src, tmp_path / "bad")
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    r = run_cli("quantize", bad)
    assert r.exit_code == 1 and "'bert' is not supported" in r.output


def test_resume_without_partial_is_an_error(src, tmp_path):
    with pytest.raises(MoeEdgeError, match="no interrupted run"):
        quantize(src, tmp_path / "q", SMALL, resume=True)

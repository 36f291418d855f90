"""GPTQ checkpoints written by GPTQModel (what optimum 2.x uses for GPTQ) load in moe-edge and
give the logits of GPTQModel's own CPU inference. Runs when the `interop` extra and gptqmodel
are installed (README: Install; CI installs them); skipped otherwise."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_edge.api import load_model
from moe_edge.testing import byte_tokenizer, hf_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                reason="interop extra (gptqmodel) not installed")
WORKER = Path(__file__).with_name("gptqmodel_worker.py")
SHAPES = {
    "qwen2_moe": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, num_experts=8, num_hidden_layers=2,
                      mlp_only_layers=[], num_key_value_heads=4),
    "mixtral": dict(hidden_size=128, intermediate_size=64, num_local_experts=8, num_hidden_layers=2,
                    num_key_value_heads=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptqmodel_checkpoint_matches_gptqmodel_inference(tmp_path, model_type, desc_act):
    fp, out = tmp_path / "fp", tmp_path / "gptq"
    hf_model(model_type, seed=5, std=0.05, **SHAPES[model_type]).save_pretrained(fp)
    byte_tokenizer().save_pretrained(fp)
    run = subprocess.run([sys.executable, str(WORKER), str(fp), str(out), str(int(desc_act))],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = load_file(str(tmp_path / "reference.safetensors"))
    ours = load_model(out, device="cpu", dtype="float32")
    assert ours.quant_kernels.get("int4-cpu", 0) > 0 and ours.quant_config.desc_act == desc_act
    with torch.no_grad():
        got = ours(reference["ids"])
    ref = reference["logits"]
    rel = ((got - ref).norm() / ref.norm()).item()
    # GPTQModel runs the whole model in bf16; we run fp32 activations, bf16 inside the int4 kernel
    print(f"{model_type} desc_act={desc_act}: relative logit error {rel:.4f}")
    assert rel < 2e-2, rel
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{model_type} desc_act={desc_act}: top-1 agreement {agree:.2f}")
    assert agree >= 0.85, agree  # random tiny models have near-ties; bf16 noise flips a few

"""Run in a subprocess by test_interop_gptqmodel.py: GPTQModel patches transformers' MoE
classes process-wide (defuser), so each model gets a fresh interpreter.

    python gptqmodel_worker.py quantize FP_DIR OUT_DIR DESC_ACT(0|1)
    python gptqmodel_worker.py load OUT_DIR

`quantize` quantizes FP_DIR with GPTQModel on the CPU into OUT_DIR; both then load OUT_DIR
with GPTQModel's torch backend (through transformers) and write the logits for the test
prompt to OUT_DIR/../reference.safetensors.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel 7.7 refuses 2-core machines without it

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

CALIBRATION = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump!",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five",
    "Mixture-of-Experts models route each token to a few experts out of many.",
] * 2
PROMPT = "Hello world, the quick fox"


def quantize(fp: Path, out: Path, desc_act: bool) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(fp))
    model = GPTQModel.load(str(fp), QuantizeConfig(bits=4, group_size=32, desc_act=desc_act, sym=True),
                           device="cpu")
    model.quantize(CALIBRATION, batch_size=1, tokenizer=tok)
    model.save(str(out))


def reference_logits(out: Path) -> None:
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    reference = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        logits = reference.model(input_ids=ids).logits.float()
    save_file({"ids": ids, "logits": logits.contiguous()}, str(out.parent / "reference.safetensors"))


if __name__ == "__main__":
    if sys.argv[1] == "quantize":
        quantize(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1")
        reference_logits(Path(sys.argv[3]))
    else:
        reference_logits(Path(sys.argv[2]))

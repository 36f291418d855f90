"""bench/inflate.py: a zero-padded model at wider sizes computes the source's function
(logits equal up to float rounding) and routes every token to the same experts, for fp and
GPTQ (act-order) checkpoints. The benchmark of a trained model at 16B expert sizes rests on it."""

import importlib.util
from pathlib import Path

import pytest
import torch

from moe_edge.api import load_model
from moe_edge.model.moe import Router
from moe_edge.testing import write_checkpoint, write_gptq_checkpoint

# by path, not with bench/ on sys.path: its scripts' names (kernels, trace) are packages too,
# and transformers imports `kernels` when it finds one
_spec = importlib.util.spec_from_file_location("bench_inflate", Path(__file__).parents[1] / "bench" / "inflate.py")
_inflate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_inflate)
inflate = _inflate.inflate

FORWARD = Router.forward
TARGET = dict(hidden_size=256, head_dim=64, intermediate_size=160, moe_intermediate_size=64)


def logits_and_routes(path, monkeypatch):
    routes = []

    def spy(self, x):
        weights, ids = FORWARD(self, x)
        routes.append(ids)
        return weights, ids
    monkeypatch.setattr(Router, "forward", spy)
    model = load_model(path, device="cpu", dtype="float32", kernel="dequant")
    with torch.no_grad():
        return model(torch.arange(3, 90)[None]), routes


@pytest.mark.parametrize("group", [None, 32, 64])  # 64: the experts' 32 inputs fill half a group
def test_inflated_model_computes_the_same_function(tmp_path, monkeypatch, group):
    src = write_checkpoint(tmp_path / "fp", "deepseek", seed=3, tokenizer=False)
    quantized = group is not None
    if quantized:
        src = write_gptq_checkpoint(src, tmp_path / "gptq", group_size=group, act_order=True)
    dst = inflate(src, tmp_path / "wide", TARGET)
    wide = load_model(dst, device="cpu", dtype="float32", kernel="int4" if quantized else "auto")
    assert wide.config.hidden_size == 256 and wide.config.head_dim == 64
    assert wide.config.moe_intermediate_size == 64
    want, want_routes = logits_and_routes(src, monkeypatch)
    got, got_routes = logits_and_routes(dst, monkeypatch)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert len(got_routes) == len(want_routes) and all(map(torch.equal, got_routes, want_routes))


def test_inflating_refuses_inexact_factors(tmp_path):
    src = write_checkpoint(tmp_path / "fp", "deepseek", tokenizer=False)
    with pytest.raises(ValueError, match="square factor"):
        inflate(src, tmp_path / "x", dict(TARGET, hidden_size=128))  # 2x: norms would need sqrt(2)


def test_repeated_layers_stack_the_moe_layers_with_their_weights(tmp_path):
    """--repeat K: the leading dense layers once, then the MoE layers K times over, each copy
    the same tensors as its source layer; the result loads and runs."""
    from moe_edge.checkpoint import CheckpointReader
    repeat_layers = _inflate.repeat_layers
    src = write_checkpoint(tmp_path / "src", "deepseek", seed=2, first_k_dense_replace=1, num_hidden_layers=3)
    dst = repeat_layers(src, tmp_path / "x3", 3)
    a, b = CheckpointReader(src), CheckpointReader(dst)
    source_of = {0: 0, 1: 1, 2: 2, 3: 1, 4: 2, 5: 1, 6: 2}
    for j, i in source_of.items():
        for name in (n for n in a.keys() if n.startswith(f"model.layers.{i}.")):
            assert torch.equal(b.get(f"model.layers.{j}." + name[len(f"model.layers.{i}."):]), a.get(name))
    assert not any(n.startswith("model.layers.7.") for n in b.keys())
    model = load_model(dst, device="cpu", dtype="float32")
    assert model.config.num_layers == 7 and len(model.moe_blocks()) == 6
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]]))).all()

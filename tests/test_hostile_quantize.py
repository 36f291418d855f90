"""`moe-edge quantize` never loses what the user has: the source is never the output (or
inside it, or around it), and an interrupted run is resumed only from the same source and
never deleted silently."""

import json
import os
import shutil

import pytest
import torch

from moe_edge.checkpoint import CheckpointReader
from moe_edge.errors import CheckpointError, MoeEdgeError
from moe_edge.quant.quantizer import QuantizeOptions, quantize
from moe_edge.testing import write_checkpoint

SMALL = QuantizeOptions(group_size=32, calib_samples=4, calib_seq_len=32, min_expert_tokens=8,
                        method="rtn")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("q") / "src", "deepseek")


@pytest.fixture
def src(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "src", symlinks=True)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("out, how", [
    (lambda s: s, "is the source folder"),
    (lambda s: s.parent, "contains the source folder"),
    (lambda s: s / "q", "lies inside the source folder"),
    (lambda s: s / ".." / "src", "is the source folder"),
    ("link", "is the source folder"),
])
def test_output_overlapping_the_source_is_refused_and_the_source_kept(src, out, how):
    before = snapshot(src)
    if out == "link":
        target = src.parent / "link"
        os.symlink(src, target)
    else:
        target = out(src)
    with pytest.raises(CheckpointError, match=f"the output {how}"):
        quantize(src, target, SMALL, overwrite=True)
    assert snapshot(src) == before


def interrupted(src, out):
    def stop(done, total):
        if done == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        quantize(src, out, SMALL, progress=stop)
    partial = out.with_name(f".{out.name}.partial")
    assert (partial / "writer_manifest.json").exists()
    return partial


def test_rerun_without_resume_never_deletes_the_partial_run(src, tmp_path):
    partial = interrupted(src, tmp_path / "q")
    before = snapshot(partial)
    with pytest.raises(MoeEdgeError, match=r"\.q\.partial: an interrupted run of q is there; run again "
                                           "with --resume to continue it, or delete that folder"):
        quantize(src, tmp_path / "q", SMALL)
    assert snapshot(partial) == before
    done = quantize(src, tmp_path / "q", SMALL, discard_partial=True)  # the library can discard it
    assert CheckpointReader(done.out).keys() and not partial.exists()


@pytest.mark.parametrize("change", [
    lambda s: os.utime(s / "model.safetensors", ns=(1, 1)),
    lambda s: (s / "config.json").write_text(json.dumps(
        {**json.loads((s / "config.json").read_text()), "rms_norm_eps": 1e-5})),
])
def test_resume_from_another_source_is_refused(src, tmp_path, change):
    partial = interrupted(src, tmp_path / "q")
    change(src)
    with pytest.raises(MoeEdgeError, match="interrupted run was made from other source files"):
        quantize(src, tmp_path / "q", SMALL, resume=True)
    assert (partial / "writer_manifest.json").exists()


def test_resume_of_another_checkpoint_is_refused(src, tmp_path):
    interrupted(src, tmp_path / "q")
    other = write_checkpoint(tmp_path / "other", "deepseek", seed=1)
    with pytest.raises(MoeEdgeError, match="made from other source files"):
        quantize(other, tmp_path / "q", SMALL, resume=True)


def test_resume_from_the_same_source_still_matches_an_uninterrupted_run(src, tmp_path):
    interrupted(src, tmp_path / "q")
    resumed = CheckpointReader(quantize(src, tmp_path / "q", SMALL, resume=True).out)
    whole = CheckpointReader(quantize(src, tmp_path / "whole", SMALL).out)
    assert sorted(resumed.keys()) == sorted(whole.keys())
    assert all(torch.equal(resumed.get(n), whole.get(n)) for n in whole.keys())

"""A checkpoint folder is untrusted input: its index may only name files inside it, and
every tensor has exactly one source (transformers' resolution: index, else
model.safetensors, else a single file)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from moe_edge.checkpoint import INDEX_FILE, CheckpointReader
from moe_edge.errors import CheckpointError


def write_index(folder, weight_map):
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    return d


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors",
                                   "..", "x\0y.safetensors"])
def test_index_entry_outside_the_folder_is_refused(folder, entry):
    """A valid safetensors file outside the folder is never opened as the model's weights."""
    outside = folder.parent / "outside.safetensors"
    save_file({"w": torch.ones(2)}, str(outside))
    entry = str(outside) if entry == "ABSOLUTE" else entry
    write_index(folder, {"w": entry})
    with pytest.raises(CheckpointError, match="not a file name in the model folder"):
        CheckpointReader(folder)


def test_index_naming_etc_passwd_is_refused_before_opening(folder, monkeypatch):
    import moe_edge.checkpoint as ckpt
    monkeypatch.setattr(ckpt, "safe_open", lambda *a, **k: pytest.fail("a file was opened"))
    write_index(folder, {"w": "/etc/passwd"})
    with pytest.raises(CheckpointError, match="'/etc/passwd' is not a file name"):
        CheckpointReader(folder)


def test_symlinked_shards_of_the_hub_cache_layout_load(tmp_path):
    """snapshots/<rev>/<shard> -> ../../blobs/<hash>: the index names plain files, fine."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    save_file({"a": torch.arange(3.0)}, str(blobs / "h1"))
    save_file({"b": torch.arange(4.0)}, str(blobs / "h2"))
    os.symlink("../../blobs/h1", snap / "model-00001-of-00002.safetensors")
    os.symlink("../../blobs/h2", snap / "model-00002-of-00002.safetensors")
    write_index(snap, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    reader = CheckpointReader(snap)
    assert torch.equal(reader.get("b"), torch.arange(4.0)) and sorted(reader.keys()) == ["a", "b"]


def test_second_file_repeating_a_tensor_never_replaces_it(folder):
    """Without an index, two files are ambiguous; model.safetensors wins alone, as in transformers."""
    save_file({"w": torch.zeros(2)}, str(folder / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(folder / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"2 \*.safetensors files .* no model.safetensors.index.json"):
        CheckpointReader(folder)
    save_file({"w": torch.full((2,), 7.0)}, str(folder / "model.safetensors"))
    reader = CheckpointReader(folder)
    assert torch.equal(reader.get("w"), torch.full((2,), 7.0))
    assert reader.files() == [folder / "model.safetensors"]


def test_a_single_file_of_another_name_is_read(folder):
    save_file({"w": torch.ones(2)}, str(folder / "consolidated.safetensors"))
    assert CheckpointReader(folder).keys() == ["w"]


def test_tensor_in_two_shards_of_an_index_is_refused(folder):
    save_file({"w": torch.zeros(2), "x": torch.zeros(1)}, str(folder / "s1.safetensors"))
    save_file({"w": torch.ones(2)}, str(folder / "s2.safetensors"))
    write_index(folder, {"w": "s2.safetensors", "x": "s1.safetensors"})
    with pytest.raises(CheckpointError, match="'w' is in both s1.safetensors and s2.safetensors"):
        CheckpointReader(folder)


def test_index_entry_naming_a_tensor_its_shard_lacks(folder):
    save_file({"w": torch.zeros(2)}, str(folder / "s1.safetensors"))
    save_file({"x": torch.ones(2)}, str(folder / "s2.safetensors"))
    write_index(folder, {"w": "s1.safetensors", "x": "s1.safetensors"})
    with pytest.raises(CheckpointError, match=r"index.json: weight_map puts tensor 'x' in s1.safetensors, "
                                              "which has no such tensor"):
        CheckpointReader(folder)


def test_index_and_an_unlisted_single_file_are_ambiguous(folder):
    save_file({"w": torch.zeros(2)}, str(folder / "s1.safetensors"))
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    write_index(folder, {"w": "s1.safetensors"})
    with pytest.raises(CheckpointError, match="both model.safetensors.index.json and model.safetensors"):
        CheckpointReader(folder)


@pytest.mark.parametrize("text, message", [
    ('{"weight_map": {"w": "s1.safetensors", "w": "s2.safetensors"}}', "key 'w' appears twice"),
    ('[1, 2]', "is a JSON list, but a safetensors index must be a JSON object"),
    ('{"weight_map": {"w": 3}}', "weight_map must be an object of tensor name -> shard file name"),
    ('{"weight_map": ', "not valid JSON"),
    (b'{"weight_map": {"\xff": "s"}}', "not valid JSON"),
])
def test_malformed_index_is_one_line_naming_the_file(folder, text, message):
    save_file({"w": torch.zeros(2)}, str(folder / "s1.safetensors"))
    (folder / INDEX_FILE).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=message) as e:
        CheckpointReader(folder)
    assert INDEX_FILE in str(e.value) and "\n" not in str(e.value)

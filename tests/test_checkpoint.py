import json

import pytest
import torch

from moe_edge.checkpoint import INDEX_FILE, CheckpointReader, ShardedWriter
from moe_edge.errors import CheckpointError


def tensors(n=6):
    return {f"t{i}": torch.randn(64, 32) for i in range(n)}


def test_sharded_round_trip_with_index(tmp_path):
    data = tensors()
    with ShardedWriter(tmp_path / "out", max_shard_bytes=3 * 64 * 32 * 4) as w:
        w.add_all(data.items())
        w.write_json("config.json", {"a": 1})
        w.commit()
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(["config.json", INDEX_FILE, "model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors"])
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(data)
    reader = CheckpointReader(tmp_path / "out")
    for name, t in data.items():
        assert torch.equal(reader.get(name), t)
    assert reader.shape("t0") == (64, 32)


def test_corrupt_shard_named_when_the_checkpoint_opens(tmp_path):
    """Every shard's header is read at open (to check the index against the shards), so a
    corrupt shard is named then, not halfway through a load."""
    with ShardedWriter(tmp_path / "out", max_shard_bytes=3 * 64 * 32 * 4) as w:
        w.add_all(tensors().items())
        w.commit()
    (tmp_path / "out" / "model-00002-of-00002.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: unreadable"):
        CheckpointReader(tmp_path / "out")


def test_stacked_slice_read(tmp_path):
    stacked = torch.randn(4, 8, 16)
    with ShardedWriter(tmp_path / "out") as w:
        w.add("experts", stacked)
        w.commit()
    assert torch.equal(CheckpointReader(tmp_path / "out").get_expert("experts", 2), stacked[2])


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path / "out", max_shard_bytes=64 * 32 * 4) as w:
            w.add_all(tensors().items())
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_then_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists"):
        ShardedWriter(tmp_path / "out")
    with ShardedWriter(tmp_path / "out", overwrite=True) as w:
        w.add("x", torch.ones(2))
        w.commit()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_duplicate_tensor_refused(tmp_path):
    with ShardedWriter(tmp_path / "out") as w:
        w.add("x", torch.ones(2))
        with pytest.raises(CheckpointError, match="written twice"):
            w.add("x", torch.ones(2))


def test_missing_shard_named(tmp_path):
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*missing"):
        CheckpointReader(tmp_path)


def test_resumable_writer_continues_after_failure(tmp_path):
    data = tensors(4)
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path / "out", resumable=True) as w:
            w.add("t0", data["t0"])
            w.checkpoint({"layer": 0})
            w.add("t1", data["t1"])  # not checkpointed: lost
            raise RuntimeError("killed")
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
    with ShardedWriter(tmp_path / "out", resumable=True) as w:
        assert w.resumed_state == {"layer": 0}
        for name in ("t1", "t2", "t3"):
            w.add(name, data[name])
        w.commit()
    reader = CheckpointReader(tmp_path / "out")
    assert sorted(reader.keys()) == ["t0", "t1", "t2", "t3"]
    assert all(torch.equal(reader.get(n), data[n]) for n in data)
    assert not (tmp_path / ".out.partial").exists()
    assert not (tmp_path / "out" / "writer_manifest.json").exists()


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        ShardedWriter(tmp_path / "f", overwrite=True)

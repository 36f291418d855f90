"""The expert store is verified: a CRC-32 per expert record checked on its first read, a
build under an exclusive lock into a temporary file, a rebuild (with a notice) of a store
that is damaged, truncated or of an older version, and nothing left behind by a full disk."""

import errno
import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from moe_edge.api import load_offloaded
from moe_edge.checkpoint import CheckpointReader
from moe_edge.config import load_config
from moe_edge.errors import StoreError
from moe_edge.model.weights import WeightMap
from moe_edge.offload import build
from moe_edge.offload import store as store_mod
from moe_edge.offload.build import build_store
from moe_edge.testing import write_checkpoint, write_gptq_checkpoint

PROMPT = "verified"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    src = write_checkpoint(root / "fp", "deepseek", hidden_size=64, moe_intermediate_size=32)
    return write_gptq_checkpoint(src, root / "q", group_size=32)


def run(model, folder, **kw):
    lm = load_offloaded(model, device="cpu", expert_cache=3, slow_tier="disk", offload_dir=folder,
                        prefetch_depth=0, **kw)
    try:
        return lm.generate(PROMPT, temperature=0, max_new_tokens=8).token_ids
    finally:
        lm.offload.close()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    return run(model, tmp_path_factory.mktemp("ref-store"))


def store_folder(root):
    (folder,) = [p.parent for p in root.glob("*/experts.bin")]
    return folder


def test_flipped_bytes_are_caught_and_the_store_is_rebuilt(model, reference, tmp_path, caplog):
    run(model, tmp_path)
    folder = store_folder(tmp_path)
    raw = json.loads((folder / "layouts.json").read_text())
    with open(folder / "experts.bin", "r+b") as f:  # one byte in every record
        for i in range(raw["count"]):
            f.seek(i * raw["stride"] + 100)
            byte = f.read(1)
            f.seek(i * raw["stride"] + 100)
            f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreError, match=r"experts.bin: expert record \d+ fails its checksum"):
        run(model, tmp_path)
    assert not (folder / "layouts.json").exists()  # marked stale
    with caplog.at_level(logging.WARNING, logger="moe_edge.offload.build"):
        assert run(model, tmp_path) == reference
    assert "rebuilding" in caplog.text


@pytest.mark.parametrize("damage, notice", [
    (lambda f: os.truncate(f / "experts.bin", os.path.getsize(f / "experts.bin") // 2), "truncated"),
    (lambda f: (f / "layouts.json").write_text("{"), "unreadable"),
    (lambda f: (f / "layouts.json").write_text(json.dumps(
        {**json.loads((f / "layouts.json").read_text()), "version": 3})), "format version 3"),
    (lambda f: (f / "layouts.json").unlink(), "incomplete"),
])
def test_damaged_truncated_or_old_store_is_rebuilt_with_a_notice(model, reference, tmp_path, caplog,
                                                                 damage, notice):
    run(model, tmp_path)
    damage(store_folder(tmp_path))
    with caplog.at_level(logging.WARNING, logger="moe_edge.offload.build"):
        assert run(model, tmp_path) == reference
    assert notice in caplog.text and "rebuilding it" in caplog.text
    assert sorted(p.name for p in store_folder(tmp_path).iterdir()) == [".lock", "experts.bin", "layouts.json"]


def build_args(model):
    config = load_config(model)
    from moe_edge.quant.format import read_quant_config
    return (WeightMap(CheckpointReader(model), config), config, read_quant_config(model),
            torch.device("cpu"), torch.float32, "auto", "disk")


def test_concurrent_builds_convert_once_and_agree(model, tmp_path, monkeypatch):
    """Two builders at once: the second waits on the lock, then opens the first's store."""
    converted, real = [], build.expert_module
    monkeypatch.setattr(build, "expert_module", lambda *a, **k: converted.append(a[3:5]) or real(*a, **k))
    results, errors = [], []

    def one():
        try:
            store, layouts, _ = build_store(*build_args(model), offload_dir=tmp_path)
            data = [bytearray(store.stride) for _ in range(store.count)]
            for i, d in enumerate(data):
                store.read_into(i, torch.frombuffer(d, dtype=torch.uint8))
            results.append(data)
            store.close()
        except BaseException as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    config = load_config(model)
    assert len(converted) == len(config.moe_layer_ids) * config.num_experts  # converted once
    assert not list(store_folder(tmp_path).glob("experts.bin.tmp-*"))


def test_a_held_lock_makes_the_build_wait(model, tmp_path, caplog):
    import fcntl
    folder = tmp_path / build.fingerprint(CheckpointReader(model), torch.device("cpu"), torch.float32, "auto")
    folder.mkdir()
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()
    with caplog.at_level(logging.INFO, logger="moe_edge.offload.build"):
        t = threading.Thread(target=lambda: (build_store(*build_args(model), offload_dir=tmp_path)[0].close(),
                                             done.set()))
        t.start()
        assert not done.wait(1.0)  # blocked on the lock
        os.close(fd)
        t.join()
    assert done.is_set() and "waiting for another process" in caplog.text


@pytest.mark.parametrize("where", ["pwrite", "posix_fallocate"])
def test_full_disk_leaves_no_partial_file_and_names_the_path(model, tmp_path, monkeypatch, where):
    calls = []
    real = getattr(os, where)

    def full(*a):
        calls.append(1)
        if len(calls) > 1 or where == "posix_fallocate":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a)
    monkeypatch.setattr(os, where, full)
    with pytest.raises(StoreError, match=r"experts.bin.tmp-\w+: cannot write the expert store "
                                         r"\(No space left on device\); it needs .* GiB") as e:
        run(model, tmp_path)
    assert "partial file was removed" in str(e.value)
    monkeypatch.undo()
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]
    assert leftovers == []


# --- reads around the page cache --------------------------------------------------------------
def records_file(tmp_path, stride=2 * store_mod.PAGE, count=5):
    """A DiskStore of `count` distinct records, written and reopened as a load opens it."""
    records = [torch.randint(0, 256, (stride,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
               for i in range(count)]
    writer = store_mod.DiskStore(tmp_path / "experts.bin", stride, count)
    for i, r in enumerate(records):
        writer.write(i, r)
    writer.finish_writing()
    checksums = writer.checksums
    writer.close()
    return store_mod.DiskStore(tmp_path / "experts.bin", stride, count, create=False, checksums=checksums), records


def test_slot_buffers_are_page_aligned_and_disjoint():
    bufs = store_mod.slot_buffers(3 * store_mod.PAGE, 7, torch.device("cpu"))
    assert len(bufs) == 7 and all(b.numel() == 3 * store_mod.PAGE for b in bufs)
    assert all(b.data_ptr() % store_mod.PAGE == 0 for b in bufs)
    starts = sorted(b.data_ptr() for b in bufs)
    assert all(b - a == 3 * store_mod.PAGE for a, b in zip(starts, starts[1:]))


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                    reason="no transparent huge pages")
def test_the_slot_pool_is_advised_huge_pages():
    """Direct reads pin their destination page by page: the slots ask for 2 MiB pages
    (MADV_HUGEPAGE, VmFlags `hg`), also where the system leaves them to madvise."""
    bufs = store_mod.slot_buffers(1024 * store_mod.PAGE, 3, torch.device("cpu"))
    assert "hg" in vm_flags(bufs[1].data_ptr())


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                    reason="no transparent huge pages")
def test_a_slot_given_up_leaves_the_huge_pages():
    """A slot given back to the OS (KVRoom) is marked no-huge-pages first (VmFlags `nh`), so
    khugepaged cannot refill it with zeros while its neighbours stay on huge pages."""
    from moe_edge.memory import release_pages
    bufs = store_mod.slot_buffers(1024 * store_mod.PAGE, 3, torch.device("cpu"))
    for b in bufs:
        b.fill_(1)
    assert release_pages(bufs[1])
    assert "nh" in vm_flags(bufs[1].data_ptr()) and "hg" in vm_flags(bufs[0].data_ptr() + bufs[0].numel() // 2)
    assert int(bufs[1].sum()) == 0  # the pages went back: they read as zeros


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                    reason="no transparent huge pages")
def test_dense_weights_move_onto_huge_pages_keeping_their_values_and_ties():
    """onto_huge_pages copies weights that own their memory into one mapping advised for huge
    pages (VmFlags `hg`); embeddings, small weights and views into a shared allocation stay
    where they are, and a weight two modules share stays one tensor."""
    from torch import nn
    from moe_edge.memory import onto_huge_pages
    model = nn.ModuleDict({"a": nn.Linear(1024, 1024), "b": nn.Linear(1024, 1024, bias=False),
                           "emb": nn.Embedding(1024, 1024)})
    model["b"].weight = model["a"].weight  # tied
    pool = torch.randn(2, 1024, 1024)
    model["a"].register_buffer("view", pool[1])  # a view into a larger allocation
    before = {n: (t.data_ptr(), t.clone()) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    moved = onto_huge_pages(model)
    assert moved == 1024 * 1024 * 4  # the shared weight, once
    w = model["a"].weight
    assert isinstance(w, nn.Parameter) and model["b"].weight is w and "hg" in vm_flags(w.data_ptr())
    after = dict([*model.named_parameters(), *model.named_buffers()])
    for name, (ptr, value) in before.items():
        assert torch.equal(after[name], value)
        assert (after[name].data_ptr() == ptr) == (name != "a.weight"), name  # bias: small; emb; view


def vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_aligned_reads_go_direct_and_unaligned_ones_through_the_cache(tmp_path, monkeypatch):
    store, records = records_file(tmp_path)
    if not store.direct:
        pytest.skip(f"{tmp_path}: this filesystem refuses O_DIRECT")
    used = []
    real = os.preadv
    monkeypatch.setattr(store_mod.os, "preadv", lambda fd, bufs, off: used.append(fd) or real(fd, bufs, off))
    (slot,) = store_mod.slot_buffers(store.stride, 1, torch.device("cpu"))
    store.read_into(3, slot)
    assert torch.equal(slot, records[3]) and set(used) == {store.direct_fd}
    used.clear()
    unaligned = torch.empty(store.stride + 1, dtype=torch.uint8)[1:]  # allocations are 64-byte aligned
    assert unaligned.data_ptr() % store_mod.PAGE
    store.read_into(1, unaligned)
    assert torch.equal(unaligned, records[1]) and set(used) == {store.fd}
    store.close()


def test_a_device_that_refuses_direct_reads_falls_back_for_good(tmp_path, monkeypatch):
    store, records = records_file(tmp_path)
    if not store.direct:
        pytest.skip(f"{tmp_path}: this filesystem refuses O_DIRECT")
    real = os.preadv

    def preadv(fd, bufs, off):
        if fd == store.direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off)
    monkeypatch.setattr(store_mod.os, "preadv", preadv)
    (slot,) = store_mod.slot_buffers(store.stride, 1, torch.device("cpu"))
    for i in (4, 0):
        store.read_into(i, slot)
        assert torch.equal(slot, records[i])
    assert not store.direct
    store.close()


def test_a_store_reads_direct_from_the_run_that_built_it(tmp_path):
    stride = store_mod.PAGE
    writer = store_mod.DiskStore(tmp_path / "experts.bin", stride, 2)
    if store_mod.open_direct(writer.path) is None:
        pytest.skip(f"{tmp_path}: this filesystem refuses O_DIRECT")
    record = torch.arange(stride, dtype=torch.int32).to(torch.uint8)
    writer.write(1, record)
    writer.finish_writing()
    (slot,) = store_mod.slot_buffers(stride, 1, torch.device("cpu"))
    assert writer.direct
    writer.read_into(1, slot)
    assert torch.equal(slot, record)
    writer.close()


def test_a_file_truncated_off_the_block_grid_is_a_short_read_not_a_fallback(tmp_path):
    store, _ = records_file(tmp_path)
    if not store.direct:
        pytest.skip(f"{tmp_path}: this filesystem refuses O_DIRECT")
    os.truncate(store.path, 4 * store.stride + 1000)  # record 4 ends mid-block
    (slot,) = store_mod.slot_buffers(store.stride, 1, torch.device("cpu"))
    with pytest.raises(StoreError, match="short read"):
        store.read_into(4, slot)
    assert store.direct  # the device did not refuse direct reads: the file ended
    store.close()


# --- resident loads read the store too --------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True])
def test_a_resident_load_reads_its_experts_from_the_store_bitwise(tmp_path, monkeypatch, caplog, act_order):
    """The first resident load of a GPTQ checkpoint writes the store, later ones read it and
    convert no expert; logits are the same bits as converting in place; where no store can
    be written the experts are converted in memory, with a notice."""
    from moe_edge.api import load_model
    src = write_checkpoint(tmp_path / "fp", "deepseek", hidden_size=128, moe_intermediate_size=64)
    q = write_gptq_checkpoint(src, tmp_path / "q", group_size=64, act_order=act_order)
    monkeypatch.setenv("MOE_EDGE_CACHE", str(tmp_path / "cache"))
    ids = torch.tensor([[3, 9, 27, 81, 243, 7, 21, 63]])
    with torch.no_grad():
        converted = load_model(q, device="cpu", store_experts=False)(ids)
        first = load_model(q, device="cpu")  # converts each expert once and writes the store
        assert torch.equal(first(ids), converted)
        assert len(list((tmp_path / "cache").glob("*/experts.bin"))) == 1
        monkeypatch.setattr(build, "expert_module", lambda *a, **k: pytest.fail("converted an expert again"))
        again = load_model(q, device="cpu")
        assert torch.equal(again(ids), converted)
        experts = again.model.layers[1].mlp.experts
        assert type(experts).__name__ == "QuantResidentExperts"  # the resident decode path, as before
        monkeypatch.undo()
        blocked = tmp_path / "not-a-folder"
        blocked.write_text("")
        monkeypatch.setenv("MOE_EDGE_CACHE", str(blocked))
        with caplog.at_level(logging.WARNING, logger="moe_edge.offload.build"):
            fallback = load_model(q, device="cpu")
        assert torch.equal(fallback(ids), converted)
        assert "converting the experts in memory instead" in caplog.text
        monkeypatch.setenv("MOE_EDGE_CACHE", str(tmp_path / "cache"))
        (folder,) = [p.parent for p in (tmp_path / "cache").glob("*/experts.bin")]
        with open(folder / "experts.bin", "r+b") as f:  # a flipped byte in the last record
            f.seek(-100, os.SEEK_END)
            byte = f.read(1)
            f.seek(-100, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moe_edge.offload.build"):
            damaged = load_model(q, device="cpu")
        assert torch.equal(damaged(ids), converted) and "fails its checksum" in caplog.text
        assert not (folder / "layouts.json").exists()  # marked stale
        assert torch.equal(load_model(q, device="cpu")(ids), converted)
        assert (folder / "layouts.json").exists()  # rebuilt by the next load

"""Filling the slow tier from a checkpoint: each routed expert converted once to its kernel
layout (on the fast device, since CUDA's int4 layout is made there) and written to the store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not on Windows: builds there are not locked
    fcntl = None

from ..checkpoint import CheckpointReader, stat_signature
from ..config import ModelConfig
from ..errors import CheckpointError, StoreError
from ..memory import trim_heap
from ..model import layers
from ..model.layers import MLP, keep_bf16
from ..model.weights import WeightMap, load_weights
from ..quant.format import QuantConfig
from ..quant.load import read_gptq
from ..quant.qlinear import QuantLinear, use_quant_mlps
from .store import (PAGE, PROJECTIONS, DiskStore, Entry, ExpertLayout, RamStore, expert_from_buffer, pack_expert,
                    slot_buffers)

STORE_VERSION = 4  # bump when the on-disk expert layout changes (2: bf16 "dense16"; 3: fused gate_up;
#                   4: a CRC-32 per expert record)
STORE_FILE, LAYOUTS_FILE = "experts.bin", "layouts.json"  # layouts.json is written last: complete
log = logging.getLogger(__name__)


def expert_module(weights: WeightMap, config: ModelConfig, quant: QuantConfig | None, layer: int,
                  expert: int, device: torch.device, dtype: torch.dtype, kernel: str,
                  keep16: bool = False) -> MLP:
    """One routed expert, resident on `device`, in the kernels' layout; with `keep16` its
    bf16 weights stay bf16, as `api.load_model` keeps a resident expert's."""
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    with torch.device("meta"):
        module = MLP(config.hidden_size, config.moe_intermediate_size)
    for proj in PROJECTIONS:
        name = f"{prefix}.{proj}"
        if quant is not None and f"{name}.qweight" in weights:
            tensors = read_gptq(weights, name, quant, getattr(module, proj))
            setattr(module, proj, QuantLinear.from_gptq(tensors, quant.v2, device, dtype, kernel))
    # the 16-bit projections (a QuantLinear has no parameters, so it is skipped)
    load_weights(module, weights, device=device, dtype=dtype, prefix=prefix + ".", keep16=keep16)
    if keep16:
        keep_bf16(module, dtype)
    use_quant_mlps(module)  # as api._finish does for resident experts: fused where exact
    return module


def store_root(offload_dir: str | Path | None = None) -> Path:
    """Where disk stores live: `offload_dir`, else $MOE_EDGE_CACHE, else ~/.cache/moe-edge/experts."""
    return Path(offload_dir or os.environ.get("MOE_EDGE_CACHE") or Path.home() / ".cache" / "moe-edge" / "experts")


def build_store(weights: WeightMap, config: ModelConfig, quant: QuantConfig | None,
                device: torch.device, dtype: torch.dtype, kernel: str, slow_tier: str,
                offload_dir: str | Path | None = None, keep16: bool = False):
    """-> (store, layouts {(layer, expert): layout}, index_of).

    A disk store is a cache: it lives in `offload_dir` (default $MOE_EDGE_CACHE or
    ~/.cache/moe-edge/experts) under a fingerprint of the checkpoint files and the kernel
    settings, and a later load with the same fingerprint reuses it instead of converting
    every expert again (minutes for a 16B model). It is opened and built under an exclusive
    lock (a second process waits, then reuses it), written to a temporary file renamed into
    place, and rebuilt, with a notice, when it is damaged, truncated or of an older version.
    """
    moe_ids = config.moe_layer_ids
    index_of = lambda layer, expert: moe_ids.index(layer) * config.num_experts + expert  # noqa: E731
    convert = lambda folder: _convert(weights, config, quant, device, dtype, kernel, slow_tier,  # noqa: E731
                                      folder, index_of, keep16)
    if slow_tier != "disk":
        return (*convert(None), index_of)
    folder = store_root(offload_dir) / fingerprint(weights.reader, device, dtype, kernel, keep16)
    with _locked(folder):
        cached = _open_cached(folder)
        return (*(cached or convert(folder)), index_of)


def resident_experts(weights: WeightMap, config: ModelConfig, quant: QuantConfig | None,
                     device: torch.device, dtype: torch.dtype, kernel: str, keep16: bool = False,
                     offload_dir: str | Path | None = None) -> dict[tuple[int, int], MLP] | None:
    """Every routed expert in its kernel layout, read into memory from the disk store: the
    first load of a checkpoint converts and writes it, later ones only read it (a resident
    load then converts the dense part alone). Views into one allocation; the same modules
    and bits as converting in place (`expert_module`). None where no store can be written
    (a full disk, a read-only cache) or a record fails its checksum (the store is marked
    stale and rebuilt by the next load): the caller converts in memory, as without a store."""
    try:
        store, layouts, index_of = build_store(weights, config, quant, device, dtype, kernel, "disk",
                                               offload_dir, keep16)
    except StoreError as e:
        log.warning("%s; converting the experts in memory instead", e)
        return None
    try:
        bufs = slot_buffers(store.stride, store.count, device)
        with ThreadPoolExecutor(4) as pool:  # reads in flight; each record's checksum off the GIL
            list(pool.map(lambda i: store.read_into(i, bufs[i]), range(store.count)))
    except StoreError as e:  # a record that fails its checksum: marked stale, rebuilt next load
        log.warning("%s; converting the experts in memory instead", e)
        return None
    finally:
        store.close()
    return {key: expert_from_buffer(layout, bufs[index_of(*key)], config.hidden_size, config.moe_intermediate_size)
            for key, layout in layouts.items()}


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive flock on `folder/.lock` while the store is checked, built or opened."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StoreError(f"{folder}: cannot create the expert store folder ({e.strerror}); choose "
                         "another folder (offload_dir or $MOE_EDGE_CACHE)") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process that is building the expert store %s", folder)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _convert(weights, config, quant, device, dtype, kernel, slow_tier, folder, index_of, keep16):
    """Every routed expert to its kernel layout, written to a new store."""
    moe_ids, E = config.moe_layer_ids, config.num_experts
    module = lambda l, e: expert_module(weights, config, quant, l, e, device, dtype, kernel, keep16)  # noqa: E731
    first_layout, first = pack_expert(module(moe_ids[0], 0))
    slack = 3 * 8 * max(config.hidden_size, config.moe_intermediate_size) if quant and quant.desc_act else 0
    stride = -(-(first.numel() + slack) // PAGE) * PAGE  # room for an act-order permutation
    count = len(moe_ids) * E
    store = _new_disk_store(folder, stride, count) if folder else RamStore(stride, count, pin=device.type == "cuda")
    layouts: dict[tuple[int, int], ExpertLayout] = {}
    try:
        for layer in moe_ids:
            for e in range(E):
                layout, buf = (first_layout, first) if (layer, e) == (moe_ids[0], 0) else pack_expert(module(layer, e))
                if buf.numel() > stride:
                    raise CheckpointError(f"expert {e} of layer {layer} needs {buf.numel()} bytes, more "
                                          f"than the {stride} of the first expert; experts of one model "
                                          "must have the same shapes")
                store.write(index_of(layer, e), buf)
                layouts[(layer, e)] = layout
            weights.reader.release()  # unmap what this layer's experts touched
            trim_heap()  # and give back the conversion temporaries
        if folder is not None:
            store.finish_writing()
            store.rename(folder / STORE_FILE)
            _save_layouts(folder, stride, count, layouts, store.checksums)  # last: marks it complete
    except BaseException as e:
        if folder is not None:
            _discard(store)
            if isinstance(e, OSError):
                raise _write_error(store.path, stride * count, e) from None
        raise
    return store, layouts


def _new_disk_store(folder: Path, stride: int, count: int) -> DiskStore:
    for stale in folder.glob(STORE_FILE + ".tmp-*"):  # left by a killed build (we hold the lock)
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=STORE_FILE + ".tmp-", dir=folder)
    os.close(fd)
    try:
        return DiskStore(tmp, stride, count, marker=folder / LAYOUTS_FILE)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(Path(tmp), stride * count, e) from None


def _discard(store: DiskStore) -> None:
    os.close(store.fd)
    if store.path.name != STORE_FILE:
        store.path.unlink(missing_ok=True)


def _write_error(path: Path, size: int, e: OSError) -> StoreError:
    return StoreError(f"{path}: cannot write the expert store ({e.strerror or e}); it needs "
                      f"{size / 2**30:.2f} GiB - free space there or choose another folder "
                      "(offload_dir or $MOE_EDGE_CACHE); the partial file was removed")


def fingerprint(reader: CheckpointReader, device: torch.device, dtype: torch.dtype, kernel: str,
                keep16: bool = False) -> str:
    """Changes when the checkpoint files or the conversion settings change."""
    bf16 = keep16 and layers.BF16_MIN_LINEAR  # which weights stay bf16
    model = Path(reader.folder)
    h = hashlib.sha256(f"{STORE_VERSION}|{model.resolve()}|{device.type}|{dtype}|{kernel}|{bf16}".encode())
    h.update(stat_signature(reader.files() + [model / "config.json"]).encode())
    return h.hexdigest()[:20]


def _save_layouts(folder: Path, stride: int, count: int, layouts: dict, checksums: list[int]) -> None:
    items = [[l, e, [[x.name, str(x.dtype).removeprefix("torch."), list(x.shape), x.offset] for x in lay.entries],
              [list(spec) for spec in lay.specs], lay.nbytes, list(lay.projections)]
             for (l, e), lay in sorted(layouts.items())]
    tmp = folder / (LAYOUTS_FILE + ".tmp")
    tmp.write_text(json.dumps({"version": STORE_VERSION, "stride": stride, "count": count,
                               "checksums": checksums, "experts": items}))
    os.replace(tmp, folder / LAYOUTS_FILE)


def _open_cached(folder: Path):
    """(store, layouts) of a complete store in `folder`, else None (with a notice when one
    was there but damaged, truncated or of another version: it is rebuilt)."""
    layouts_file, store_file = folder / LAYOUTS_FILE, folder / STORE_FILE
    if not layouts_file.exists():
        if store_file.exists():
            log.warning("expert store %s is incomplete (no %s); rebuilding it", folder, LAYOUTS_FILE)
        return None
    try:
        raw = json.loads(layouts_file.read_text())
        problem = _store_problem(raw, store_file)
        if problem is None:
            layouts = {(l, e): ExpertLayout(tuple(Entry(n, getattr(torch, d), tuple(s), o) for n, d, s, o in entries),
                                            tuple(tuple(spec) for spec in specs), nbytes, tuple(projections))
                       for l, e, entries, specs, nbytes, projections in raw["experts"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"{LAYOUTS_FILE} is unreadable ({type(e).__name__})"
    if problem is not None:
        log.warning("expert store %s: %s; rebuilding it", folder, problem)
        layouts_file.unlink(missing_ok=True)
        return None
    store = DiskStore(store_file, raw["stride"], raw["count"], create=False,
                      checksums=raw["checksums"], marker=layouts_file)
    return store, layouts


def _store_problem(raw: dict, store_file: Path) -> str | None:
    if raw.get("version") != STORE_VERSION:
        return f"format version {raw.get('version')!r}, this moe-edge writes {STORE_VERSION}"
    if not store_file.exists():
        return f"{STORE_FILE} is missing"
    size, expected = store_file.stat().st_size, raw["stride"] * raw["count"]
    if size != expected:
        return f"{STORE_FILE} is {size} bytes, {LAYOUTS_FILE} says {expected} (truncated?)"
    if len(raw["checksums"]) != raw["count"] or len(raw["experts"]) != raw["count"]:
        return f"{LAYOUTS_FILE} lists {len(raw['experts'])} experts for {raw['count']} records"
    return None

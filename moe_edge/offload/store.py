"""The slow tier: every routed expert, already in its kernel's layout, one contiguous buffer each.

An expert is three projections (gate, up, down); each is a QuantLinear's kernel buffers or a
16-bit weight. `pack_expert` lays them out in one byte buffer (the same stride for every
expert of a layer), `expert_from_buffer` rebuilds the callable from views into a slot's
buffer, so a load is one copy and nothing is converted on the decode path.

Stores: `RamStore` (host memory, pinned when the fast device is a GPU) and `DiskStore` (a
file read with positioned reads around the OS page cache, so it cannot quietly hold the
experts the budget leaves out).
"""

from __future__ import annotations

import errno
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import StoreError
from ..memory import huge_page_pool
from ..model.layers import MLP, Linear16
from ..quant.qlinear import QuantLinear, QuantMLP, use_quant_mlps

ALIGN = 64  # every tensor starts 64-byte aligned inside an expert buffer
PAGE = 4096  # expert strides are page multiples (positioned reads of whole pages)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
FUSED = ("gate_up", "down_proj")  # a QuantMLP with gate and up in one int4 matmul


@dataclass(frozen=True)
class Entry:
    name: str  # e.g. "gate_proj.packed" or "down_proj.weight"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class ExpertLayout:
    """Where each tensor of one expert sits in its buffer, and how to rebuild the projections."""

    entries: tuple[Entry, ...]
    specs: tuple[tuple, ...]  # per projection: ("dense",), ("dense16",) or ("quant", in, out, kernel, group, reason)
    nbytes: int
    projections: tuple[str, ...] = PROJECTIONS  # or ("gate_up", "down_proj"): gate and up fused


def _projections(expert: MLP) -> tuple[str, ...]:
    return FUSED if "gate_up" in expert._modules else PROJECTIONS


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _tensors_of(proj: nn.Module) -> tuple[tuple, dict[str, torch.Tensor]]:
    if isinstance(proj, QuantLinear):
        spec = ("quant", proj.in_features, proj.out_features, proj.kernel, proj.group, proj.reason)
        return spec, {n: b for n, b in proj.named_buffers() if b is not None}
    kind = "dense16" if isinstance(proj, Linear16) else "dense"  # bf16 weight, fp32 activations
    return (kind,), {"weight": proj.weight.detach()}


def pack_expert(expert: MLP) -> tuple[ExpertLayout, torch.Tensor]:
    """One expert's tensors in one uint8 buffer (CPU) and the layout to read them back."""
    entries, specs, chunks, offset = [], [], [], 0
    projections = _projections(expert)
    for proj_name in projections:
        spec, tensors = _tensors_of(getattr(expert, proj_name))
        specs.append(spec)
        for name, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            entries.append(Entry(f"{proj_name}.{name}", t.dtype, tuple(t.shape), offset))
            chunks.append((offset, t))
            offset = _align(offset + t.numel() * t.element_size(), ALIGN)
    buf = torch.zeros(_align(offset, PAGE), dtype=torch.uint8)
    for off, t in chunks:
        buf[off:off + t.numel() * t.element_size()] = t.view(-1).view(torch.uint8)
    return ExpertLayout(tuple(entries), tuple(specs), offset, projections), buf


def expert_from_buffer(layout: ExpertLayout, buf: torch.Tensor, hidden: int, width: int) -> MLP:
    """An MLP (a QuantMLP for int4 experts) whose projections are views into `buf` (a slot):
    no copies, no allocations of weight memory."""
    views = {e.name: buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in layout.entries}
    with torch.device("meta"):
        expert = MLP(hidden, width)
    if layout.projections == FUSED:
        del expert.gate_proj, expert.up_proj
    for proj_name, spec in zip(layout.projections, layout.specs):
        mine = {k.split(".", 1)[1]: v for k, v in views.items() if k.startswith(proj_name + ".")}
        if spec[0] in ("dense", "dense16"):
            proj = (Linear16 if spec[0] == "dense16" else nn.Linear)(1, 1, bias=False, device="meta")
            proj.weight = nn.Parameter(mine["weight"], requires_grad=False)
            proj.in_features, proj.out_features = mine["weight"].shape[1], mine["weight"].shape[0]
        else:
            _, fan_in, fan_out, kernel, group, reason = spec
            proj = QuantLinear(fan_in, fan_out, kernel, reason)
            proj.group = group
            for name, view in mine.items():
                proj.register_buffer(name, view)
        setattr(expert, proj_name, proj)
    if layout.projections == FUSED:
        expert.__class__ = QuantMLP  # fused in the store already, as the resident experts are
    else:  # views into the slot cannot be fused; bitwise the same output either way
        use_quant_mlps(expert, fuse=False)
    return expert


def slot_buffers(stride: int, count: int, device: torch.device) -> list[torch.Tensor]:
    """`count` uint8 buffers of `stride` bytes carved from one allocation, each starting on a
    page boundary (a PAGE-multiple stride keeps them so): what a direct read lands in."""
    if device.type == "cpu":  # huge pages: fewer pages for each read to pin (memory.huge_pages)
        pool = huge_page_pool(stride * count)
    else:
        pool = torch.empty(stride * count + PAGE, dtype=torch.uint8, device=device)
        pool = pool[-pool.data_ptr() % PAGE:]
    return [pool[i * stride:(i + 1) * stride] for i in range(count)]


class RamStore:
    """All experts in one host buffer; `pin` for fast, asynchronous copies to a GPU."""

    kind = "ram"

    def __init__(self, stride: int, count: int, pin: bool = False):
        self.stride, self.count = stride, count
        self.data = torch.empty(stride * count, dtype=torch.uint8, pin_memory=pin)

    def write(self, index: int, buf: torch.Tensor) -> None:
        self.data[index * self.stride:index * self.stride + buf.numel()] = buf

    def read_into(self, index: int, dst: torch.Tensor, non_blocking: bool = False) -> None:
        dst.copy_(self.data[index * self.stride:(index + 1) * self.stride], non_blocking=non_blocking)

    def nbytes(self) -> int:
        return self.data.numel()


class DiskStore:
    """All experts in one file; a load is one positioned read into the slot's buffer.

    Reads into page-aligned buffers (`slot_buffers`) go around the page cache (O_DIRECT):
    the disk writes straight into the slot. A read through the cache costs a copy and the
    kernel's page bookkeeping, and on a 2-core machine that CPU time comes out of decode
    (docs/offload.md: 13 against 15 tok/s on the 16B-sized demo x3 at 35 of 64 slots, 4
    reads in flight). Elsewhere (a filesystem without O_DIRECT, such as tmpfs; an unaligned
    buffer) a read goes through the cache and its pages are dropped after it.

    Each record (one expert, `stride` bytes) has a CRC-32 taken when it was written; the
    first read of a record in this process checks it (zlib.crc32 runs at ~3.8 GB/s here:
    ~1.2 ms for a 4.5 MB expert, once). A mismatch removes `marker` (the file that marks the
    store complete), so the next load rebuilds the store, and raises StoreError.
    """

    kind = "disk"

    def __init__(self, path: str | Path, stride: int, count: int, create: bool = True,
                 checksums: list[int] | None = None, marker: Path | None = None):
        self.path, self.stride, self.count = Path(path), stride, count
        self.checksums = [0] * count if create else checksums
        self.marker = marker
        self._verified = bytearray(count)  # records whose checksum this process has checked
        if create:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            _allocate(self.fd, stride * count)
        else:
            self.fd = os.open(self.path, os.O_RDONLY)
        self.direct_fd = None if create else open_direct(self.path)
        self.direct = self.direct_fd is not None  # cleared if the device refuses our alignment
        if hasattr(os, "posix_fadvise"):
            # no readahead: it would pull neighbouring experts into the page cache, memory
            # the budget does not count (measured: half the small model's loads came from it)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def rename(self, path: Path) -> None:
        os.replace(self.path, path)
        self.path = path

    def write(self, index: int, buf: torch.Tensor) -> None:
        record = buf.numpy().tobytes().ljust(self.stride, b"\0")  # the padding is checksummed too
        self.checksums[index] = zlib.crc32(record)
        done = 0
        while done < len(record):  # pwrite may write short counts
            done += os.pwrite(self.fd, memoryview(record)[done:], index * self.stride + done)

    def finish_writing(self) -> None:
        os.fsync(self.fd)
        self.drop_cache()
        self.direct_fd = open_direct(self.path)  # the build's own run reads direct too
        self.direct = self.direct_fd is not None

    def drop_cache(self, offset: int = 0, length: int = 0) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def read_into(self, index: int, dst: torch.Tensor, non_blocking: bool = False) -> None:
        offset = index * self.stride
        view = memoryview(dst.numpy()).cast("B")
        direct = self.direct and dst.data_ptr() % PAGE == 0
        if direct:
            try:
                self._read(self.direct_fd, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: an alignment this device refuses
                    raise
                self.direct = direct = False
        if not direct:
            self._read(self.fd, view, offset)
            self.drop_cache(offset, self.stride)
        if not self._verified[index]:
            self._verify(index, view)

    def _read(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < self.stride:  # pread may return short counts
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:  # a direct read resumed off the block grid: the file ended
                if e.errno != errno.EINVAL or done == 0:
                    raise
                n = 0
            if n <= 0:
                raise StoreError(f"{self.path}: short read at byte {offset + done} (the file was "
                                 "truncated); run again and the store is rebuilt")
            done += n

    def _verify(self, index: int, view: memoryview) -> None:
        if zlib.crc32(view) != self.checksums[index]:
            if self.marker is not None:
                self.marker.unlink(missing_ok=True)
            raise StoreError(f"{self.path}: expert record {index} fails its checksum (the file "
                             "changed on disk); the store is marked stale - run again and it is "
                             "rebuilt from the checkpoint")
        self._verified[index] = 1

    def nbytes(self) -> int:
        return self.stride * self.count

    def close(self) -> None:
        """Closes the file; it stays, as a cache for the next load of the same checkpoint."""
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd, self.direct = None, False
        os.close(self.fd)


def open_direct(path: Path) -> int | None:
    """A read-only descriptor that bypasses the page cache, or None where there is none (no
    O_DIRECT on this OS, or a filesystem that refuses it)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None


def _allocate(fd: int, size: int) -> None:
    """Reserve the file's blocks now, so a full disk fails here and not minutes into a build."""
    os.ftruncate(fd, size)
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without it
                raise

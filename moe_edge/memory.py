"""Giving freed memory back to the operating system.

Loading converts thousands of weights through short-lived temporaries; glibc keeps the freed
heap, so a 9.5 GiB DeepSeek-MoE-16B-shaped model measured 14.4 GiB resident after load and
9.8 GiB after `malloc_trim`. On a machine that cannot hold the model, that difference is
the point of the project.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap

HUGE_PAGE = 2 * 2**20  # x86-64's transparent huge page
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim_heap() -> bool:
    """Return freed heap pages to the OS (glibc); a no-op elsewhere. True if it ran."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def release_pages(buf) -> bool:
    """Return a CPU tensor's pages to the OS now (madvise MADV_DONTNEED): its memory stops
    counting (RSS, a memory cgroup) and reads as zeros if touched again. For a buffer that is
    never used again but shares its allocation with others (an expert slot given up). True if
    the pages went back; False off Linux/glibc, for GPU memory or an unaligned buffer."""
    libc = _libc()
    start, size = buf.data_ptr(), buf.numel() * buf.element_size()
    if libc is None or buf.device.type != "cpu" or not hasattr(mmap, "MADV_DONTNEED") \
            or start % mmap.PAGESIZE or size % mmap.PAGESIZE:
        return False
    # no huge pages here again (see huge_pages): khugepaged would refill the range with zeros
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(size), MADV_NOHUGEPAGE)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(size), mmap.MADV_DONTNEED) == 0


def huge_pages(buf) -> bool:
    """Ask Linux to back a CPU tensor's memory with transparent huge pages (madvise
    MADV_HUGEPAGE on its 2 MiB-aligned part), before the memory is first touched. For buffers
    that direct reads land in: the kernel pins a read's destination page by page, and on
    4 KiB pages that cost 0.27-0.33 ms of CPU per 4.4 MiB expert read against 0.11 ms on huge
    pages (a 2-core VM, virtio disk), time taken from the threads computing meanwhile. Also
    where the system setting is `madvise` (the default of many distributions). True if
    the advice was taken; False off Linux/glibc, for GPU memory or a buffer under 2 MiB."""
    libc = _libc()
    if libc is None or buf.device.type != "cpu":
        return False
    start = buf.data_ptr()
    first = -start % HUGE_PAGE
    size = (buf.numel() * buf.element_size() - first) // HUGE_PAGE * HUGE_PAGE
    if size <= 0:
        return False
    return libc.madvise(ctypes.c_void_p(start + first), ctypes.c_size_t(size), MADV_HUGEPAGE) == 0


def huge_page_pool(nbytes: int):
    """`nbytes` of fresh CPU memory (a uint8 tensor) starting on a 2 MiB boundary and advised
    for transparent huge pages before anything touches it: a private anonymous mapping of
    its own (a shared one is shmem, which gets no huge pages by default; a heap allocation
    may reuse pages already faulted in at 4 KiB). Without libc the advice is skipped."""
    import torch
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    pool = torch.frombuffer(mmap.mmap(-1, nbytes + HUGE_PAGE, flags=private), dtype=torch.uint8)
    start = -pool.data_ptr() % HUGE_PAGE
    pool = pool[start:start + nbytes]
    huge_pages(pool)
    return pool


def onto_huge_pages(module, smallest: int = 2**18) -> int:
    """Copy the CPU weights of `module` (parameters and buffers that own an allocation of
    `smallest` bytes or more; embeddings aside, read a row at a time) into one fresh anonymous
    mapping advised for transparent huge pages (`huge_pages`), each 64-byte aligned. Decode
    streams every dense weight each token, and on 4 KiB pages, whose every boundary stops the
    hardware prefetchers, that ran at 24-30 GB/s against 43-53 on huge pages (AMD EPYC, 2
    threads), where the system's THP setting is `madvise`: an ordinary allocation gets 4 KiB
    pages, or reuses heap pages already faulted in. One weight at a time, so memory grows by
    one weight at most. Views into a shared allocation (expert slots: advised already) are
    left; a tensor shared by several modules stays shared. Call before anything keeps
    references to the weights (the native decode steps). -> bytes moved."""
    from torch import nn
    if _libc() is None:
        return 0
    places: dict[int, list] = {}  # id of a weight -> where it is held
    weights = []
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            continue
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is not None and id(t) in places:
                    places[id(t)].append((store, name))
                elif (t is not None and t.device.type == "cpu" and t.nbytes >= smallest and t.is_contiguous()
                      and t.untyped_storage().nbytes() == t.nbytes):
                    places[id(t)] = [(store, name)]
                    weights.append(t)
    sizes = [-(-t.nbytes // 64) * 64 for t in weights]
    if not weights:
        return 0
    pool = huge_page_pool(sum(sizes))
    at = 0
    for t, size in zip(weights, sizes):
        new = pool[at:at + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        for store, name in places.pop(id(t)):
            store[name] = new
        at += size
    return at


def peak_memory(device=None) -> int:
    """Peak bytes so far: GPU memory allocated on a CUDA device, else the process's peak RSS."""
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch
        return torch.cuda.max_memory_allocated(device)
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux

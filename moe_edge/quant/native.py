"""moe-edge's own CPU kernel for decode-sized int4 matmuls (csrc/int4_decode.cpp).

PyTorch's `_weight_int4pack_mm_for_cpu` reads a DeepSeek-16B expert (2048 -> 2816, 2.9 MB)
at ~10 GB/s on these 2-core machines, which read ~21 GB/s: it issues no prefetches, and
the hardware's stop at every 4 KiB page. This kernel takes the same packed bytes and
scales (no second copy, no new format), turns two input rows into bf16 pairs with one byte
permute and multiplies them with AVX512-BF16 dot products while prefetching 64 KiB ahead,
1.3-1.5x PyTorch's kernel on the same streamed weights (bench/kernel_speed.py, docs/performance.md).
One call runs a layer's experts (`int4_mm_cat`: one parallel region instead of one per
matrix), or whole MLPs, gate+up to down (`mlps`: the ATen ops between them from C++).

Results differ from PyTorch's kernel in the last bits (other summation order; both are
~2e-3 from exact, the bf16 rounding of their output). Every row is computed the same way
whatever else is in the call, so batching experts stays bit for bit.

Built with the C++ compiler on first use, with the decode steps of csrc/decode_step.cpp
(~30 s on 2 cores, cached under ~/.cache/moe-edge/kernels;
the build is announced at INFO on this module's logger, which the CLI shows on stderr);
without a compiler, on other CPUs, or with MOE_EDGE_NATIVE=0, PyTorch's kernel runs instead.
"""
# N=out features, K=in features, M=rows

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

# "0": PyTorch's kernel only (to compare, or to rule this one out); "bf16", "int8": that variant
ENV = "MOE_EDGE_NATIVE"
# the instructions the kernels use (every CPU with AVX512-BF16 has VNNI)
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_bf16", "avx512_vnni"}
DOTS = {"bf16": 0, "int8": 1}  # the kernel's variants (csrc/int4_decode.cpp) as its `configure` numbers them
PREFETCH = {"GenuineIntel": 65536}  # bytes the kernel prefetches ahead, by CPU vendor; elsewhere none
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = [CSRC / "int4_decode.cpp", CSRC / "decode_step.cpp", CSRC / "int8_head.cpp"]
HEADERS = [CSRC / "int4_decode.h"]  # included by both sources: a change rebuilds too
LIBRARY = "moe_edge_int4"
log = logging.getLogger(__name__)


def supported() -> bool:
    """Whether the kernel can run here, without building it: enabled, a CPU with the
    instructions it uses, PyTorch's AVX512 packed layout."""
    from . import int4_cpu
    return os.environ.get(ENV, "1") != "0" and CPU_FLAGS <= cpu_flags() and int4_cpu.layout_block() == 64


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernel runs here: `supported`, and built (once per machine; a failed
    build warns and says no)."""
    if not supported():
        return False
    try:
        with _BUILDING:
            _build()
    except Exception as e:  # no compiler, headers missing, cache not writable: PyTorch's kernel
        lines = str(e).strip().splitlines() or [type(e).__name__]
        why = next((l.strip() for l in lines if "error" in l.lower() and "Error building" not in l), lines[-1])
        warnings.warn(f"moe-edge's CPU int4 kernel did not build ({why}); using PyTorch's "
                      f"(slower at decode). Set {ENV}=0 to skip the build.", stacklevel=2)
        return False
    return True


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty elsewhere)."""
    return set(_cpuinfo().get("flags", "").split())


def cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ... (Linux; '' elsewhere)."""
    return _cpuinfo().get("vendor_id", "")


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def dots() -> str:
    """Which dot products the kernel runs here: `MOE_EDGE_NATIVE=bf16` or `=int8` names them;
    otherwise int8 activations with VNNI on AMD CPUs (1.5x the bf16 variant on weights in the
    caches, 1.14x on the 16B shape's decode, AMD EPYC; docs/kernels.md), bf16 elsewhere."""
    named = os.environ.get(ENV, "")
    if named in DOTS:
        return named
    return "int8" if cpu_vendor() == "AuthenticAMD" else "bf16"


def configure(variant: str | None = None, prefetch: int | None = None) -> None:
    """Set the kernel's dot products ("bf16", "int8") and prefetch distance for this process
    (default: what `dots()` and the CPU vendor choose); `available()` does it once.
    Benchmarks switch them to compare in one process."""
    _CONFIGURE(DOTS[variant or dots()],
               PREFETCH.get(cpu_vendor(), 0) if prefetch is None else prefetch)


def _folder() -> Path:
    """Where the kernel is built and cached: one folder per PyTorch and Python version."""
    version = f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return Path.home() / ".cache" / "moe-edge" / "kernels" / version


def _built(folder: Path) -> bool:
    """Whether `folder` holds a library newer than the source (loading it then compiles nothing)."""
    library = folder / f"{LIBRARY}.so"
    newest = max(p.stat().st_mtime for p in [*SOURCES, *HEADERS])
    return library.exists() and library.stat().st_mtime >= newest


def _build() -> None:
    import fcntl
    from torch.utils.cpp_extension import load
    folder = _folder()
    folder.mkdir(parents=True, exist_ok=True)
    if not _built(folder):  # said before the lock: waiting on another process's build is as long
        log.info("compiling the native int4 kernel and decode steps (once, ~30 s)...")
    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi", "-mavx512bf16", "-mavx512vnni"]
    if torch.backends.openmp.is_available():
        flags.append("-fopenmp")  # ATen's parallel_for is an OpenMP pragma in its header
    # ninja comes with moe-edge, next to this Python, which need not be on PATH (a venv's
    # bin/moe-edge run without activating it); PyTorch looks for it on PATH only
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        with open(folder / "moe-edge.lock", "w") as held:
            # one build at a time across processes; the OS drops this lock when its process
            # dies, unlike PyTorch's own lock file, which a killed build leaves behind and
            # every later build then waits on forever: while we hold ours, any is stale
            fcntl.flock(held, fcntl.LOCK_EX)
            (folder / "lock").unlink(missing_ok=True)
            module = load(LIBRARY, [str(s) for s in SOURCES], extra_cflags=flags,
                          build_directory=str(folder), is_python_module=True, verbose=False)
    finally:
        os.environ["PATH"] = path
    global _MM, _CAT, _MLPS, _ATTEND, _STEPS, _CONFIGURE, _INT8
    _STEPS = module
    ops = torch.ops.moe_edge
    _MM, _CAT, _MLPS = ops.int4_mm.default, ops.int4_mm_cat.default, ops.mlps.default
    _ATTEND, _CONFIGURE = ops.decode_attention.default, ops.configure.default
    _INT8 = ops.int8_mm.default
    configure()


def usable(layer) -> bool:
    """Whether `layer` (a QuantLinear) fits the kernel: PyTorch's CPU int4 layout with bf16
    scales, output width a multiple of 64, group size a multiple of 16. Cached on the layer."""
    ok = layer.__dict__.get("_native")
    if ok is None:
        b = layer._buffers
        ok = (layer.kernel == "int4-cpu" and b["scale_zeros"].dtype == torch.bfloat16
              and layer.out_features % 64 == 0 and layer.group % 16 == 0
              and layer.in_features % layer.group == 0 and b["packed"].is_contiguous()
              and available())
        layer.__dict__["_native"] = ok
    return ok


def int4_mm(layer, x2: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] (bf16, in the layer's act-order) times the weight of a `usable` layer: [M, N] bf16."""
    b = layer._buffers
    return _MM(x2.contiguous(), b["packed"], b["scale_zeros"], layer.group)


def int4_mm_cat(layers: list, xs: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat([int4_mm(l, x) for l, x in zip(layers, xs)]) in one call (one x: shared by
    all), bit for bit; the layers must share a group size and an output width."""
    return _CAT(xs, [l._buffers["packed"] for l in layers], [l._buffers["scale_zeros"] for l in layers],
                layers[0].group)


def mlps_usable(mlp) -> bool:
    """Whether a QuantMLP can run whole in `mlps`: fused gate+up, both matmuls on this
    kernel, no biases. Cached on the MLP."""
    ok = mlp.__dict__.get("_native")
    if ok is None:
        m = mlp._modules
        ok = "gate_up" in m and all(usable(m[n]) and m[n].bias is None for n in ("gate_up", "down_proj"))
        mlp.__dict__["_native"] = ok
    return ok


def mlps(mlps: list, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.cat([m.run(x2, dtype) for m in mlps]) in one call, bit for bit (the same ATen
    ops and kernel calls, without the Python between them): x2 [M, D] bf16; MLPs that all
    pass mlps_usable, with one width and one group size for each projection."""
    args = [_args(m) for m in mlps]
    return _MLPS(x2, *([a[i] for a in args] for i in range(3)), mlps[0]._modules["gate_up"].group,
                 *([a[i] for a in args] for i in range(3, 6)), mlps[0]._modules["down_proj"].group, dtype)


def _args(mlp) -> tuple:
    """(packed, scale_zeros, perm) of gate_up, then of down_proj: what `mlps` passes. Cached
    on the MLP while its gate_up still holds the same packed tensor (buffers replaced: anew)."""
    args = mlp.__dict__.get("_native_args")
    m = mlp._modules
    if args is None or args[0] is not m["gate_up"]._buffers["packed"]:
        args = tuple(m[n]._buffers[b] for n in ("gate_up", "down_proj") for b in ("packed", "scale_zeros", "perm"))
        mlp.__dict__["_native_args"] = args
    return args


def int8_usable(in_features: int) -> bool:
    """Whether the int8 lm_head's matmul (csrc/int8_head.cpp) runs here for this input width:
    the kernels built, a multiple of 32 inputs."""
    return in_features % 32 == 0 and available()


def int8_mm(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x2 @ q.T) * scale for int8 q [N, K] with one bf16 scale per row, x2 fp32 [M, K] ->
    fp32 [M, N] (`int8_usable`): x2 scaled to int16 per row, exact int32 dot products."""
    return _INT8(x2, q, scale)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode step's attention over a bf16 KV cache (csrc: `decode_attention`): q fp32
    [1, H, 1, Hd], k and v bf16 [1, K, S, Hd] views of the cache -> fp32 [1, H, 1, Hd]."""
    return _ATTEND(q, k, v, scale)


def steps():
    """The module of the native decode steps (csrc/decode_step.cpp, quant/decode_steps.py),
    once `available()` has said yes."""
    return _STEPS


# the ops and the decode steps' module, once built (see _build)
_MM = _CAT = _MLPS = _ATTEND = _STEPS = _CONFIGURE = _INT8 = None
_BUILDING = threading.Lock()  # lru_cache does not hold a second thread back on a first call

"""A 4-bit Linear that converts GPTQ tensors once, at load, into the layout its kernel runs.

Kernels (PyTorch's own "tinygemm" int4 kernels; convention `w = (q - 8) * scale + zero`
with a float zero, scales and zeros interleaved [K/g, N, 2]):

- ``int4-cpu``:  `_weight_int4pack_mm_for_cpu`. It accepts fp32/fp16/bf16, but only its bf16
  path is vectorised: on these 2-core x86 machines one token through 2048->1408 took
  ~0.1 ms in bf16 against ~5 ms in fp32 or fp16 (torch 2.13). So activations are cast to
  bf16 for the kernel and back (relative error ~2e-3 against fp32); `compute_dtype`
  float32 gives the exact, slow path.
- ``int4-cuda``: `_weight_int4pack_mm` (bf16 activations)
- ``dequant``:   dequantise-then-matmul, for shapes the kernels refuse; chosen explicitly
  and reported (`QuantLinear.kernel`, `QuantLinear.reason`), never silently.

GPTQ's `s * (q - z)` equals tinygemm's `(q - 8) * s + s * (8 - z)`. Act-order is handled by
sorting the input channels by group once at load, and permuting activations at run time.
"""
# N=out features, K=in features, M=rows of activations, A=experts run together, I=expert width

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import trim_heap
from ..model.layers import MLP
from . import int4_cpu, native
from .format import GPTQTensors, unpack

KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes tinygemm accepts
KERNELS = ("auto", "int4", "dequant")


def plan_kernel(t: GPTQTensors, device: torch.device, kernel: str = "auto") -> tuple[str, str, int]:
    """(kernel name, reason, kernel group size) for one Linear on `device`."""
    N, K = t.out_features, t.in_features
    name = "int4-cuda" if device.type == "cuda" else "int4-cpu"
    if kernel == "dequant":
        return "dequant", "asked for", 0
    sorted_groups = torch.sort(t.g_idx.to(torch.int64), stable=True).values
    group = _kernel_group(sorted_groups)
    reasons = []
    if N % (16 if device.type == "cpu" else 8):
        reasons.append(f"out features {N} not divisible by {16 if device.type == 'cpu' else 8}")
    if group == 0:
        reasons.append("groups are not multiples of 32 input channels")
    if device.type == "cuda" and K % 32:
        reasons.append(f"in features {K} not divisible by 32")
    if device.type not in ("cpu", "cuda"):
        reasons.append(f"no int4 kernel for device {device.type}")
    if reasons:
        if kernel == "int4":
            raise ValueError(f"the {name} kernel cannot run this {K}->{N} layer: {'; '.join(reasons)}")
        return "dequant", "; ".join(reasons), 0
    return name, "", group


def _kernel_group(sorted_groups: torch.Tensor) -> int:
    """Largest tinygemm group size that tiles every run of equal GPTQ group ids."""
    _, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
    for g in KERNEL_GROUPS:
        if bool((counts % g == 0).all()):
            return g
    return 0


def _inner_k_tiles(K: int) -> int:
    return next(t for t in (8, 4, 2) if K % (t * 16) == 0)


_INT4_MM = {"int4-cpu": torch.ops.aten._weight_int4pack_mm_for_cpu.default,
            "int4-cuda": torch.ops.aten._weight_int4pack_mm.default}


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W stored in 4 bits.

    >>> layer = QuantLinear.from_gptq(tensors, v2=False, device=torch.device("cpu"))
    >>> layer.kernel, layer.reason
    ('int4-cpu', '')
    """

    def __init__(self, in_features: int, out_features: int, kernel: str, reason: str = ""):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel, self.reason, self.group = kernel, reason, 0
        self.register_buffer("perm", None)
        self.register_buffer("bias", None)

    @classmethod
    def from_gptq(cls, t: GPTQTensors, v2: bool, device: torch.device,
                  dtype: torch.dtype = torch.float32, kernel: str = "auto",
                  compute_dtype: torch.dtype | None = None) -> "QuantLinear":
        """`dtype`: the model's activations (and the dequant path's compute dtype);
        `compute_dtype`: what the int4 kernel computes in (default bf16, see above)."""
        name, reason, group = plan_kernel(t, device, kernel)
        layer = cls(t.in_features, t.out_features, name, reason)
        if name == "dequant":
            layer._init_dequant(t, v2, device, dtype)
        else:
            layer._init_int4(t, v2, device, compute_dtype or torch.bfloat16, group)
        if t.bias is not None:
            layer.register_buffer("bias", t.bias.to(device=device, dtype=layer.act_dtype))
        return layer

    @property
    def act_dtype(self) -> torch.dtype:
        return self.scale_zeros.dtype if self.kernel != "dequant" else self.scales.dtype

    def _init_int4(self, t: GPTQTensors, v2: bool, device, dtype, group: int) -> None:
        q, zeros, scales, g_idx = unpack(t, v2)  # [N, K], [G, N], [G, N], [K]
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(perm, torch.arange(len(perm))):
            self.register_buffer("perm", perm.to(device))
            q, g_idx = q[:, perm], g_idx[perm]
        first = g_idx[::group]  # GPTQ group of each kernel group, [K/g]
        s = scales.float()[first]  # [K/g, N]
        zero = s * (8 - zeros.float()[first])
        if device.type == "cuda":
            dtype = torch.bfloat16  # tinygemm on CUDA takes bf16 only
            packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
            packed = torch.ops.aten._convert_weight_to_int4pack(packed, _inner_k_tiles(t.in_features))
        else:
            packed = int4_cpu.pack(q)
            if packed is None:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        self.group = group
        self.register_buffer("packed", packed.to(device))
        self.register_buffer("scale_zeros", torch.stack([s, zero], -1).to(device=device, dtype=dtype).contiguous())

    def _init_dequant(self, t: GPTQTensors, v2: bool, device, dtype) -> None:
        q, zeros, scales, g_idx = unpack(t, v2)
        self.register_buffer("qweight", t.qweight.to(device))  # stays 4-bit in memory
        self.register_buffer("zeros", zeros.to(torch.uint8).to(device))
        self.register_buffer("scales", scales.to(device=device, dtype=dtype))
        self.register_buffer("g_idx", g_idx.to(device))

    def weight_dequantized(self) -> torch.Tensor:
        """W [N, K] in the activation dtype (the dequant path; also handy for tests)."""
        from .format import unpack_along_rows
        q = unpack_along_rows(self.qweight).T.to(self.scales.dtype)  # [N, K]
        zeros = self.zeros.T[:, self.g_idx].to(self.scales.dtype)
        return (q - zeros) * self.scales.T[:, self.g_idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode calls this hundreds of times per token: buffers are read from `_buffers`
        # (nn.Module's __getattr__ costs ~0.5 us a lookup) and nothing is done twice
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self.kernel == "dequant":
            y = F.linear(x2.to(self.scales.dtype), self.weight_dequantized())
            if self.bias is not None:
                y = y + self.bias
        else:
            y = int4_matmul(self, x2.to(self._buffers["scale_zeros"].dtype))
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        extra = f", reason={self.reason!r}" if self.reason else ""
        return f"{self.in_features}->{self.out_features}, kernel={self.kernel}, group={self.group}{extra}"


def int4_matmul(layer: QuantLinear, x2: torch.Tensor, permuted: torch.Tensor | None = None) -> torch.Tensor:
    """[M, out] in the kernel's dtype for `x2` [M, in] already in it; `permuted` is `x2`
    already in this layer's act-order (shared by layers with the same permutation)."""
    b = layer._buffers
    if permuted is None:
        perm = b["perm"]
        permuted = x2.index_select(1, perm) if perm is not None else x2.contiguous()
    if layer.kernel == "int4-cpu" and int4_cpu.usable(layer, permuted):  # prefill: many rows
        y = int4_cpu.matmul(layer, permuted)
    elif permuted.dtype == torch.bfloat16 and native.usable(layer):
        y = native.int4_mm(layer, permuted)
    else:
        y = _INT4_MM[layer.kernel](permuted, b["packed"], layer.group, b["scale_zeros"])
    return y if b["bias"] is None else y + b["bias"]


class QuantMLP(MLP):
    """An MLP whose three projections run on one int4 kernel: the input is cast (and
    act-order permuted) once for gate and up, and the buffers are read without nn.Module's
    attribute lookups. Bit for bit what MLP computes with the same three QuantLinears.

    Same parameters and names as MLP; `use_quant_mlps` converts a model's MLPs in place, and
    may fuse gate and up into one matmul (`gate_up`, see `_fuse_gate_up`). Decode runs six
    routed experts per MoE layer through this, so its per-call overhead is most of a small
    model's time per token: 24 us here against 74 us for the module-by-module path on the
    demo's 128->64 experts.
    """

    @property
    def kernel_dtype(self) -> torch.dtype:
        return self._modules["down_proj"]._buffers["scale_zeros"].dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self._modules["down_proj"].out_features).to(self.kernel_dtype)
        return self.run(x2, x.dtype).to(x.dtype).view(x.shape)

    def run(self, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[M, D] in the kernel's dtype for `x2` [M, D] already in it; silu and the product
        in `dtype` (the activations'), rounded once for down: exactly what the three
        QuantLinears compute one by one. The MoE block casts a layer's input once for all
        its experts through this (see model.moe.ExpertInput)."""
        m = self._modules
        down = m["down_proj"]
        if x2.shape[0] < int4_cpu.MIN_ROWS and x2.dtype == torch.bfloat16 and native.mlps_usable(self):
            return native.mlps([self], x2, dtype)  # the same ops in one call
        if "gate_up" in m:
            h = _glu(int4_matmul(m["gate_up"], x2), down.in_features, dtype)
        else:
            gate, up = m["gate_proj"], m["up_proj"]
            perm = gate._buffers["perm"]
            xg = x2.index_select(1, perm) if perm is not None else x2.contiguous()
            xu = xg if up._buffers["perm"] is perm else None
            h = F.silu(int4_matmul(gate, x2, xg).to(dtype)) * int4_matmul(up, x2, xu)
        return int4_matmul(down, h.to(x2.dtype))


def _glu(gu: torch.Tensor, I: int, dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up in `dtype` from fused gate+up outputs [M, 2I] (gate's columns first):
    one expression for one expert and for several, which is what keeps them bitwise equal."""
    return F.silu(gu[:, :I].to(dtype)) * gu[:, I:]


def _together(I: int, A: int) -> bool:
    """Whether A experts of width I may go through run_experts' shared ops bit for bit (see there)."""
    return A >= 2 and I % FUSE_BLOCK == 0 and A * I <= GRAIN_SIZE


def runs_together(mlp: nn.Module, together: int) -> bool:
    """Whether expert `mlp` can go through run_experts with `together` experts: a fused
    gate_up and a width the shared ops keep bitwise (see there)."""
    return "gate_up" in mlp._modules and _together(mlp._modules["down_proj"].in_features, together)


def gate_up_row(mlp: nn.Module, x2: torch.Tensor) -> torch.Tensor:
    """An expert's fused gate+up output [1, 2I] for `x2` [1, D] in its kernel dtype: the
    first half of run_experts, for experts handed over one at a time (see runs_together)."""
    return int4_matmul(mlp._modules["gate_up"], x2)


def run_experts(mlps: list[QuantMLP], x2: torch.Tensor, dtype: torch.dtype,
                rows: list[torch.Tensor] | None = None) -> torch.Tensor:
    """torch.cat([m.run(x2, dtype) for m in mlps]) [A, D] for one row `x2` [1, D] in the
    kernel's dtype, bit for bit, in fewer ops: the experts' gate+up rows are stacked and go
    through silu, the product and the cast to the kernel's dtype once for all, then each
    expert's down projection takes its own row. Decode runs this on the k routed experts of
    each MoE layer: 4 ops per expert fewer (per token ~100 on the demo, ~750 on DeepSeek-16B,
    where every op also costs more while the weights stream through the caches).

    Exact because each row then meets the same CPU loops it meets alone: a vectorised body
    and a scalar tail (whose exp differs in the last bit) split every row at the same offsets
    when I is a multiple of FUSE_BLOCK (fused gate+up guarantees it), and A*I up to
    ATen's grain size keeps the op on one thread, so no thread boundary falls inside a row.
    `rows`: the experts' gate_up_row outputs when the caller computed them already."""
    downs = [m._modules["down_proj"] for m in mlps]
    fused = [m._modules.get("gate_up") for m in mlps]
    I = downs[0].in_features
    if None in fused or any(d.in_features != I for d in downs) or not _together(I, len(mlps)):
        return torch.cat([m.run(x2, dtype) for m in mlps])
    if rows is None and x2.dtype == torch.bfloat16 and _same_groups(mlps) and all(map(native.mlps_usable, mlps)):
        return native.mlps(mlps, x2, dtype)  # what follows, in one call
    gu = torch.cat(rows) if rows is not None else _int4_cat(fused, [x2] * len(fused))  # [A, 2I]
    h = _glu(gu, I, dtype).to(x2.dtype)  # [A, I]
    return _int4_cat(downs, h.split(1))


def _same_groups(mlps: list[QuantMLP]) -> bool:
    return all(len({m._modules[n].group for m in mlps}) == 1 for n in ("gate_up", "down_proj"))


def _int4_cat(layers: list[QuantLinear], xs: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat([int4_matmul(l, x) for ...]) for one-row inputs, bit for bit: in one call of
    the native kernel when every layer takes it (one parallel region for a layer's experts)."""
    if xs[0].dtype == torch.bfloat16 and all(
            native.usable(l) and l.bias is None and l.group == layers[0].group for l in layers):
        perms = [l._buffers["perm"] for l in layers]
        if all(p is None for p in perms) and all(x is xs[0] for x in xs):
            return native.int4_mm_cat(layers, [xs[0].contiguous()])  # one input, shared
        return native.int4_mm_cat(layers, [x.index_select(1, p) if p is not None else x.contiguous()
                                           for x, p in zip(xs, perms)])
    return torch.cat([int4_matmul(l, x) for l, x in zip(layers, xs)])


def _fusable(mlp: nn.Module) -> bool:
    projs = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, QuantLinear) and p.kernel != "dequant" for p in projs):
        return False
    return len({p.kernel for p in projs}) == 1 and len({p.act_dtype for p in projs}) == 1


FUSE_BLOCK = 64  # the CPU kernel computes output columns in blocks of 64
GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: elementwise ops on fewer elements run on one thread


def concat_outputs(layers: list[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear computing `layers`' outputs side by side (same input), or None when
    that would not be bit for bit what they compute one by one.

    One kernel call instead of several: on DeepSeek-16B's experts (2048 -> 2x1408, streamed
    from DRAM) 0.31 against 0.34-0.40 ms, and one cast and one dispatch fewer per call.
    Exact only with the CPU kernel, one group size, one act-order permutation (the same
    object, see `share_perm`) and widths in multiples of FUSE_BLOCK (at 16, 32, 48 or 96
    the last bits differ).
    """
    first = layers[0]
    if first.kernel != "int4-cpu" or any(
            l.kernel != first.kernel or l.group != first.group or l.perm is not first.perm
            or l.in_features != first.in_features or (l.bias is None) != (first.bias is None)
            or l.out_features % FUSE_BLOCK for l in layers):
        return None
    fused = QuantLinear(first.in_features, sum(l.out_features for l in layers), first.kernel)
    fused.group = first.group
    fused.register_buffer("perm", first.perm)
    fused.register_buffer("packed", torch.cat([l.packed for l in layers], 0))  # [sum N, K/2]
    fused.register_buffer("scale_zeros", torch.cat([l.scale_zeros for l in layers], 1).contiguous())
    if first.bias is not None:
        fused.register_buffer("bias", torch.cat([l.bias for l in layers]))
    return fused


def share_perm(layers: list[QuantLinear]) -> None:
    """Let layers with equal act-order permutations hold one tensor (GPTQ gives equal ones
    to layers quantized from the same Hessian: an expert's gate and up, q, k and v)."""
    for l in layers[1:]:
        if l.perm is not None and layers[0].perm is not None and l.perm is not layers[0].perm \
                and torch.equal(l.perm, layers[0].perm):
            l.perm = layers[0].perm


def _fuse_gate_up(mlp: QuantMLP) -> bool:
    """Replace gate_proj and up_proj by one QuantLinear `gate_up` where exact. -> whether it did."""
    fused = concat_outputs([mlp.gate_proj, mlp.up_proj])
    if fused is None:
        return False
    del mlp.gate_proj, mlp.up_proj  # freed here, one expert at a time
    mlp.gate_up = fused
    return True


def fuse_qkv(model: nn.Module) -> int:
    """Replace every attention's q_proj, k_proj and v_proj by one QuantLinear `qkv` where
    that is exact (see concat_outputs): one kernel call, one cast and one rotary fewer per
    layer and token. -> count."""
    count = 0
    for module in model.modules():
        projs = [module._modules.get(n) for n in ("q_proj", "k_proj", "v_proj")]
        if not all(isinstance(p, QuantLinear) for p in projs):
            continue
        share_perm(projs)
        fused = concat_outputs(projs)
        if fused is not None:
            del module.q_proj, module.k_proj, module.v_proj
            module.qkv = fused
            count += 1
    return count


def use_quant_mlps(model: nn.Module, fuse: bool = True) -> int:
    """Turn every MLP whose projections all run on the same int4 kernel into a QuantMLP,
    sharing gate's and up's act-order permutation when they are equal (they are when GPTQ
    ordered both by the same Hessian, i.e. always for one expert's gate and up), and with
    `fuse` joining gate and up where that is bitwise exact (not for slot experts, whose
    buffers are views into a slot). -> count."""
    names = [name for name, m in model.named_modules() if type(m) is MLP and _fusable(m)]
    for i, name in enumerate(names):  # by name: a list of modules would keep every unfused buffer alive
        mlp = model.get_submodule(name)
        share_perm([mlp.gate_proj, mlp.up_proj])
        mlp.__class__ = QuantMLP
        if fuse and _fuse_gate_up(mlp) and i % 32 == 31:
            trim_heap()  # the freed halves are too small for the next fused buffer: give them back
    return len(names)

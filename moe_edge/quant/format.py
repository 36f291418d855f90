"""The GPTQ checkpoint format (as AutoGPTQ, GPTQModel and optimum write it): settings, pack, unpack.

For a Linear with K inputs, N outputs and G groups (DESIGN.md, 'Formats'):

    qweight int32 [K/8, N]  eight 4-bit values packed along K: row 8r+j in bits 4j..4j+3
    qzeros  int32 [G, N/8]  packed along N; "gptq" (v1) stores zero-1, "gptq_v2" the zero
    scales  fp16  [G, N]
    g_idx   int32 [K]       group of each input channel (not monotone with act-order)

    W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import read_json_object
from ..errors import CheckpointError, ConfigError
from ..model.weights import FLOAT_STORED, check_values

FORMATS = ("gptq", "gptq_v2")
PACK = 8  # 4-bit values per int32


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's `quantization_config`, validated. Only 4-bit GPTQ is supported."""

    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel scales)
    desc_act: bool = True
    sym: bool = True
    checkpoint_format: str = "gptq"
    true_sequential: bool = True
    damp_percent: float = 0.01
    static_groups: bool = False
    lm_head: bool = False
    quant_method: str = "gptq"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.quant_method != "gptq":
            raise ConfigError(f"quantization_config.quant_method {self.quant_method!r} is not "
                              "supported; moe-edge reads GPTQ checkpoints (quant_method 'gptq')")
        if self.bits != 4:
            raise ConfigError(f"quantization_config.bits is {self.bits}; only 4-bit GPTQ is "
                              "supported")
        if self.checkpoint_format not in FORMATS:
            raise ConfigError(f"quantization_config.checkpoint_format {self.checkpoint_format!r} "
                              f"is not supported; use one of {', '.join(FORMATS)}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % PACK):
            raise ConfigError(f"quantization_config.group_size {self.group_size} must be -1 or "
                              "a positive multiple of 8")
        if not 0 <= self.damp_percent < 1:
            raise ConfigError(f"quantization_config.damp_percent {self.damp_percent} must be in [0, 1)")

    @property
    def v2(self) -> bool:
        return self.checkpoint_format == "gptq_v2"

    def groups(self, in_features: int) -> int:
        size = in_features if self.group_size == -1 else self.group_size
        return -(-in_features // size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_dict(cls, raw: dict) -> "QuantConfig":
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw and k != "extra"}
        # older writers say "format"; AutoGPTQ's quantize_config.json may omit quant_method
        if "checkpoint_format" not in known and "format" in raw:
            known["checkpoint_format"] = raw["format"]
        known.setdefault("quant_method", raw.get("quant_method", "gptq"))
        extra = {k: v for k, v in raw.items() if k not in known}
        try:
            return cls(**known, extra=extra)
        except TypeError as e:
            raise ConfigError(f"quantization_config: {e}") from None


def read_quant_config(folder: str | Path) -> QuantConfig | None:
    """config.json's quantization_config, else quantize_config.json; None if unquantized."""
    folder = Path(folder)
    config = read_json_object(folder / "config.json", "config.json")
    raw, source = config.get("quantization_config"), folder / "config.json"
    if raw is None and (folder / "quantize_config.json").exists():
        source = folder / "quantize_config.json"
        raw = read_json_object(source, "quantize_config.json")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {raw!r}")
    try:
        return QuantConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret values in [0, 2^32) (held in int64) as int32 bit patterns."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_along_rows(q: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 -> int32 [R/8, C]; row 8r+j in bits 4j..4j+3."""
    R, C = q.shape
    q = q.to(torch.int64).view(R // PACK, PACK, C)
    shifts = (4 * torch.arange(PACK, dtype=torch.int64)).view(1, PACK, 1)
    return _to_int32((q << shifts).sum(dim=1))


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    """int32 [A, B] -> uint8 [A, B, 4]: byte b (bits 8b..8b+7) of each word; a view of the
    words themselves on a little-endian CPU."""
    if sys.byteorder == "little" and packed.device.type == "cpu":
        return packed.contiguous().view(torch.uint8).view(*packed.shape, 4)
    shifts = 8 * torch.arange(4, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 255).to(torch.uint8)


def _split_bytes(b: torch.Tensor, dim: int) -> torch.Tensor:
    """The nibbles of uint8 `b`, in a new dimension of 2 at `dim` (0: low, 1: high), written
    straight into place. Unpacking this way, on the packed bytes, instead of int32 shifts on
    eight times as many words, took the 16B-shaped model's load from 54 to ~30 s."""
    shape = list(b.shape)
    shape.insert(dim, 2)
    out = torch.empty(shape, dtype=torch.uint8, device=b.device)
    torch.bitwise_and(b, 15, out=out.select(dim, 0))
    torch.bitwise_right_shift(b, 4, out=out.select(dim, 1))
    return out


def unpack_along_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R/8, C] -> uint8 [R, C]: row 8r + 2b + h is nibble h of byte b of word r."""
    R8, C = packed.shape
    return _split_bytes(_bytes(packed).permute(0, 2, 1), 2).view(R8 * PACK, C)  # [R/8, 4, 2, C]


def unpack_rows_transposed(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R/8, C] -> uint8 [C, R], contiguous: unpack_along_rows(packed).T in one pass."""
    R8, C = packed.shape
    return _split_bytes(_bytes(packed).permute(1, 0, 2), 3).view(C, R8 * PACK)  # [C, R/8, 4, 2]


def pack_along_cols(q: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 -> int32 [R, C/8]; column 8c+j in bits 4j..4j+3."""
    return pack_along_rows(q.T.contiguous()).T.contiguous()


def unpack_along_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> uint8 [R, C]."""
    R, C8 = packed.shape
    return _split_bytes(_bytes(packed), 3).view(R, C8 * PACK)  # [R, C/8, 4, 2]


@dataclass
class GPTQTensors:
    """The stored tensors of one quantized Linear."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * PACK

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.qweight, self.qzeros, self.scales, self.g_idx, self.bias) if t is not None)


def pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
         v2: bool = False, bias: torch.Tensor | None = None) -> GPTQTensors:
    """q [N, K] in 0..15, zeros [G, N] (the real zero points), scales [G, N], g_idx [K]."""
    N, K = q.shape
    if K % PACK or N % PACK:
        raise ValueError(f"GPTQ packing needs in and out features divisible by 8, got K={K}, N={N}")
    lo, hi = (0, 15) if v2 else (1, 16)
    if zeros.min() < lo or zeros.max() > hi:
        raise ValueError(f"zero points must lie in [{lo}, {hi}] for checkpoint_format "
                         f"{'gptq_v2' if v2 else 'gptq'}")
    stored = zeros.to(torch.int64) - (0 if v2 else 1)
    return GPTQTensors(
        qweight=pack_along_rows(q.T.contiguous()), qzeros=pack_along_cols(stored),
        scales=scales.to(torch.float16).contiguous(), g_idx=g_idx.to(torch.int32).contiguous(),
        bias=None if bias is None else bias.to(torch.float16))


def unpack(t: GPTQTensors, v2: bool = False):
    """-> q uint8 [N, K], zeros int32 [G, N] (real zero points), scales [G, N], g_idx int64 [K]."""
    q = unpack_rows_transposed(t.qweight)
    zeros = unpack_along_cols(t.qzeros).to(torch.int32) + (0 if v2 else 1)
    return q, zeros, t.scales, t.g_idx.to(torch.int64)


def dequantize(t: GPTQTensors, v2: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] the tensors stand for: scales[g, n] * (q[n, k] - zero[g, n])."""
    q, zeros, scales, g = unpack(t, v2)
    w = (q.to(torch.float32) - zeros.T[:, g].to(torch.float32)) * scales.T[:, g].to(torch.float32)
    return w.to(dtype)


def check_tensors(name: str, t: GPTQTensors, in_features: int, out_features: int,
                  cfg: QuantConfig, where: str) -> None:
    """Shapes, dtypes and g_idx range of one quantized Linear; errors name the tensor."""
    K, N, G = in_features, out_features, cfg.groups(in_features)
    expect = {"qweight": ((K // PACK, N), torch.int32), "qzeros": ((G, N // PACK), torch.int32),
              "scales": ((G, N), None), "g_idx": ((K,), None)}
    for part, (shape, dtype) in expect.items():
        tensor = getattr(t, part)
        if part == "qweight" and tensor.shape[1:] == (N,) and tensor.shape[0] * 32 // K != 4:
            bits = tensor.shape[0] * 32 // K
            raise CheckpointError(f"{where}: {name}.qweight has shape {list(tensor.shape)}, which "
                                  f"holds {bits}-bit values, but quantization_config.bits is "
                                  f"{cfg.bits}")
        if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
            raise CheckpointError(f"{where}: {name}.{part} is {str(tensor.dtype).removeprefix('torch.')} "
                                  f"{list(tensor.shape)}, expected {list(shape)} for a {K}->{N} "
                                  f"Linear with group_size {cfg.group_size}")
    check_values(where, f"{name}.scales", t.scales)
    check_values(where, f"{name}.g_idx", t.g_idx, (torch.int32, torch.int64))
    if t.bias is not None:
        check_values(where, f"{name}.bias", t.bias, FLOAT_STORED)
    if t.g_idx.numel() and (int(t.g_idx.min()) < 0 or int(t.g_idx.max()) >= G):
        raise CheckpointError(f"{where}: {name}.g_idx has values outside [0, {G}); the checkpoint "
                              "is corrupt or its group_size is wrong")

"""What this CPU can do, asked once where a decision depends on it."""

import torch


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it PyTorch's
    bf16 matmuls take a slow path, so weights are upcast to fp32 instead."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()

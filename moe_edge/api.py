"""Load a checkpoint onto a device and generate from it: the Python API.

>>> import moe_edge
>>> lm = moe_edge.load("deepseek-moe-16b-chat")
>>> print(lm.chat([{"role": "user", "content": "Hello"}]).text)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import CheckpointReader
from .config import ModelConfig, load_config
from .errors import ConfigError
from .generation import GenerationResult, SamplingParams, TextStream, read_generation_config
from .model import MoEForCausalLM
from .model.weights import WeightMap, load_weights
from .quant.format import read_quant_config
from .quant.load import install_quantized, kernel_summary
from .tokenizer import format_chat, load_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: fp32 on CPU (PyTorch's bf16 CPU matmuls are slow, see DESIGN.md), bf16 on GPU."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def load_model(path: str | Path, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = None, kernel: str = "auto") -> MoEForCausalLM:
    """The model alone (no tokenizer), every weight resident on `device`.

    GPTQ checkpoints get 4-bit layers; `kernel` is "auto" (int4 where the shape allows,
    else dequantise-then-matmul, reported in `model.quant_kernels`), "int4" or "dequant".
    """
    config = load_config(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    weights = WeightMap(CheckpointReader(path), config)
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    quant = read_quant_config(path)
    consumed = install_quantized(model, weights, quant, device, dtype, kernel) if quant else set()
    load_weights(model, weights, consumed, device=device, dtype=dtype)
    model.quant_config = quant
    model.quant_kernels = kernel_summary(model)
    if kernel == "auto" and model.quant_kernels.get("dequant"):
        reasons = sorted({m.reason for m in model.modules() if getattr(m, "kernel", "") == "dequant"})
        warnings.warn(f"{model.quant_kernels['dequant']} quantized layers use the slower "
                      f"dequantize-then-matmul path ({'; '.join(reasons)})", stacklevel=2)
    return model.eval()


@dataclass
class LoadedModel:
    """A model with its tokenizer and generation defaults; what `load()` returns."""

    model: MoEForCausalLM
    tokenizer: object
    path: Path
    defaults: SamplingParams

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def stream(self, prompt: str | Sequence[int], context: int | None = None,
               **sampling) -> TextStream:
        """Text pieces as they are generated, for a raw prompt (no chat template)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return TextStream(self.model, self.tokenizer, ids, self.defaults.with_(**sampling), context)

    def generate(self, prompt: str | Sequence[int], context: int | None = None,
                 **sampling) -> GenerationResult:
        """Complete `prompt`; sampling overrides (temperature=0, max_new_tokens=...) optional.

        >>> lm.generate("def fibonacci(n):", temperature=0, max_new_tokens=32).text
        """
        stream = self.stream(prompt, context, **sampling)
        for _ in stream:
            pass
        return stream.result

    def chat_stream(self, messages: Sequence[dict], context: int | None = None,
                    **sampling) -> TextStream:
        return self.stream(format_chat(self.tokenizer, messages), context, **sampling)

    def chat(self, messages: Sequence[dict], context: int | None = None,
             **sampling) -> GenerationResult:
        """The assistant's reply to a conversation, formatted with the chat template."""
        return self.generate(format_chat(self.tokenizer, messages), context, **sampling)


def load(path: str | Path, device: str | torch.device = "auto",
         dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load a Hugging Face MoE checkpoint folder fully resident on `device`.

    >>> lm = moe_edge.load("path/to/deepseek-moe-16b-chat", device="cpu")
    >>> lm.generate("The capital of France is", temperature=0).text
    """
    path = Path(path)
    model = load_model(path, device, dtype)
    tokenizer = load_tokenizer(path)
    eos = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return LoadedModel(model, tokenizer, path, read_generation_config(path, tuple(sorted(eos))))

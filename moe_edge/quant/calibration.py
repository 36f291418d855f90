"""Calibration text for quantisation: the shipped default, or the user's file, as token windows."""
# S=samples, T=tokens per sample

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MoeEdgeError

DEFAULT_CALIBRATION = Path(__file__).resolve().parent.parent / "data" / "calibration.jsonl"


class CalibrationError(MoeEdgeError):
    """A calibration file that cannot be read or has no text."""


def read_texts(path: str | Path | None = None) -> list[str]:
    """Documents from plain text (one document) or JSONL with a `text` field per line."""
    path = Path(path) if path is not None else DEFAULT_CALIBRATION
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read calibration text ({e}); give a UTF-8 text "
                               "or JSONL file") from None
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CalibrationError(f"{path}:{i}: each JSONL line needs a \"text\" field") from None
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"{path}: the calibration text is empty")
    return texts


def calibration_windows(tokenizer, texts: list[str], samples: int, seq_len: int,
                        seed: int = 0) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens [S, T] drawn at random (seeded) from the texts,
    joined with EOS. A text shorter than one window gives fewer, shorter samples."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if len(ids) < 2:
        raise CalibrationError("the calibration text tokenizes to almost nothing; give more text")
    stream = torch.tensor(ids, dtype=torch.long)
    seq_len = min(seq_len, len(stream))
    starts = torch.randint(0, len(stream) - seq_len + 1, (samples,),
                           generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])

"""Prepare the corpus and tokenizer for the small moe-edge demo language model.

Corpus: the reStructuredText sources of the Python 3.11 documentation as
shipped by Debian's ``python3.11-doc`` package (``apt-get install
python3.11-doc``; sources under /usr/share/doc/python3.11/html/_sources).

License: per the docs' own ``license.rst`` ("Terms and conditions for
accessing or otherwise using Python"), Python software and documentation are
licensed under the PSF License Agreement; starting with Python 3.8.6, examples,
recipes and other code in the documentation are dual licensed under the PSF
License Agreement and the Zero-Clause BSD license.  Debian's
/usr/share/doc/python3.11-doc/copyright reproduces the PSF (and historical
BeOpen/CNRI/CWI) license texts.  Keep that in mind before redistributing
outputs.

Outputs (under --out):
  train.jsonl / valid.jsonl   one {"path": ..., "text": ...} per source file
                              (document boundaries kept so the training script
                              can insert EOS between documents itself)
  tokenizer/                  byte-level BPE in DeepSeek-MoE style (BOS/EOS
                              spellings, BOS-prepending post-processor, chat
                              template of deepseek-moe-16b-chat)

Usage: python scripts/demo_data.py --out build/demo_data [--vocab-size 4096]
Only stdlib + ``tokenizers`` + ``transformers``; no network access.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

DEFAULT_SOURCE = "/usr/share/doc/python3.11/html/_sources"
BOS = "<｜begin▁of▁sentence｜>"  # DeepSeek spelling: U+FF5C fullwidth bar, U+2581
EOS = "<｜end▁of▁sentence｜>"
VALID_FRACTION = 0.05
# deepseek-moe-16b-chat's template: system text verbatim, "User: ...\n\n",
# "Assistant: ...<eos>", generation prompt "Assistant:" (no trailing space).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SAMPLE = "naïve café — 日本語 🐍\n    def f(x):\n\treturn x  # ok"


def _clean(text: str) -> str:
    """Normalise newlines and cap blank-line runs at two; otherwise keep the text."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # A line holding only spaces/tabs counts as blank, so whitespace cannot defeat the cap.
    text = re.sub(r"\n(?:[ \t]*\n){3,}", "\n\n\n", text)
    return text.strip("\n")


def _split_key(rel_path: str) -> str:
    """Stable per-file key (independent of PYTHONHASHSEED, platform and file order)."""
    return hashlib.sha1(rel_path.encode("utf-8")).hexdigest()


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_corpus(source: str | Path, out: str | Path) -> dict:
    """Read every ``*.rst.txt`` under ``source``, split BY FILE into train/valid, write JSONL.

    Files are ordered by SHA-1 of their relative path and taken into validation
    until it holds >= 5% of the files AND >= 2.5% of the characters, so the
    split is deterministic yet never degenerate (a pure hash threshold could
    leave validation empty or made only of tiny index pages).
    """
    source, out = Path(source), Path(out)
    files = sorted(source.rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(f"no *.rst.txt files under {source} (apt-get install python3.11-doc?)")
    docs = []
    for p in files:
        text = _clean(p.read_text(encoding="utf-8", errors="replace"))
        if text.strip():  # empty files carry no signal
            docs.append({"path": p.relative_to(source).as_posix(), "text": text})
    if len(docs) < 2:
        raise ValueError("need at least two non-empty documents to make a train/valid split")

    total_chars = sum(len(d["text"]) for d in docs)
    min_files = max(1, math.ceil(VALID_FRACTION * len(docs)))
    valid_paths, valid_chars = set(), 0
    for d in sorted(docs, key=lambda d: _split_key(d["path"])):
        if len(valid_paths) >= min_files and valid_chars >= VALID_FRACTION / 2 * total_chars:
            break
        if len(valid_paths) == len(docs) - 1:  # always leave something to train on
            break
        valid_paths.add(d["path"])
        valid_chars += len(d["text"])
    splits = {"train": [d for d in docs if d["path"] not in valid_paths],
              "valid": [d for d in docs if d["path"] in valid_paths]}

    out.mkdir(parents=True, exist_ok=True)
    summary = {"source": str(source)}
    for name, split_docs in splits.items():
        _write_jsonl(out / f"{name}.jsonl", split_docs)
        summary[name] = {"files": len(split_docs), "chars": sum(len(d["text"]) for d in split_docs)}
    return summary


def train_tokenizer(train_jsonl: str | Path, vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the train split only, wrap it for transformers, save, verify."""
    texts = [d["text"] for d in read_jsonl(train_jsonl)]
    tok = Tokenizer(models.BPE())
    # GPT-2 style byte-level: every byte is representable, so no <unk> is ever needed.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],  # listed first -> ids 0 and 1, as the model config expects
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if (bos_id, eos_id) != (0, 1):
        raise RuntimeError(f"special token ids are {(bos_id, eos_id)}, expected (0, 1)")
    # Like DeepSeek's tokenizer, tokenizer("text") starts with BOS (no EOS appended).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
        clean_up_tokenization_spaces=False,  # cleanup would mangle code like "x ."
        model_max_length=1_000_000)
    hf.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    _verify(out_dir)
    return hf


def _verify(tok_dir: Path) -> None:
    """Reload from disk (what the training script will do) and check the invariants.

    Raises RuntimeError (not assert) so the checks also run under ``python -O``.
    """
    def check(ok: bool, what: str) -> None:
        if not ok:
            raise RuntimeError(f"tokenizer check failed: {what}")

    t = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = t(SAMPLE)["input_ids"]
    check(ids[0] == t.bos_token_id == 0 and t.eos_token_id == 1, f"BOS/EOS ids {ids[:3]}")
    check(t.decode(ids, skip_special_tokens=True) == SAMPLE, "byte-level round trip")
    check(t.decode(ids[1:]) == SAMPLE, "round trip without BOS")
    chat = t.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    check(chat == f"{BOS}User: hi\n\nAssistant:", repr(chat))
    full = t.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
         {"role": "assistant", "content": "a"}], tokenize=False)
    check(full == f"{BOS}S\n\nUser: q\n\nAssistant: a{EOS}", repr(full))


def count_tokens(tokenizer, jsonl: str | Path) -> int:
    """Content tokens over all documents (no BOS/EOS; the trainer adds one EOS per document)."""
    texts = [d["text"] for d in read_jsonl(jsonl)]
    backend = tokenizer.backend_tokenizer  # batch-encode in Rust; far faster than per-call wrapper
    return sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="dir with *.rst.txt sources")
    ap.add_argument("--out", required=True, help="output dir")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()

    t0 = time.perf_counter()
    out = Path(args.out)
    summary = build_corpus(args.source, out)
    tok = train_tokenizer(out / "train.jsonl", args.vocab_size, out / "tokenizer")
    for name in ("train", "valid"):
        summary[name]["tokens"] = count_tokens(tok, out / f"{name}.jsonl")
    summary.update(vocab_size=len(tok), tokenizer=str(out / "tokenizer"), checks="passed",
                   seconds=round(time.perf_counter() - t0, 2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Quantisation time per layer and peak memory on a synthetic checkpoint much larger than one
layer. Prints one JSON object.

    python bench/quantize.py --moe-layers 8 --experts 64 --hidden 1024 --width 704

The checkpoint (random bf16 weights, DeepSeek-MoE layout: a dense layer 0, then MoE layers
with 2 shared experts, top-6) is written one layer at a time, so writing it needs no more
memory than quantising it. Peak resident memory should track one layer plus the calibration
activations, not the model: compare `peak_rss_mib_so_far` across layers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine  # bench/ is on sys.path when a script runs

from moe_edge.checkpoint import ShardedWriter
from moe_edge.config import config_from_dict
from moe_edge.model.decoder import DecoderLayer
from moe_edge.quant.quantizer import QuantizeOptions, quantize
from moe_edge.testing import byte_tokenizer, deepseek_config


def write_synthetic(folder: Path, args) -> dict:
    raw = deepseek_config(vocab_size=512, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          moe_intermediate_size=args.width, num_hidden_layers=args.moe_layers + 1,
                          num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 128,
                          n_routed_experts=args.experts, num_experts_per_tok=6, torch_dtype="bfloat16")
    config = config_from_dict(raw)
    torch.manual_seed(0)
    with ShardedWriter(folder, max_shard_bytes=2**30) as w:
        w.add("model.embed_tokens.weight", torch.randn(512, args.hidden).bfloat16())
        w.add("model.norm.weight", torch.ones(args.hidden).bfloat16())
        w.add("lm_head.weight", (0.02 * torch.randn(512, args.hidden)).bfloat16())
        for layer in range(config.num_layers):
            for name, p in DecoderLayer(config, layer).named_parameters():
                t = torch.ones_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * p.shape[-1] ** -0.5
                w.add(f"model.layers.{layer}.{name}", t.bfloat16())
        w.write_json("config.json", raw)
        byte_tokenizer().save_pretrained(w.tmp)
        w.commit()
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe-layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=704)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="moe-edge-bench-"))
    if args.write_only:
        write_synthetic(root / "synthetic", args)
        return
    # written by a child process, so this process's peak memory is the quantizer's alone
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--workdir", str(root), "--write-only"],
                   check=True)
    write_s = time.perf_counter() - t0
    options = QuantizeOptions(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    result = quantize(root / "synthetic", root / "synthetic-gptq", options, overwrite=True)
    layers = result.report["layers"]
    checkpoint_bytes = sum(f.stat().st_size for f in (root / "synthetic").glob("*.safetensors"))
    print(json.dumps({
        "checkpoint_gib": round(checkpoint_bytes / 2**30, 2), "layers": len(layers),
        "experts": args.experts, "hidden": args.hidden, "width": args.width,
        "calibration_tokens": args.calib_samples * args.calib_seq_len, "write_seconds": round(write_s, 1),
        "seconds_per_layer": [l["seconds"] for l in layers],
        "peak_rss_mib_per_layer": [l["peak_rss_mib_so_far"] for l in layers],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "summary": {k: result.report["summary"][k] for k in ("size_before_bytes", "size_after_bytes",
                                                             "bits_per_weight", "median_sqnr_db")},
        "machine": machine(),
    }))


if __name__ == "__main__":
    main()

"""A trained model at real expert sizes: the bundled demo zero-padded to DeepSeek-MoE-16B's
widths, computing the same function (same logits up to float rounding, same experts picked).

    python bench/inflate.py moe_edge/demo/deepseek-moe-tiny-gptq build/demo-16b-gptq
    python bench/inflate.py moe_edge/demo/deepseek-moe-tiny build/demo-16b
    python bench/inflate.py moe_edge/demo/deepseek-moe-tiny-gptq build/demo-16b-x3-gptq --repeat 3

Offloading is only as good as the routing it meets: a random model routes near uniformly,
real ones reuse experts. This keeps the demo's trained routing and gives every expert the
16B model's bytes (hidden 2048, expert width 1408: 4.3 MiB at 4 bits), so a disk tier and
a memory limit meet real sizes and real reuse. How the function is kept:

- the original weights sit in the first rows/columns, zeros elsewhere; the residual stream's
  extra dimensions stay zero, so every matmul, router and softmax sees the original sums;
- RMSNorm over 16x the width sees mean(x^2)/16: its eps is divided by 16 and its weight by
  4 (both exact in binary floating point);
- head_dim grows 4x (32 -> 128, a power-of-4 multiple): dimension i of a rotate-half pair
  moves to 4i so it keeps its rotary frequency theta^(-2i/d), and q is doubled so that
  1/sqrt(128) * 2 = 1/sqrt(32); the extra heads have zero q, k, v and o columns;
- GPTQ tensors (a GPTQ source) are padded on the integer grid: padded weights get q equal
  to their zero point, so they dequantise to exactly 0; q_proj's scales are doubled.

`--repeat K` then stacks the MoE layers K times (the demo's 3 become 3K, each copy with its
trained weights and router), so the checkpoint is K times the size of the demo's 1 GB: a
model larger than a memory limit for every engine, llama.cpp's ~60 MB runtime included. It
no longer computes the demo's function (a copy of layer 1 meets layer 3's output), but its
routers are still trained ones reading a structured residual stream, not random ones.
"""
# H=hidden, Hd=head dim, I=MLP width, N=out features, K=in features, G=groups

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

from moe_edge.checkpoint import CheckpointReader, ShardedWriter
from moe_edge.quant.format import GPTQTensors, pack, unpack

TARGET = dict(hidden_size=2048, head_dim=128, intermediate_size=10944, moe_intermediate_size=1408)
GPTQ_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


class Inflation:
    """Index maps from the source's dimensions into the target's."""

    def __init__(self, config: dict, target: dict = TARGET):
        self.c, self.t = config, target
        H, heads = config["hidden_size"], config["num_attention_heads"]
        self.hd = H // heads
        self.factor = target["hidden_size"] // H
        head_factor = target["head_dim"] // self.hd
        if self.factor * H != target["hidden_size"] or round(self.factor ** 0.5) ** 2 != self.factor:
            raise ValueError(f"hidden {H} -> {target['hidden_size']}: needs a square factor (exact norms)")
        if head_factor * self.hd != target["head_dim"] or head_factor not in (1, 4, 16):
            raise ValueError(f"head_dim {self.hd} -> {target['head_dim']}: needs a power-of-4 factor")
        if target["hidden_size"] // target["head_dim"] < heads:
            raise ValueError("the target has fewer heads than the source")
        self.head_factor = head_factor
        self.hidden = torch.arange(H)
        half = self.hd // 2
        i = torch.arange(self.hd)
        within = torch.where(i < half, head_factor * i, target["head_dim"] // 2 + head_factor * (i - half))
        self.heads = (torch.arange(heads)[:, None] * target["head_dim"] + within).reshape(-1)  # [heads*Hd]

    def config(self) -> dict:
        c, t = dict(self.c), self.t
        heads = t["hidden_size"] // t["head_dim"]
        c.update(hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                 moe_intermediate_size=t["moe_intermediate_size"], num_attention_heads=heads,
                 num_key_value_heads=heads, rms_norm_eps=self.c["rms_norm_eps"] / self.factor)
        c.pop("head_dim", None)
        return c

    def maps(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[int, int], float]:
        """(row map, column map, new [N, K], scale) of a 2-D weight; maps are None for 'all'."""
        H2 = self.t["hidden_size"]
        proj = re.search(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|gate|embed_tokens|lm_head)"
                         r"\.(weight|qweight)$", name)
        if proj is None:
            raise ValueError(f"{name}: no rule to inflate this tensor")
        kind, width = proj[1], self._width(name)
        if kind in ("embed_tokens", "lm_head"):
            return None, self.hidden, (self.c["vocab_size"], H2), 1.0
        if kind == "gate":  # the router: every expert, hidden columns
            return None, self.hidden, (self.c["n_routed_experts"], H2), 1.0
        if kind in ("q_proj", "k_proj", "v_proj"):
            # q doubled per 4x head_dim: 1/sqrt(4 Hd) * 2 = 1/sqrt(Hd)
            scale = float(self.head_factor ** 0.5) if kind == "q_proj" else 1.0
            return self.heads, self.hidden, (H2, H2), scale
        if kind == "o_proj":
            return self.hidden, self.heads, (H2, H2), 1.0
        inner = torch.arange(self._old_width(name))
        if kind in ("gate_proj", "up_proj"):
            return inner, self.hidden, (width, H2), 1.0
        return self.hidden, inner, (H2, width), 1.0

    def _old_width(self, name: str) -> int:
        c = self.c
        if ".shared_experts." in name:
            return c["n_shared_experts"] * c["moe_intermediate_size"]
        return c["moe_intermediate_size"] if ".experts." in name else c["intermediate_size"]

    def _width(self, name: str) -> int:
        t, c = self.t, self.c
        if ".shared_experts." in name:
            return c["n_shared_experts"] * t["moe_intermediate_size"]
        return t["moe_intermediate_size"] if ".experts." in name else t["intermediate_size"]

    def dense(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if w.dim() == 1:  # a norm's weight over the hidden size
            out = torch.zeros(self.t["hidden_size"], dtype=w.dtype)
            out[self.hidden] = w / self.factor ** 0.5
            return out
        rows, cols, shape, scale = self.maps(name)
        out = torch.zeros(shape, dtype=w.dtype)
        out[_index(rows, shape[0])[:, None], _index(cols, shape[1])[None, :]] = w * scale
        return out

    def gptq(self, name: str, t: GPTQTensors, group: int) -> GPTQTensors:
        rows, cols, (N, K), scale = self.maps(name + ".qweight")
        q, zeros, scales, g_idx = unpack(t)  # [n, k], [g, n], [g, n], [k]
        rows, cols = _index(rows, N), _index(cols, K)
        G0, G = zeros.shape[0], -(-K // group)  # the format has ceil(K / group) groups
        g2 = torch.empty(K, dtype=torch.int64)
        g2[cols] = g_idx  # original columns keep their (act-order) groups; padding fills
        free = group - torch.bincount(g_idx, minlength=G0)  # the partial ones, then its own
        fill = torch.cat([torch.repeat_interleave(torch.arange(G0), free), torch.arange(G0, G).repeat_interleave(group)])
        padded = torch.ones(K, dtype=torch.bool)
        padded[cols] = False
        g2[padded] = fill[: int(padded.sum())]
        z2 = torch.full((G, N), 8, dtype=zeros.dtype)
        z2[:G0, rows] = zeros
        s2 = torch.ones(G, N, dtype=scales.dtype)
        s2[:G0, rows] = scales * scale  # x2: exact in fp16
        q2 = z2.T.gather(1, g2.expand(N, K)).to(q.dtype)  # padding at its zero point: weight 0
        q2[rows[:, None], cols[None, :]] = q
        return pack(q2, z2, s2, g2)


def _index(m: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.arange(n) if m is None else m


def inflate(src: Path, dst: Path, target: dict = TARGET) -> Path:
    """Write the inflated copy of checkpoint `src` to `dst` (config, weights, tokenizer)."""
    config = json.loads((src / "config.json").read_text())
    inf = Inflation(config, target)
    reader = CheckpointReader(src)
    quant = config.get("quantization_config")
    names = sorted(reader.keys())
    linears = sorted({n[: -len(".qweight")] for n in names if n.endswith(".qweight")})
    with ShardedWriter(dst, max_shard_bytes=2**30, overwrite=True) as w:
        for name in names:
            if name.endswith(GPTQ_PARTS):
                continue
            w.add(name, inf.dense(name, reader.get(name)))
        for base in linears:
            t = GPTQTensors(*(reader.get(base + p) for p in GPTQ_PARTS))
            for part, tensor in zip(GPTQ_PARTS, _fields(inf.gptq(base, t, quant["group_size"]))):
                w.add(base + part, tensor)
        w.write_json("config.json", inf.config())
        w.commit()
    _copy_side_files(src, dst, skip=("quantiz",))
    if quant is not None:
        (dst / "quantize_config.json").write_text(json.dumps(quant, indent=2))
    return dst


def repeat_layers(src: Path, dst: Path, repeats: int) -> Path:
    """`src` with its MoE layers stacked `repeats` times (dense leading layers once)."""
    config = json.loads((src / "config.json").read_text())
    lead, layers = config.get("first_k_dense_replace", 0), config["num_hidden_layers"]
    reader = CheckpointReader(src)
    layer_of = re.compile(r"^model\.layers\.(\d+)\.")
    with ShardedWriter(dst, max_shard_bytes=2**30, overwrite=True) as w:
        for name in sorted(reader.keys()):
            m = layer_of.match(name)
            if m is None:
                w.add(name, reader.get(name))
                continue
            i = int(m[1])
            copies = [i] if i < lead else [i + r * (layers - lead) for r in range(repeats)]
            tensor = reader.get(name)
            for j in copies:  # each copy its own storage (safetensors refuses shared memory)
                w.add(f"model.layers.{j}.{name[m.end():]}", tensor.clone())
        w.write_json("config.json", {**config, "num_hidden_layers": lead + repeats * (layers - lead)})
        w.commit()
    _copy_side_files(src, dst)
    return dst


def _copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """The tokenizer, chat template and generation config (not config.json or the weights' index)."""
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") and not f.name.startswith(("config", "model.", *skip)):
            shutil.copy(f, dst / f.name)


def _fields(t: GPTQTensors) -> tuple[torch.Tensor, ...]:
    return t.qweight, t.qzeros, t.scales, t.g_idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--repeat", type=int, default=1, help="stack the MoE layers this many times")
    args = ap.parse_args()
    if args.repeat > 1:
        once = inflate(args.src, args.dst.with_name(args.dst.name + ".once"))
        out = repeat_layers(once, args.dst, args.repeat)
        shutil.rmtree(once)
    else:
        out = inflate(args.src, args.dst)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"src": str(args.src), "dst": str(out), "bytes": size,
                      "config": json.loads((out / "config.json").read_text())}, default=str))


if __name__ == "__main__":
    main()

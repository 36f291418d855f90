"""Train the small DeepSeek-MoE demo model with moe_edge.model itself, on 2 CPU cores.

Architecture: model_type `deepseek` as DESIGN.md describes it, scaled down: a dense first
layer, then MoE layers of 64 routed experts (top-6, softmax without renormalisation) plus
2 shared experts. Corpus and tokenizer come from scripts/demo_data.py (the Python 3.11
documentation sources from Debian's python3.11-doc package, PSF License).

A Switch-Transformer load-balancing loss (Fedus et al. 2021: E * sum_e f_e * P_e) keeps
all 64 experts in use, so the routing the offload cache sees is that of a trained model.

    python scripts/train_demo_model.py --minutes 50 --out moe_edge/demo/deepseek-moe-tiny
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_data  # noqa: E402

from moe_edge.checkpoint import ShardedWriter  # noqa: E402
from moe_edge.config import config_from_dict  # noqa: E402
from moe_edge.evaluate import mean_nll  # noqa: E402
from moe_edge.model import MoEForCausalLM, Router  # noqa: E402

DEMO_CONFIG = {
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
    "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 384,
    "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "attention_bias": False, "attention_dropout": 0.0,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "torch_dtype": "bfloat16", "use_cache": True,
}


def token_stream(tokenizer, jsonl: Path) -> torch.Tensor:
    """All documents as one stream: BOS text EOS, BOS text EOS, ..."""
    ids = []
    for doc in demo_data.read_jsonl(jsonl):
        ids.extend(tokenizer(doc["text"])["input_ids"])  # starts with BOS
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def init_weights(model: MoEForCausalLM, std: float = 0.02) -> None:
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=std)


class BalanceLoss:
    """Collects each router's probabilities during forward; loss = E * sum_e f_e * P_e."""

    def __init__(self, model: MoEForCausalLM):
        self.terms: list[torch.Tensor] = []
        for module in model.modules():
            if isinstance(module, Router):
                module.register_forward_hook(self._hook)

    def _hook(self, router: Router, inputs, outputs) -> None:
        probs = router.probs(inputs[0])  # [N, E]
        _, ids = outputs
        E = probs.shape[1]
        load = torch.bincount(ids.reshape(-1), minlength=E).float() / ids.numel()  # f_e
        self.terms.append(E * (load * probs.mean(0)).sum())

    def pop(self) -> torch.Tensor:
        loss = torch.stack(self.terms).mean()
        self.terms = []
        return loss


def evaluate(model: MoEForCausalLM, stream: torch.Tensor, seq_len: int, batch: int) -> float:
    """Mean next-token cross-entropy over non-overlapping windows of the held-out stream."""
    model.eval()
    loss = mean_nll(model, stream, seq_len, batch)
    model.train()
    return loss


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% over `progress` in [0, 1]."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def progress_of(step: int, steps: int, elapsed: float, minutes: float) -> float:
    """Whichever budget runs out first, steps or wall-clock time (the machine is shared)."""
    return max(step / steps, elapsed / (minutes * 60) if minutes else 0.0)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "tokenizer").exists():
        demo_data.build_corpus(args.source, data)
        demo_data.train_tokenizer(data / "train.jsonl", DEMO_CONFIG["vocab_size"], data / "tokenizer")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    train_ids, valid_ids = token_stream(tokenizer, data / "train.jsonl"), token_stream(tokenizer, data / "valid.jsonl")
    config = config_from_dict(DEMO_CONFIG)
    model = MoEForCausalLM(config)
    init_weights(model)
    balance = BalanceLoss(model)
    untrained = evaluate(model, valid_ids, args.seq_len, args.batch)
    balance.terms = []
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    steps, t0, step, losses = args.steps, time.time(), 0, []
    gen = torch.Generator().manual_seed(args.seed)
    while step < steps:
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + args.seq_len] for s in starts])
        y = torch.stack([train_ids[s + 1:s + args.seq_len + 1] for s in starts])
        progress = progress_of(step, steps, time.time() - t0, args.minutes)
        if progress >= 1:
            print(json.dumps({"stopped": "budget", "step": step}), flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, args.lr, args.warmup)
        ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss = ce + args.balance * balance.pop()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(ce.item())
        step += 1
        elapsed = time.time() - t0
        if step % args.log_every == 0 or step == steps:
            print(json.dumps({"step": step, "loss": round(sum(losses[-args.log_every:]) / len(losses[-args.log_every:]), 4),
                              "lr": round(opt.param_groups[0]["lr"], 6),
                              "elapsed_s": round(elapsed, 1)}), flush=True)
    return dict(model=model, tokenizer=tokenizer, valid_ids=valid_ids, untrained=untrained,
                steps=step, losses=losses, seconds=time.time() - t0, train_tokens=len(train_ids))


def save(result: dict, args) -> Path:
    model, tokenizer = result["model"], result["tokenizer"]
    out = Path(args.out)
    with ShardedWriter(out, overwrite=True) as w:
        for name, p in model.state_dict().items():
            w.add(name, p.detach().to(torch.bfloat16))
        w.write_json("config.json", DEMO_CONFIG)
        w.write_json("generation_config.json", {
            "bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.7,
            "top_p": 0.95, "max_new_tokens": 128})
        tokenizer.save_pretrained(str(w.tmp))
        w.commit()
    return out


def report(result: dict, args, out: Path) -> dict:
    """Held-out loss of the saved (bf16) weights, reloaded the way users load them."""
    tokens_seen = result["steps"] * args.batch * args.seq_len
    info = {
        "corpus": "Python 3.11 documentation sources (Debian python3.11-doc, PSF License)",
        "train_tokens": result["train_tokens"], "valid_tokens": len(result["valid_ids"]),
        "tokens_seen": tokens_seen, "epochs": round(tokens_seen / result["train_tokens"], 2),
        "steps": result["steps"], "batch": args.batch, "seq_len": args.seq_len,
        "final_train_loss": round(sum(result["losses"][-50:]) / len(result["losses"][-50:]), 4),
        "untrained_valid_ppl": round(math.exp(result["untrained"]), 2),
        "train_seconds": round(result["seconds"], 1), "threads": args.threads,
        "parameters": sum(p.numel() for p in result["model"].parameters()),
    }
    (out / "training_report.json").write_text(json.dumps(info, indent=2) + "\n")
    from moe_edge.api import load
    valid_loss = evaluate(load(out).model, result["valid_ids"], args.seq_len, args.batch)
    info.update(valid_loss=round(valid_loss, 4), valid_ppl=round(math.exp(valid_loss), 2))
    (out / "training_report.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="build/demo_data")
    ap.add_argument("--source", default=demo_data.DEFAULT_SOURCE)
    ap.add_argument("--out", default="moe_edge/demo/deepseek-moe-tiny")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--minutes", type=float, default=0, help="stop early after this long")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--balance", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args()
    result = train(args)
    out = save(result, args)
    print(json.dumps(report(result, args, out)), flush=True)


if __name__ == "__main__":
    main()

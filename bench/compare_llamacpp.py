"""moe-edge against llama.cpp on the same weights: greedy agreement, then speed. Prints JSON.

    python bench/compare_llamacpp.py build/demo-gptq --gguf-from moe_edge/demo/deepseek-moe-tiny \
        --check moe_edge/demo/deepseek-moe-tiny --out build/bench_llamacpp_demo.json
    flock /tmp/moe-edge-heavy.lock python bench/compare_llamacpp.py \
        build/deepseek-16b-synthetic-gptq --repeats 2 --out build/bench_llamacpp_16b.json

MODEL (a GPTQ checkpoint) runs in moe-edge; llama.cpp (llama-cpp-python, `pip install
.[llamacpp]`) runs a Q4_0 GGUF written from --gguf-from (default MODEL; GPTQ is dequantised
first) by bench/_gguf.py, kept in build/gguf/ and reused. Each run is its own subprocess, so
each engine's resident memory is its own and two large models never coexist; engines
alternate A/B/A/B. A run: load, warm up (16-token prompt, 4 tokens), then one greedy decode
of --new-tokens after a random --prompt-tokens prompt (the same ids for both), EOS off.
Effective bandwidth = weight bytes a decode token reads (all but the embedding table,
routed experts at top_k/E) x decode tokens/s, each engine counting its own storage.

Threads: on a shared machine prefer --threads 1. With 2 threads on 2 cores, both engines
wait for each other's threads in spinning barriers; when another process takes a core, a run
slows by 10-100x (llama.cpp more than torch). Each run records the 1-minute load average.

--check FOLDER (unquantised, small) first writes an F32 GGUF of FOLDER and compares
moe-edge in fp32 with llama.cpp on it: free-running greedy tokens after a held-out prompt,
and teacher-forced argmax/logits along moe-edge's sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

# torch, moe_edge and bench/_gguf (which needs both) are imported where used, so that the
# llama.cpp worker's resident memory is llama.cpp's alone.

ENGINES = ("moe-edge", "llama.cpp")
GGUF_DIR = Path("build/gguf")


def memory() -> dict:
    """This process's resident memory in MiB: now, peak, anonymous and file-backed (mmap), and
    how much of it is on transparent huge pages (weights streamed from 4 KiB pages read slower)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kib = lambda key: round(int(status[key].split()[0]) / 1024, 1) if key in status else None
    huge = [line.split()[1] for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
            if line.startswith("AnonHugePages:")]
    return {"rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1), "peak_rss_mib": kib("VmHWM"),
            "rss_anon_mib": kib("RssAnon"), "rss_file_mib": kib("RssFile"),
            "rss_huge_mib": round(int(huge[0]) / 1024, 1) if huge else None}


# ---- llama.cpp ------------------------------------------------------------------------------

# llama.cpp puts 2-D Q4_0/Q8_0 matmul weights in its AMX buffer when the CPU reports AMX.
# On this machine (Xeon, AMX in a VM) that kernel segfaults as soon as a batch has more than
# one row (prefill), while one row (decode) works. So those weights go to CPU_REPACK (the
# AVX2/AVX512 Q4_0 8x8 layout that MoE expert tensors use anyway); --llama-amx turns this off.
# output.weight (Q8_0, no CPU_REPACK layout on x86) stays in AMX: it sees one row per step,
# since only the last position's logits are computed (never use logits_all on a Q4_0 file).
NO_AMX = r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down)(_shexp)?)\.weight$"


def _buft_overrides(pattern: str, buft_name: bytes):
    """A NULL-terminated llama_model_tensor_buft_override[] sending `pattern` to `buft_name`."""
    import ctypes

    import llama_cpp
    # the sonames libllama loaded: the wheel's libggml-*.so are separate copies, not links
    lib = Path(llama_cpp.__file__).parent / "lib"
    cpu, base = ctypes.CDLL(str(lib / "libggml-cpu.so.0")), ctypes.CDLL(str(lib / "libggml-base.so.0"))
    cpu.ggml_backend_cpu_reg.restype = ctypes.c_void_p
    base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    reg = cpu.ggml_backend_cpu_reg()
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(
        base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts"))
    bufts = get_extra(base.ggml_backend_reg_dev_get(reg, 0))  # NULL-terminated
    found = next((bufts[i] for i in range(16) if bufts[i] and
                  base.ggml_backend_buft_name(bufts[i]) == buft_name), None)
    if found is None:
        print(f"llama.cpp offers no {buft_name.decode()} buffer here; weights stay where it puts "
              "them", file=sys.stderr)
        return None

    class Override(ctypes.Structure):
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]
    return (Override * 2)(Override(pattern.encode(), found), Override(None, None))


def llama_open(path: str, context: int, threads: int, logits_all: bool = False,
               flash_attn: bool = False, mmap: bool = False, avoid_amx: bool = False, repack: bool = True):
    """A llama_cpp.Llama; `avoid_amx` (for Q4_0 files only: CPU_REPACK has no F32 layout)
    moves the dense Q4_0 weights from the AMX buffer to CPU_REPACK; `repack` False
    (`use_extra_bufts`) keeps every weight in the file's own layout (with mmap: file pages)."""
    import ctypes

    import llama_cpp.llama_cpp as api
    from llama_cpp import Llama
    overrides = _buft_overrides(NO_AMX, b"CPU_REPACK") if avoid_amx else None
    default_params = api.llama_model_default_params

    def with_overrides():  # Llama() offers no way to pass tensor_buft_overrides
        params = default_params()
        params.use_extra_bufts = repack
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.addressof(overrides)
        return params
    api.llama_model_default_params = with_overrides
    try:
        llm = Llama(model_path=str(path), n_ctx=context, n_batch=512, n_ubatch=512, n_threads=threads,
                    n_threads_batch=threads, logits_all=logits_all, flash_attn=flash_attn,
                    use_mmap=mmap, verbose=False)
    finally:
        api.llama_model_default_params = default_params
    llm._buft_overrides = overrides  # llama.cpp keeps the pointer: keep the array alive
    return llm


def llama_last_logits(llm) -> np.ndarray:
    import llama_cpp
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_greedy(llm, prompt: list[int], new_tokens: int,
                 after_prefill=lambda: None) -> tuple[list[int], float, float]:
    """(tokens, prompt seconds, decode seconds), timed as moe-edge times itself: the first
    token ends the prompt phase, the rest are decode steps (`after_prefill` runs between)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    out = [int(np.argmax(llama_last_logits(llm)))]
    after_prefill()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([out[-1]])
        out.append(int(np.argmax(llama_last_logits(llm))))
    return out, t1 - t0, time.perf_counter() - t1


def run_llama(args, prompt: list[int]) -> dict:
    t0 = time.perf_counter()
    llm = llama_open(args.gguf, len(prompt) + args.new_tokens + 8, args.threads,
                     flash_attn=args.flash_attn, mmap=args.llama_mmap,
                     avoid_amx=not args.llama_amx)
    load_s = time.perf_counter() - t0
    llama_greedy(llm, prompt[:16], 4)  # warm-up
    tokens, p_s, d_s = llama_greedy(llm, prompt, args.new_tokens)
    return {"load_s": round(load_s, 2), "prompt_tps": len(prompt) / p_s,
            "decode_tps": (len(tokens) - 1) / d_s, "tokens": tokens[:8], **memory()}


# ---- moe-edge -------------------------------------------------------------------------------

def moe_edge_active_bytes(model) -> int:
    """Bytes of parameters and buffers one decode token reads (model as loaded)."""
    c, total = model.config, 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name or t is None:
            continue
        n = t.numel() * t.element_size()
        total += n * c.top_k // c.num_experts if ".mlp.experts." in name else n
    return total


def run_moe_edge(args, prompt: list[int]) -> dict:
    import torch

    import moe_edge
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = moe_edge.load(args.model, device="cpu", lm_head=args.lm_head)
    load_s = time.perf_counter() - t0
    greedy = dict(temperature=0, repetition_penalty=1.0, stop=(), eos_token_ids=())
    lm.generate(prompt[:16], max_new_tokens=4, **greedy)  # warm-up
    r = lm.generate(prompt, max_new_tokens=args.new_tokens, **greedy)
    mem = memory()
    return {"load_s": round(load_s, 2), "prompt_tps": r.prompt_tps, "decode_tps": r.decode_tps,
            "tokens": r.token_ids[:8], **mem, "active_bytes": moe_edge_active_bytes(lm.model),
            "kernels": lm.model.quant_kernels, "lm_head_int8": lm.model.lm_head_int8}


def worker(args) -> None:
    prompt = json.loads(Path(args.prompt_file).read_text())
    result = (run_moe_edge if args.worker == "moe-edge" else run_llama)(args, prompt)
    print(json.dumps(result))


def spawn(engine: str, args, prompt_file: str) -> dict:
    cmd = [sys.executable, __file__, args.model, "--worker", engine, "--prompt-file", prompt_file,
           "--gguf", str(args.gguf), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads)]
    cmd += [flag for flag, on in (("--flash-attn", args.flash_attn), ("--llama-mmap", args.llama_mmap),
                                  ("--llama-amx", args.llama_amx)) if on]
    cmd += ["--lm-head", args.lm_head]
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{engine} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]),
            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


# ---- greedy agreement on fp32 ---------------------------------------------------------------

def greedy_check(folder: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """moe-edge fp32 vs llama.cpp on an F32 GGUF of the same weights."""
    import torch

    import moe_edge
    from moe_edge.evaluate import heldout_ids
    torch.set_num_threads(threads)
    gguf = ensure_gguf(folder, "F32")
    lm = moe_edge.load(folder, device="cpu", dtype="float32", bf16_weights=False,
                       lm_head="stored")  # all fp32
    prompt = heldout_ids(lm.tokenizer, max_tokens=prompt_tokens).tolist()
    ours = lm.generate(prompt, temperature=0, repetition_penalty=1.0, stop=(), eos_token_ids=(),
                       max_new_tokens=new_tokens).token_ids
    llm = llama_open(gguf, len(prompt) + new_tokens + 8, threads)
    theirs, _, _ = llama_greedy(llm, prompt, new_tokens)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    return {"gguf": str(gguf), "prompt_tokens": len(prompt), "new_tokens": new_tokens,
            "matching_tokens": sum(a == b for a, b in zip(ours, theirs)),
            "first_divergence": first, "moe_edge_tokens": ours, "llama_cpp_tokens": theirs,
            **teacher_forced(lm.model, gguf, prompt + ours, threads)}


def teacher_forced(model, gguf: Path, seq: list[int], threads: int) -> dict:
    """Both engines' logits at every position of one sequence: argmax agreement, max |diff|."""
    import torch
    with torch.inference_mode():
        ours = model(torch.tensor([seq]))[0].float().numpy()  # [T, V]
    llm = llama_open(gguf, len(seq) + 8, threads, logits_all=True)
    llm.eval(seq)
    theirs = np.asarray(llm.scores[: len(seq)], dtype=np.float32)
    diff = np.abs(ours - theirs)
    top2 = np.sort(ours, axis=-1)[:, -2:]
    return {"teacher_forced_positions": len(seq),
            "teacher_forced_argmax_agree": int((ours.argmax(-1) == theirs.argmax(-1)).sum()),
            "logits_max_abs_diff": float(diff.max()), "logits_mean_abs_diff": float(diff.mean()),
            "logits_scale_mean_abs": float(np.abs(ours).mean()),
            "min_top2_margin_moe_edge": float((top2[:, 1] - top2[:, 0]).min())}


# ---- orchestration --------------------------------------------------------------------------

def ensure_gguf(folder: str, out_type: str, path: Path | None = None) -> Path:
    """`folder` as a GGUF file of `out_type` in build/gguf/ (written once, then reused):
    F32, F16 and Q4_0 by bench/_gguf.py; Q4_K_M (what users download) by llama.cpp's own
    quantizer from the F16 file, as `llama-quantize` makes it."""
    from _gguf import write_gguf  # bench/ is on sys.path when a script runs
    path = path or GGUF_DIR / f"{Path(folder).name}-{out_type.lower()}.gguf"
    if out_type == "Q4_K_M" and not path.exists():
        llama_quantize(ensure_gguf(folder, "F16"), path, out_type)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        info = write_gguf(folder, path, out_type, log=lambda s: print(f"gguf {path.name}: {s}", file=sys.stderr))
        print(f"wrote {path} ({info['bytes'] / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s): "
              f"{info['tensor_types']}; vocab: {info['vocab']}", file=sys.stderr)
    return path


def llama_quantize(src: Path, out: Path, out_type: str) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{out_type}")
    params.nthread = os.cpu_count() or 1
    tmp = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {out_type} failed")
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s) "
          f"with llama.cpp's quantizer", file=sys.stderr)


def summarise(runs: list[dict], engine: str, active: int) -> dict:
    mine = [r for r in runs if r["engine"] == engine]
    med = lambda key: statistics.median(r[key] for r in mine)
    out = {k: round(med(k), 2) for k in ("prompt_tps", "decode_tps", "rss_mib", "peak_rss_mib",
                                          "rss_anon_mib", "rss_file_mib", "load_s")}
    out["active_weight_bytes_per_token"] = active
    out["effective_gb_per_s"] = round(active * out["decode_tps"] / 1e9, 4)
    return out


def benchmark(args) -> dict:
    from _gguf import active_bytes

    from moe_edge.config import load_config
    config = load_config(args.model)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(2, config.vocab_size, args.prompt_tokens).tolist()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompt, f)
    runs = []
    for rep in range(args.repeats):
        for engine in ENGINES:
            r = spawn(engine, args, f.name)
            runs.append({"engine": engine, "repeat": rep, **r})
            print(f"{engine} #{rep}: prompt {r['prompt_tps']:.1f} tok/s, decode {r['decode_tps']:.2f} "
                  f"tok/s, rss {r['rss_mib']:.0f} MiB ({r['rss_huge_mib']} on huge pages)", file=sys.stderr)
    Path(f.name).unlink()
    ours = summarise(runs, "moe-edge", runs[0]["active_bytes"])
    theirs = summarise(runs, "llama.cpp", active_bytes(args.gguf, config.top_k, config.num_experts))
    ratio = lambda k: round(ours[k] / theirs[k], 3) if theirs[k] else None
    return {"moe_edge": ours, "llama_cpp": theirs,
            "ratios_moe_edge_over_llama_cpp": {k: ratio(k) for k in ("prompt_tps", "decode_tps", "rss_mib",
                                                                      "peak_rss_mib", "effective_gb_per_s")},
            "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the GPTQ checkpoint moe-edge runs")
    ap.add_argument("--gguf-from", default=None, help="checkpoint to convert for llama.cpp (default MODEL)")
    ap.add_argument("--gguf", type=Path, default=None, help="Q4_0 GGUF path (written if missing)")
    ap.add_argument("--check", default=None, help="unquantised checkpoint for the fp32 greedy check")
    ap.add_argument("--check-prompt-tokens", type=int, default=32)
    ap.add_argument("--check-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lm-head", choices=["auto", "int8", "stored"], default="auto",
                    help="moe-edge's lm_head (auto: int8 for large heads; llama.cpp's GGUF keeps it in Q8_0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (default off)")
    ap.add_argument("--llama-mmap", action="store_true",
                    help="let llama.cpp mmap the GGUF (default: read it into memory, like moe-edge)")
    ap.add_argument("--llama-amx", action="store_true",
                    help="let llama.cpp use its AMX kernels (they crash on prefill on this machine)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import llama_cpp
    from _machine import emit, machine
    args.gguf = ensure_gguf(args.gguf_from or args.model, "Q4_0", args.gguf)
    result = {"model": args.model, "gguf": str(args.gguf), "gguf_from": args.gguf_from or args.model,
              "gguf_bytes": args.gguf.stat().st_size, "threads": args.threads,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "llama_cpp_python": llama_cpp.__version__, "llama_flash_attn": args.flash_attn,
              "llama_mmap": args.llama_mmap, "llama_amx": args.llama_amx, "moe_edge_lm_head": args.lm_head,
              "machine": machine()}
    if args.check:
        result["greedy_f32"] = greedy_check(args.check, args.check_prompt_tokens, args.check_new_tokens,
                                            args.threads)
    result.update(benchmark(args))
    emit(result, args.out)


if __name__ == "__main__":
    main()

"""LLM pruning at real size: disk-streamed vs in-memory, resume after SIGKILL, 7B- and 13B-class checkpoints.

Every measured job runs in its own child process, which reports its wall time, its time split (forward passes,
solver, reading/writing) and its peak resident memory (VmHWM). Parts:

* ``smollm2``: the bundled SmolLM2-135M (stored fp32), Wanda and SparseGPT 50% with 32 x 256 calibration tokens:
  in-memory (load + prune + save) vs streamed; sha256 of the output tensors, perplexity on held-out plays; a
  streamed SparseGPT run SIGKILLed after block 10 and resumed, against the uninterrupted one.
* ``7b``: a Llama of 7B-class shapes (hidden 4096, 32 layers, intermediate 11008, 32 heads / 8 kv heads,
  vocab 32000), random weights generated here and stored in bf16; Wanda 50% (and SparseGPT 50%) with 8 x 128
  calibration tokens, streamed; ``--peer`` adds llm-compressor's Wanda on the same checkpoint and tokens.
* ``13b``: 13B-class shapes (hidden 5120, 40 layers, intermediate 13824, 40 heads), bf16 (~26 GB, more than
  this machine's RAM), Wanda 50% streamed.

    .venv/bin/python benchmarks/llm_scale.py --parts smollm2
    .venv/bin/python benchmarks/llm_scale.py --parts 7b --work /var/tmp/prunekit-scale [--peer]
    .venv/bin/python benchmarks/llm_scale.py --parts 13b --work /var/tmp/prunekit-scale

Results are merged into benchmarks/results/llm_scale.json and the table benchmarks/results/llm_scale.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
}


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores {cpu}, {mem:.0f} GiB RAM, {platform.system()}"


# ---------------------------------------------------------------- child jobs (one process each)

def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))


def _ids(path: str, samples: int, seqlen: int):
    from transformers import AutoTokenizer

    from prunekit.api import _windows_from_text

    tok = AutoTokenizer.from_pretrained(path)
    return _windows_from_text(tok, "shakespeare", samples, seqlen, 0, None)


def child(spec: dict) -> dict:
    import torch

    from prunekit.core.progress import set_quiet

    set_quiet(True)
    rec = spec["recipe"]
    ids = _ids(spec["model"], spec["samples"], spec["seqlen"])
    t0 = time.perf_counter()
    out: dict = {}
    if spec["job"] == "memory":
        from prunekit import api, io

        model, tok = io.load_any(spec["model"])
        t1 = time.perf_counter()
        model, rep = api.prune(model, rec, ids, progress=False)
        t2 = time.perf_counter()
        io.save(model, tok, spec["out"], {"recipe": rep.recipe}, overwrite=True)
        out["times"] = {"load_s": t1 - t0, **rep.times, "write_s": time.perf_counter() - t2}
    elif spec["job"] in ("stream", "kill", "resume"):
        from prunekit.stream import engine, prune_checkpoint

        if spec["job"] == "kill":
            def kill(bi):
                if bi == spec["kill_at"]:
                    os.kill(os.getpid(), signal.SIGKILL)

            engine._after_commit = kill
        rep = prune_checkpoint(spec["model"], spec["out"], rec, ids, progress=False, overwrite=True,
                               resume=spec["job"] == "resume", offload_dir=spec.get("offload_dir"))
        out["times"] = rep.times
        out["resumed_at_block"] = rep.summary["stream"]["resumed_at_block"]
        out["disk_bytes"] = rep.summary["disk_bytes"]
    elif spec["job"] == "peer":
        sys.path.insert(0, str(HERE))
        from peers_llmcompressor import run_llmcompressor
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16).eval()
        t1 = time.perf_counter()
        secs = run_llmcompressor(model, rec["method"], rec.get("sparsity", 0.5), rec.get("pattern", "unstructured"), ids)
        t2 = time.perf_counter()
        model.save_pretrained(spec["out"])
        out["times"] = {"load_s": t1 - t0, "prune_s": secs, "write_s": time.perf_counter() - t2}
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_gib"] = _peak_kib() / 2**20
    return out


def run_child(spec: dict, timeout: float | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                           env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s (time limit of this benchmark)", "wall_s": time.perf_counter() - t0}
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        return {"error": f"exit {p.returncode}: {' | '.join(tail)[-400:]}", "wall_s": time.perf_counter() - t0,
                "returncode": p.returncode}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- helpers

def digest(d: Path) -> str:
    from safetensors import safe_open

    h = hashlib.sha256()
    names = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                names[k] = f
    for k in sorted(names):
        with safe_open(str(names[k]), framework="pt") as fh:
            t = fh.get_tensor(k)
        h.update(k.encode())
        h.update(t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def perplexity_of(d: Path, windows) -> float:
    from prunekit.evaluate import perplexity
    from prunekit.io import load_any

    model, _ = load_any(d)
    return perplexity(model, windows, progress=False)


def block_bytes_fp32(shape: dict) -> int:
    h, i, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    hd = h // shape["num_attention_heads"]
    return 4 * (2 * h * h + 2 * h * kv * hd + 3 * h * i + 2 * h)


def make_checkpoint(path: Path, shape: dict) -> float:
    """A Llama of ``shape`` with random weights (std 0.02, norms 1), stored in bf16 one shard per block."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "model.safetensors.index.json").is_file():
        return 0.0
    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(tmp)
    sys.path.insert(0, str(HERE.parent))
    from tests.conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)
    h, i, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    hd = h // shape["num_attention_heads"]
    n = shape["num_hidden_layers"]
    weight_map, total = {}, 0

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    for b in range(n + 1):
        if b < n:
            p = f"model.layers.{b}."
            t = {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv * hd, h),
                 p + "self_attn.v_proj.weight": rnd(kv * hd, h), p + "self_attn.o_proj.weight": rnd(h, h),
                 p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                 p + "mlp.down_proj.weight": rnd(h, i),
                 p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        else:
            t = {"model.embed_tokens.weight": rnd(shape["vocab_size"], h), "lm_head.weight": rnd(shape["vocab_size"], h),
                 "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
        name = f"model-{b + 1:05d}-of-{n + 1:05d}.safetensors"
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        for k, v in t.items():
            weight_map[k] = name
            total += v.numel() * 2
        print(f"  generated shard {b + 1}/{n + 1}", end="\r", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    os.replace(tmp, path)
    print()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- parts

def part_smollm2(results: dict, args) -> None:
    from prunekit.batches import evaluation_windows, tokenize
    from prunekit.zoo import load_model, load_text
    from prunekit.zoo.models import smollm2_dir

    src = smollm2_dir()
    work = Path(args.work) / "smollm2"
    work.mkdir(parents=True, exist_ok=True)
    _, tok = load_model("smollm2-135m")
    windows = evaluation_windows(tokenize(tok, load_text("shakespeare", "evaluation")), 256, 16)
    rows = []
    for method in ("wanda", "sparsegpt"):
        rec = {"method": method, "sparsity": 0.5}
        base = {"model": str(src), "recipe": rec, "samples": 32, "seqlen": 256}
        row = {"method": method}
        for job in ("memory", "stream"):
            r = run_child({**base, "job": job, "out": str(work / f"{method}-{job}")})
            row[job] = r
            print(f"smollm2 {method:<9} {job:<7} wall {r.get('wall_s', 0):6.1f} s  peak {r.get('peak_rss_gib', 0):.2f} GiB  {r.get('error', '')}")
        row["sha256_memory"] = digest(work / f"{method}-memory")
        row["sha256_stream"] = digest(work / f"{method}-stream")
        row["identical"] = row["sha256_memory"] == row["sha256_stream"]
        row["ppl_memory"] = perplexity_of(work / f"{method}-memory", windows)
        row["ppl_stream"] = perplexity_of(work / f"{method}-stream", windows)
        row["wall_ratio"] = row["stream"]["wall_s"] / row["memory"]["wall_s"]
        print(f"  identical tensors {row['identical']}  perplexity {row['ppl_memory']:.4f} vs {row['ppl_stream']:.4f}  "
              f"streamed / in-memory wall {row['wall_ratio']:.3f}")
        if method == "sparsegpt":
            k = run_child({**base, "job": "kill", "kill_at": 10, "out": str(work / "killed")})
            row["killed"] = {"returncode": k.get("returncode"), "error": k.get("error")}
            r = run_child({**base, "job": "resume", "out": str(work / "killed")})
            row["resumed"] = r
            row["sha256_resumed"] = digest(work / "killed")
            row["resume_identical"] = row["sha256_resumed"] == row["sha256_stream"]
            print(f"  killed after block 10 (exit {k.get('returncode')}), resumed at block {r.get('resumed_at_block')} in "
                  f"{r.get('wall_s', 0):.1f} s: identical to uninterrupted {row['resume_identical']}")
        rows.append(row)
    cfg = json.loads((src / "config.json").read_text())
    results["smollm2"] = {"rows": rows, "block_fp32_bytes": block_bytes_fp32({**cfg}),
                          "activation_bytes": 32 * 256 * cfg["hidden_size"] * 4}


def part_big(results: dict, args, name: str) -> None:
    shape = SHAPES[name]
    key = name
    if args.layers:  # peak memory does not grow with depth: a few blocks of the same shapes measure it quicker
        shape, key = {**shape, "num_hidden_layers": args.layers}, f"{name}-{args.layers}layers"
    work = Path(args.work)
    src = work / f"llama-{key}-bf16"
    gen_s = make_checkpoint(src, shape)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"{name}: checkpoint {src} {size / 2**30:.2f} GiB bf16 (generated in {gen_s:.0f} s)" if gen_s else
          f"{name}: checkpoint {src} {size / 2**30:.2f} GiB bf16 (cached)")
    act = 8 * 128 * shape["hidden_size"] * 4
    target = 2 * block_bytes_fp32(shape) + act + 1.5 * 2**30
    entry = {"shape": shape, "checkpoint_gib": size / 2**30, "generate_s": gen_s, "samples": 8, "seqlen": 128,
             "target_peak_gib": target / 2**30, "runs": []}
    methods = args.big_methods.split(",") if name == "7b" or args.layers else ["wanda"]
    for method in methods:
        rec = {"method": method, "sparsity": 0.5}
        out = work / f"{name}-{method}-out"
        r = run_child({"model": str(src), "recipe": rec, "samples": 8, "seqlen": 128, "job": "stream", "out": str(out)},
                      timeout=args.timeout)
        r["method"], r["tool"] = method, "prunekit --stream"
        entry["runs"].append(r)
        print(f"{name} {method:<9} prunekit streamed: wall {r.get('wall_s', 0):7.1f} s  peak {r.get('peak_rss_gib', 0):.2f} GiB "
              f"(target {target / 2**30:.2f})  times {json.dumps({k: round(v, 1) for k, v in r.get('times', {}).items()})} "
              f"{r.get('error', '')}")
        shutil.rmtree(out, ignore_errors=True)
    if args.peer and name == "7b":
        rec = {"method": "wanda", "sparsity": 0.5}
        out = work / f"{name}-peer-out"
        r = run_child({"model": str(src), "recipe": rec, "samples": 8, "seqlen": 128, "job": "peer", "out": str(out)},
                      timeout=args.timeout)
        r["method"], r["tool"] = "wanda", "llm-compressor oneshot (model in bf16 in memory)"
        entry["runs"].append(r)
        print(f"{name} wanda     llm-compressor: wall {r.get('wall_s', 0):7.1f} s  peak {r.get('peak_rss_gib', 0):.2f} GiB "
              f"{r.get('error', '')}")
        shutil.rmtree(out, ignore_errors=True)
    results[key] = entry
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)


def write_md(results: dict) -> None:
    lines = ["# LLM pruning at real size (benchmarks/llm_scale.py)", "",
             f"Machine: {results.get('machine', '?')}; torch {results.get('torch', '?')}. Figures from the runs in "
             "benchmarks/results/llm_scale.json; every job in its own process, peak = VmHWM.", ""]
    s = results.get("smollm2")
    if s:
        lines += ["## SmolLM2-135M (stored fp32), 50%, 32 x 256 calibration tokens", "",
                  "| method | in-memory wall s | streamed wall s | ratio | in-memory peak GiB | streamed peak GiB | "
                  "identical tensors | perplexity in-memory | perplexity streamed |", "|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['method']} | {r['memory']['wall_s']:.1f} | {r['stream']['wall_s']:.1f} | {r['wall_ratio']:.3f} | "
                         f"{r['memory']['peak_rss_gib']:.2f} | {r['stream']['peak_rss_gib']:.2f} | {r['identical']} | "
                         f"{r['ppl_memory']:.4f} | {r['ppl_stream']:.4f} |")
        for r in s["rows"]:
            if "resumed" in r:
                lines += ["", f"SparseGPT streamed, SIGKILLed after block 10 (exit {r['killed']['returncode']}), resumed at "
                          f"block {r['resumed'].get('resumed_at_block')} ({r['resumed']['wall_s']:.1f} s): sha256 of all "
                          f"output tensors equal to the uninterrupted run: **{r['resume_identical']}**."]
        lines.append("")
    for name in [k for k in results if k.split("-")[0] in SHAPES]:
        e = results[name]
        sh = e["shape"]
        base, _, few = name.partition("-")
        label = f"{base}-class Llama" + (f" (only {few.replace('layers', '')} of its blocks: peak memory does not grow with depth)" if few else "")
        lines += [f"## {label}, random weights, bf16 ({e['checkpoint_gib']:.2f} GiB), Wanda/SparseGPT 50%, "
                  f"{e['samples']} x {e['seqlen']} calibration tokens", "",
                  f"hidden {sh['hidden_size']}, {sh['num_hidden_layers']} layers, intermediate {sh['intermediate_size']}, "
                  f"{sh['num_attention_heads']} heads / {sh['num_key_value_heads']} kv heads, vocab {sh['vocab_size']}. "
                  f"Peak target (2 x one block in fp32 + activations + 1.5 GiB): {e['target_peak_gib']:.2f} GiB.", "",
                  "| tool | method | wall s | peak GiB | forward s | solver s | read/write s | note |", "|---|---|---|---|---|---|---|---|"]
        for r in e["runs"]:
            t = r.get("times", {})
            io_s = t.get("prune_io_s", 0) + t.get("write_s", 0) + t.get("load_s", 0)
            lines.append(f"| {r['tool']} | {r['method']} | {r.get('wall_s', 0):.0f} | {r.get('peak_rss_gib', float('nan')):.2f} | "
                         f"{t.get('prune_forward_s', float('nan')):.0f} | {t.get('prune_solve_s', float('nan')):.0f} | "
                         f"{io_s:.0f} | {r.get('error', '')} |")
        lines.append("")
    (RESULTS / "llm_scale.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="smollm2")
    ap.add_argument("--work", default=os.environ.get("PRUNEKIT_SCALE_DIR", "/var/tmp/prunekit-scale"))
    ap.add_argument("--big-methods", default="wanda,sparsegpt")
    ap.add_argument("--peer", action="store_true", help="7b: also run llm-compressor (needs the peers extra)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per big job")
    ap.add_argument("--keep", action="store_true", help="keep the generated big checkpoints")
    ap.add_argument("--layers", type=int, default=0, help="7b/13b: only this many blocks (results under '7b-<N>layers')")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    path = RESULTS / "llm_scale.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update({"machine": machine(), "torch": torch.__version__})
    for part in args.parts.split(","):
        if part == "smollm2":
            part_smollm2(results, args)
        elif part in SHAPES:
            part_big(results, args, part)
        else:
            raise SystemExit(f"unknown part {part!r}")
        path.write_text(json.dumps(results, indent=2))
        write_md(results)
    print(f"wrote {path} and {RESULTS / 'llm_scale.md'}")


if __name__ == "__main__":
    main()

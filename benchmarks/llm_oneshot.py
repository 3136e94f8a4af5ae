"""One-shot LLM pruning on the bundled SmolLM2-135M: prunekit vs llm-compressor, side by side.

Same model, same calibration token batches (calibration plays), same evaluation windows (held-out plays),
same perplexity function, same process. Prints a table and writes benchmarks/results/llm_oneshot.{md,json}.

    .venv/bin/python benchmarks/llm_oneshot.py                 # everything (needs the `peers` extra for llm-compressor)
    .venv/bin/python benchmarks/llm_oneshot.py --no-peers --methods wanda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.batches import bos_id, calibration_batches, evaluation_windows, tokenize
from prunekit.evaluate import perplexity

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def peer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmcompressor")
    except PackageNotFoundError:
        return "(not installed)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--no-peers", action="store_true", help="skip llm-compressor")
    ap.add_argument("--peer-batch-size", type=int, default=1, help="llm-compressor calibration batch size (its default: 1)")
    ap.add_argument("--modes", default="sequential", help="prunekit calibration modes: sequential,one-pass")
    ap.add_argument("--variants", default="", help="extra prunekit rows: comma-separated of bf16 (calibration "
                    "forwards in bfloat16), all (the whole calibration set per block)")
    ap.add_argument("--out", default=str(HERE / "results" / "llm_oneshot"))
    args = ap.parse_args()

    model, tok = prunekit.load_model(args.model)
    bos = bos_id(tok)  # windows start with BOS when the tokenizer adds one (SmolLM2: no)
    calib = calibration_batches(tokenize(tok, prunekit.load_text("shakespeare", "calibration")), args.samples, args.seqlen, bos=bos)
    windows = evaluation_windows(tokenize(tok, prunekit.load_text("shakespeare", "evaluation")), args.seqlen, args.eval_windows, bos=bos)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}

    peers = None
    if not args.no_peers:
        import peers_llmcompressor as peers  # noqa: PLC0415

        if not peers.available():
            print("llm-compressor not installed (pip install -e '.[peers]'); skipping the peer rows", file=sys.stderr)
            peers = None

    rows = []

    def record(tool, method, pattern, seconds, m, variant="sequential"):
        ppl = perplexity(m, windows)
        rows.append({"tool": tool, "method": method, "pattern": pattern, "prune_s": seconds, "perplexity": ppl,
                     "variant": variant})
        print(f"{tool:<14} {method:<10} {pattern:<13} {variant:<22} prune {seconds:7.1f}s  ppl {ppl:8.2f}", flush=True)

    record("-", "dense", "-", 0.0, model)
    for method in args.methods.split(","):
        for pattern in args.patterns.split(","):
            sp = args.sparsity if pattern == "unstructured" else None
            recipe = {"method": method, "pattern": pattern, **({"sparsity": sp} if sp is not None else {})}
            variants = [("sequential", {})]
            if method != "magnitude":
                variants = [(m, {"mode": m}) for m in args.modes.split(",")]
                for v in filter(None, args.variants.split(",")):
                    variants.append({"bf16": ("sequential, bf16 forwards", {"precision": "bf16"}),
                                     "all": ("sequential, whole set per pass", {"batch_size": "all"})}[v])
            for name, cal in variants:
                model.load_state_dict(dense_state)
                t0 = time.perf_counter()
                _, rep = prunekit.prune(model, {**recipe, "calibration": cal}, calib, progress=False)
                record("prunekit", method, pattern, time.perf_counter() - t0, model, name)
                rows[-1]["sparsity"] = rep.summary["target_sparsity"]
                rows[-1]["times"] = rep.times
            if peers is not None and method in ("wanda", "sparsegpt"):
                model.load_state_dict(dense_state)
                secs = peers.run_llmcompressor(model, method, 0.5, pattern, calib, batch_size=args.peer_batch_size)
                record("llm-compressor", method, pattern, secs, model)

    # table
    by = {(r["tool"], r["method"], r["pattern"]): r for r in rows if r.get("variant", "sequential") == "sequential"}
    lines = [
        f"SmolLM2-135M, calibration {args.samples} x {args.seqlen} tokens, evaluation {windows.shape[0]} x "
        f"{args.seqlen} tokens (held-out plays); {platform.machine()} CPU, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; llm-compressor {peer_version()} calibration batch size "
        f"{args.peer_batch_size}, prunekit batch size 8",
        "",
        "| method | pattern | prunekit ppl | prunekit s | llm-compressor ppl | llm-compressor s | time ratio |",
        "|---|---|---|---|---|---|---|",
        f"| dense | - | {by[('-', 'dense', '-')]['perplexity']:.2f} | - | - | - | - |",
    ]
    for method in args.methods.split(","):
        for pattern in args.patterns.split(","):
            ours = by[("prunekit", method, pattern)]
            peer = by.get(("llm-compressor", method, pattern))
            if peer:
                lines.append(
                    f"| {method} | {pattern} | {ours['perplexity']:.2f} | {ours['prune_s']:.1f} | "
                    f"{peer['perplexity']:.2f} | {peer['prune_s']:.1f} | {ours['prune_s'] / peer['prune_s']:.2f} |"
                )
            else:
                lines.append(f"| {method} | {pattern} | {ours['perplexity']:.2f} | {ours['prune_s']:.1f} | - | - | - |")
    extra = [r for r in rows if r["tool"] == "prunekit" and r["method"] != "magnitude"]
    if extra:
        lines += ["", "prunekit's time split (forward passes / statistics / solve) and its other modes, against the same "
                  "llm-compressor row:", "",
                  "| method | pattern | prunekit mode | ppl | s | forward s | stats s | solve s | outside forwards | time ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in extra:
            t = r["times"]
            fwd, st, sol = t.get("prune_forward_s", 0.0), t.get("prune_stats_s", 0.0), t.get("prune_solve_s", 0.0)
            peer = by.get(("llm-compressor", r["method"], r["pattern"]))
            lines.append(f"| {r['method']} | {r['pattern']} | {r['variant']} | {r['perplexity']:.2f} | {r['prune_s']:.1f} | "
                         f"{fwd:.1f} | {st:.1f} | {sol:.1f} | {(r['prune_s'] - fwd) / r['prune_s']:.0%} | "
                         + (f"{r['prune_s'] / peer['prune_s']:.2f} |" if peer else "- |"))
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", table + "\n"), (".json", json.dumps(rows, indent=2))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))


if __name__ == "__main__":
    main()

"""Recovery of structurally pruned SmolLM2-135M: perplexity and top-1 agreement with the dense model before and
after a short distillation (KL to the dense model + LM loss, LoRA rank 8 + norms + biases, merged afterwards).
The pruned models' speed is measured by benchmarks/llm_structured.py (same configurations, same data).

Same data as benchmarks/llm_structured.py: calibration 32 x 256 tokens, recovery on 128 x 256 tokens of the
calibration plays (seed 1), evaluation 16 x 256 tokens of the held-out plays. Writes
benchmarks/results/llm_structured_recovery.{md,json}.

    .venv/bin/python benchmarks/llm_structured_recovery.py        # about 15 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

import prunekit
from prunekit.batches import bos_id, calibration_batches, evaluation_windows, tokenize
from prunekit.evaluate import agreement, score_windows
from prunekit.structure import count_params

HERE = Path(__file__).resolve().parent

CONFIGS = [
    ("heads+mlp 30% FLAP (global + bias comp.)", {"kinds": ["heads", "mlp"], "sparsity": 0.3, "criterion": "fluctuation",
                                                  "global_rank": True, "bias_compensation": True}),
    ("blocks 25% (8 of 30)", {"remove_layers": 8}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--method", default="distill", choices=["distill", "perp", "lora", "full"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "llm_structured_recovery"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = prunekit.load_model("smollm2-135m")
    cal = tokenize(tok, prunekit.load_text("shakespeare", "calibration"))
    bos = bos_id(tok)  # windows start with BOS when the tokenizer adds one (SmolLM2: no)
    calib = calibration_batches(cal, 32, 256, bos=bos)
    train = calibration_batches(cal, 128, 256, seed=1, bos=bos)
    windows = evaluation_windows(tokenize(tok, prunekit.load_text("shakespeare", "evaluation")), 256, 16, bos=bos)
    dense_ppl, dense_pred = score_windows(model, windows)
    print(f"dense ppl {dense_ppl:.2f}", flush=True)
    rec = {"method": args.method, "steps": args.steps, "lr": 5e-4}
    rows = []
    for label, st in CONFIGS:
        m, rep = prunekit.prune(copy.deepcopy(model), {"structure": st}, calib, progress=False)
        ppl0, pred0 = score_windows(m, windows)
        t0 = time.perf_counter()
        m, stats = prunekit.recover(m, rec, train, teacher=model if args.method == "distill" else None,
                                    structured=True, progress=True)
        minutes = (time.perf_counter() - t0) / 60
        ppl1, pred1 = score_windows(m, windows)
        row = {"config": label, "params": count_params(m), "format": rep.summary["format"],
               "ppl_before": ppl0, "agree_before": agreement(dense_pred, pred0),
               "ppl_after": ppl1, "agree_after": agreement(dense_pred, pred1), "minutes": minutes, "recovery": rec}
        rows.append(row)
        print(f"{label:<42} ppl {ppl0:8.2f} -> {ppl1:8.2f}  agree {row['agree_before']:.3f} -> {row['agree_after']:.3f}  "
              f"{minutes:.2f} min", flush=True)
    lines = [
        f"SmolLM2-135M (dense perplexity {dense_ppl:.2f}); recovery {args.method}, {args.steps} steps of 4 x 256 tokens, "
        f"lr 5e-4, LoRA rank 8; {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads.",
        "",
        "| config | params | saved as | ppl pruned | ppl recovered | agreement pruned | agreement recovered | recovery min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['format']} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | "
                     f"{r['agree_before']:.3f} | {r['agree_after']:.3f} | {r['minutes']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", table + "\n"), (".json", json.dumps({"dense_ppl": dense_ppl, "rows": rows}, indent=2))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))


if __name__ == "__main__":
    main()

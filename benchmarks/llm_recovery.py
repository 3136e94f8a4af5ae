"""Closing the gap at 50% sparsity on SmolLM2-135M: oneshot criterion x allocation x recovery.

Every row: perplexity on the held-out plays (16 x 256 tokens), top-1 next-token agreement with the dense model
on the same windows, and wall minutes (pruning + recovery) on this machine. Calibration: 32 x 256 tokens from the
calibration plays; recovery trains on 128 x 256 tokens from the same calibration plays (never the evaluation plays).
Writes benchmarks/results/llm_recovery.{md,json}.

    .venv/bin/python benchmarks/llm_recovery.py              # the full table (~30 min on a 2-core CPU)
    .venv/bin/python benchmarks/llm_recovery.py --quick      # fewer rows
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
from prunekit.train.recovery import recover

HERE = Path(__file__).resolve().parent

ONESHOT = [
    # (label, recipe)
    ("magnitude", {"method": "magnitude"}),
    ("wanda", {"method": "wanda"}),
    ("wanda + owl", {"method": "wanda", "allocation": {"kind": "owl"}}),
    ("gblm", {"method": "gblm"}),
    ("sparsegpt one-pass", {"method": "sparsegpt", "calibration": {"mode": "one-pass"}}),
    ("sparsegpt", {"method": "sparsegpt"}),
    ("sparsegpt + owl", {"method": "sparsegpt", "allocation": {"kind": "owl"}}),
    ("magnitude + global (min density 0.2)", {"method": "magnitude", "allocation": {"kind": "global", "min_density": 0.2}}),
    ("wanda 2:4", {"method": "wanda", "pattern": "2:4"}),
    ("sparsegpt 2:4", {"method": "sparsegpt", "pattern": "2:4"}),
]
RECOVERED = [
    # (oneshot label, recovery); perp/distill at lr 5e-4, full fine-tuning at 2e-5
    ("sparsegpt + owl", {"method": "perp", "steps": 100, "lr": 5e-4}),
    ("wanda", {"method": "perp", "steps": 100, "lr": 5e-4}),
    ("sparsegpt 2:4", {"method": "perp", "steps": 100, "lr": 5e-4}),
    ("sparsegpt + owl", {"method": "distill", "steps": 60, "lr": 5e-4}),
    ("sparsegpt + owl", {"method": "full", "steps": 60, "lr": 2e-5}),
]
QUICK_ONESHOT = {"wanda", "sparsegpt", "sparsegpt + owl", "sparsegpt 2:4"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--recovery-lr", type=float, default=None, help="override the lr of perp/lora/distill rows")
    ap.add_argument("--out", default=str(HERE / "results" / "llm_recovery"))
    args = ap.parse_args()

    model, tok = prunekit.load_model("smollm2-135m")
    bos = bos_id(tok)  # windows start with BOS when the tokenizer adds one (SmolLM2: no)
    calib = calibration_batches(tokenize(tok, prunekit.load_text("shakespeare", "calibration")), 32, 256, bos=bos)
    train = calibration_batches(tokenize(tok, prunekit.load_text("shakespeare", "calibration")), 128, 256, seed=1, bos=bos)
    windows = evaluation_windows(tokenize(tok, prunekit.load_text("shakespeare", "evaluation")), 256, 16, bos=bos)
    teacher = copy.deepcopy(model).eval()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense_ppl, dense_pred = score_windows(model, windows)

    rows, states = [], {}

    def record(label, recovery, minutes, extra=None):
        ppl, pred = score_windows(model, windows)
        row = {"pipeline": label, "recovery": recovery, "perplexity": ppl, "x_dense": ppl / dense_ppl,
               "agreement": agreement(dense_pred, pred), "minutes": minutes, **(extra or {})}
        rows.append(row)
        print(f"{label:<38} {recovery:<22} ppl {ppl:8.2f} ({ppl / dense_ppl:4.2f}x)  agree {row['agreement']:.3f}  "
              f"{minutes:5.2f} min", flush=True)

    rows.append({"pipeline": "dense", "recovery": "-", "perplexity": dense_ppl, "x_dense": 1.0, "agreement": 1.0, "minutes": 0.0})
    print(f"dense ppl {dense_ppl:.2f}", flush=True)
    for label, recipe in ONESHOT:
        if args.quick and label not in QUICK_ONESHOT:
            continue
        model.load_state_dict(dense_state)
        t0 = time.perf_counter()
        prunekit.prune(model, recipe, calib, progress=False)
        minutes = (time.perf_counter() - t0) / 60
        record(label, "-", minutes)
        states[label] = ({k: v.clone() for k, v in model.state_dict().items()}, minutes)

    for label, rec in RECOVERED:
        if label not in states:
            continue
        if args.recovery_lr and rec["method"] != "full":  # noqa: SIM102
            rec = {**rec, "lr": args.recovery_lr}
        state, prune_min = states[label]
        model.load_state_dict(state)
        t0 = time.perf_counter()
        _, stats = recover(model, rec, train, teacher=teacher if rec["method"] == "distill" else None, progress=False)
        minutes = prune_min + (time.perf_counter() - t0) / 60
        desc = f"{rec['method']} {rec['steps']} steps"
        record(label, desc, minutes, {"recovery_stats": stats, "recovery_recipe": rec})

    lines = [
        f"SmolLM2-135M at 50% sparsity; calibration 32 x 256 tokens; recovery on 128 x 256 tokens (batch 4); evaluation "
        f"16 x 256 tokens of held-out plays. {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}.",
        "",
        "| pipeline | recovery | perplexity | x dense | top-1 agreement | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['pipeline']} | {r['recovery']} | {r['perplexity']:.2f} | {r['x_dense']:.2f} | "
                     f"{r['agreement']:.3f} | {r['minutes']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", table + "\n"), (".json", json.dumps(rows, indent=2, default=str))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))


if __name__ == "__main__":
    main()

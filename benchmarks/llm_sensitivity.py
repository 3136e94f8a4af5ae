"""Sensitivity analysis on the bundled SmolLM2-135M, and the allocation it drives, against OWL and uniform.

1. The sensitivity table: Wanda prunes one decoder block at a time to 0.2 / 0.4 / 0.6 / 0.8 / 0.9, everything else
   dense; perplexity on 8 windows of 256 tokens drawn from the *calibration* plays (seed 1, not the calibration
   windows), so that the allocation is never chosen on the evaluation text.
2. Wanda at 50% (and 60%) with allocation uniform, OWL (M 5, lambda 0.08) and sensitivity (from the table; each
   block within 0.2 of the target, the default, and unbounded), evaluated on 32 windows of the held-out plays
   (Hamlet, Macbeth, Othello, The Tempest, Twelfth Night).

Writes benchmarks/results/llm_sensitivity.{json,md,png}.

    .venv/bin/python benchmarks/llm_sensitivity.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import prunekit  # noqa: E402
from prunekit.batches import bos_id, calibration_batches, evaluation_windows, tokenize  # noqa: E402
from prunekit.evaluate import perplexity  # noqa: E402
from prunekit.evaluate.sensitivity import block_sparsities, sensitivity  # noqa: E402
from prunekit.recipe import Recipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="0.2,0.4,0.6,0.8,0.9")
    ap.add_argument("--sparsities", default="0.5,0.6")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--reuse-table", action="store_true", help="the table of the last run (same method and grid)")
    args = ap.parse_args()
    grid = [float(x) for x in args.grid.split(",")]
    model, tok = prunekit.load_model("smollm2-135m")
    bos = bos_id(tok)
    cal_ids = tokenize(tok, prunekit.load_text("shakespeare", "calibration"))
    calib = calibration_batches(cal_ids, 32, 256, seed=0, bos=bos)
    select = calibration_batches(cal_ids, 8, 256, seed=1, bos=bos)  # where the table is measured
    test = evaluation_windows(tokenize(tok, prunekit.load_text("shakespeare", "evaluation")), 256, 32, bos=bos)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    res = {"machine": machine(), "method": args.method, "grid": grid, "rows": []}
    t0 = time.perf_counter()
    old = json.loads((RESULTS / "llm_sensitivity.json").read_text()) if (RESULTS / "llm_sensitivity.json").exists() else {}
    if args.reuse_table and old.get("grid") == grid and old.get("method") == args.method:
        table, res["table_seconds"] = old["table"], old["table_seconds"]
        print("sensitivity table read back from the last run", flush=True)
    else:
        table = sensitivity(model, Recipe(method=args.method), calib, select, grid, progress=True)
        res["table_seconds"] = round(time.perf_counter() - t0, 1)
    res["table"] = table
    print(f"sensitivity table: {len(table['units'])} blocks x {len(grid)} sparsities in {res['table_seconds']:.0f} s "
          f"(dense {table['perplexity_dense']:.3f} on the selection windows)", flush=True)
    res["dense_ppl"] = round(float(perplexity(model, test)), 3)
    n_blocks = len(model.model.layers)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sensitivity.json").write_text(json.dumps(table))
        for s in (float(x) for x in args.sparsities.split(",")):
            for kind in ("uniform", "owl", "sensitivity", "sensitivity-unbounded"):
                model.load_state_dict(dense_state)
                alloc = {"kind": kind}
                if kind.startswith("sensitivity"):
                    alloc = {"kind": "sensitivity", "table": tmp, "max_deviation": None if "unbounded" in kind else 0.2}
                t1 = time.perf_counter()
                _, rep = prunekit.prune(model, {"method": args.method, "sparsity": s, "allocation": alloc}, calib,
                                        progress=False)
                secs = time.perf_counter() - t1
                row = {"sparsity": s, "allocation": kind, "ppl": round(float(perplexity(model, test)), 3),
                       "ppl_selection": round(float(perplexity(model, select)), 3),
                       "achieved": rep.summary["target_sparsity"], "prune_s": round(secs, 1),
                       "block_sparsity": [round(x, 4) for x in rep.summary["block_sparsity"]]}
                if kind.startswith("sensitivity"):
                    row["planned"] = [round(x, 4) for x in block_sparsities(table, n_blocks, "model.layers", s,
                                                                             alloc["max_deviation"])]
                res["rows"].append(row)
                print(f"  {args.method} {s:g} {kind:11s} ppl {row['ppl']:.3f} (achieved {row['achieved']:.4f}, {secs:.0f} s)",
                      flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    write(res)


def write(res: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llm_sensitivity.json").write_text(json.dumps(res, indent=1) + "\n")
    t = res["table"]
    keys = list(next(iter(t["units"].values()))["perplexity"])
    lines = [f"Machine: {res['machine']}", "",
             f"## Sensitivity of SmolLM2-135M to {res['method']} per decoder block ({res['table_seconds']:.0f} s)", "",
             f"Perplexity with one block pruned, everything else dense, on 8 x 256 tokens of the calibration plays "
             f"(dense {t['perplexity_dense']:.3f}).", "",
             "| block | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, row in t["units"].items():
        lines.append(f"| {name.rsplit('.', 1)[-1]} | " + " | ".join(f"{row['perplexity'][k]:.2f}" for k in keys) + " |")
    lines += ["", f"## {res['method']} with each allocation (held-out plays, 32 x 256 tokens; dense {res['dense_ppl']:.3f})", "",
              "| sparsity | allocation | perplexity | on the selection windows (calibration plays) | achieved sparsity | prune s |",
              "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['sparsity']:g} | {r['allocation']} | {r['ppl']:.3f} | {r['ppl_selection']:.3f} | "
                     f"{r['achieved']:.4f} | {r['prune_s']:.0f} |")
    lines += ["", "## Targets", ""]
    for s in sorted({r["sparsity"] for r in res["rows"]}):
        by = {r["allocation"]: r for r in res["rows"] if r["sparsity"] == s}
        if "sensitivity" in by and "owl" in by:
            ok = by["sensitivity"]["ppl"] <= by["owl"]["ppl"]
            lines.append(f"- {s:g}: sensitivity {by['sensitivity']['ppl']:.3f} (unbounded "
                         f"{by['sensitivity-unbounded']['ppl']:.3f}) vs OWL {by['owl']['ppl']:.3f} vs uniform "
                         f"{by['uniform']['ppl']:.3f} -> {'MET' if ok else 'MISSED'} (sensitivity <= OWL)")
    (RESULTS / "llm_sensitivity.md").write_text("\n".join(lines) + "\n")
    plot(res)
    print("\n".join(lines[-3:]))


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = res["table"]
    dense = t["perplexity_dense"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    keys = list(next(iter(t["units"].values()))["perplexity"])
    names = list(t["units"])
    mat = torch.tensor([[t["units"][n]["perplexity"][k] - dense for k in keys] for n in names])
    im = axes[0].imshow(mat.clamp_min(1e-3).log10().t().numpy(), aspect="auto", cmap="magma")
    axes[0].set_yticks(range(len(keys)), keys)
    axes[0].set_xlabel("decoder block")
    axes[0].set_ylabel("sparsity of that block alone")
    axes[0].set_title("log10 perplexity increase, one block pruned")
    fig.colorbar(im, ax=axes[0])
    for r in res["rows"]:
        if r["sparsity"] == min(x["sparsity"] for x in res["rows"]):
            axes[1].plot(r["block_sparsity"], label=f"{r['allocation']} (ppl {r['ppl']:.2f})")
    axes[1].set_xlabel("decoder block")
    axes[1].set_ylabel("block sparsity")
    axes[1].set_title(f"{res['method']} at {min(x['sparsity'] for x in res['rows']):g}: sparsity per block")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "llm_sensitivity.png", dpi=100)


if __name__ == "__main__":
    main()

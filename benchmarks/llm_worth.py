"""Is the speed-up worth having? Structured pruning + distillation, and unstructured pruning + distillation, on
SmolLM2-135M: measured prefill speed against perplexity on the held-out plays AND on a text the training never
saw (the Python reference topics), with top-1 agreement with the dense model on both.

Protocol (the same for every row, in one process):

* calibration (importance scores): 32 x 256 tokens of the calibration plays (seed 0);
* distillation: windows of 256 tokens from the calibration plays only (seed 1), batch 4, every weight trained
  towards the dense model's logits (KL) [+ hidden states], AdamW, warmup + cosine, bf16 autocast on this CPU
  (AMX); the budget is given in minutes of wall time per config (steps = budget / measured step time) or steps;
* evaluation: 16 x 256 tokens of the held-out plays (in domain) and 16 x 256 tokens of the last 20% of the
  pydoc topics (out of domain: 0 13-grams shared with the distillation text, checked and recorded);
* speed: one 256-token prefill (KV cache filled, last-position logits), dense and pruned timed alternately in
  pairs, median of the pairs' ratios, at batch 1 and batch 8, torch threads 2.

Rows are merged by config name into benchmarks/results/llm_worth.json (``rows``: config, speedup_b1, speedup_b8,
x_dense, x_dense_ood, agreement, agreement_ood, distill_min, ...), a table llm_worth.md and the speed-vs-quality
plot llm_worth.png (Pareto front marked).

    .venv/bin/python benchmarks/llm_worth.py --list
    .venv/bin/python benchmarks/llm_worth.py --only "blocks 11/30" --minutes 30
    .venv/bin/python benchmarks/llm_worth.py --front            # the undistilled configs (minutes each)
    .venv/bin/python benchmarks/llm_worth.py --plot              # table and plot from the JSON only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.batches import bos_id, calibration_batches, evaluation_windows, tokenize
from prunekit.evaluate import agreement, score_windows
from prunekit.structure import count_params
from prunekit.zoo.text import shared_ngrams

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "results" / "llm_worth"

# name -> the recipe's pruning (a structure section, or sparsity pruning); every config is also run undistilled
CONFIGS: dict[str, dict] = {
    "blocks 8/30": {"structure": {"remove_layers": 8}},
    "blocks 10/30": {"structure": {"remove_layers": 10}},
    "blocks 11/30": {"structure": {"remove_layers": 11}},
    "blocks 12/30": {"structure": {"remove_layers": 12}},
    "mlp 50%": {"structure": {"kinds": ["mlp"], "sparsity": 0.5, "bias_compensation": True}},
    "mlp 60%": {"structure": {"kinds": ["mlp"], "sparsity": 0.6, "bias_compensation": True}},
    "heads+mlp 40%": {"structure": {"kinds": ["heads", "mlp"], "sparsity": 0.4, "bias_compensation": True}},
    "heads+mlp 50%": {"structure": {"kinds": ["heads", "mlp"], "sparsity": 0.5, "bias_compensation": True}},
    "hidden 25%": {"structure": {"kinds": ["hidden"], "sparsity": 0.25}},  # fluctuation = Minitron's activation score
    "hidden 25% + mlp 25%": {"structure": {"kinds": ["mlp", "hidden"], "sparsity": 0.25, "bias_compensation": True}},
    "hidden 35%": {"structure": {"kinds": ["hidden"], "sparsity": 0.35}},
    "blocks 6/30 + mlp 30%": {"structure": {"remove_layers": 6, "kinds": ["mlp"], "sparsity": 0.3, "bias_compensation": True}},
    "blocks 5/30 + heads+mlp 25%": {"structure": {"remove_layers": 5, "kinds": ["heads", "mlp"], "sparsity": 0.25,
                                                  "bias_compensation": True}},
    "sparsegpt 50% (unstructured)": {"method": "sparsegpt", "sparsity": 0.5},
    "wanda 50% (unstructured)": {"method": "wanda", "sparsity": 0.5},
}


def paired_prefill(dense, pruned, batch: int, seqlen: int, runs: int, vocab: int) -> float:
    from llm_structured import paired_prefill as pp  # noqa: PLC0415  (the structured benchmark's timer)

    return pp(dense, pruned, batch, seqlen, runs, vocab)["speedup"]


def measure(model, dense_refs: dict, sets: dict) -> dict:
    out = {}
    for name, w in sets.items():
        ppl, preds = score_windows(model, w)
        out[name] = {"perplexity": ppl, "agreement": agreement(dense_refs[name]["predictions"], preds),
                     "x_dense": ppl / dense_refs[name]["perplexity"]}
    return out


def load_rows() -> list[dict]:
    p = OUT.with_suffix(".json")
    return json.loads(p.read_text())["rows"] if p.is_file() else []


def write(rows: list[dict], meta: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    os.replace(tmp, OUT.with_suffix(".json"))
    table(rows, meta)
    plot(rows)


def table(rows: list[dict], meta: dict) -> None:
    lines = [meta.get("protocol", ""), "",
             "| config | distill | params | speed-up b1 | speed-up b8 | ppl plays | x dense | agreement | ppl pydoc (OOD) | "
             "x dense OOD | agreement OOD | distill min | steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["config"].split(" +")[0], r.get("distill_min", 0))):
        lines.append(
            f"| {r['config']} | {r.get('distill', '-')} | {r['params'] / 1e6:.1f}M | {r['speedup_b1']:.2f} | "
            f"{r['speedup_b8']:.2f} | {r['perplexity']:.2f} | {r['x_dense']:.2f} | {r['agreement']:.3f} | "
            f"{r['perplexity_ood']:.2f} | {r['x_dense_ood']:.2f} | {r['agreement_ood']:.3f} | "
            f"{r.get('distill_min', 0):.1f} | {r.get('steps', 0)} |")
    text = "\n".join(lines) + "\n"
    tmp = OUT.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, OUT.with_suffix(".md"))
    print(text)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both speed-up (higher) and x dense (lower)."""
    return [i for i, (s, q) in enumerate(points)
            if not any((s2 >= s and q2 <= q) and (s2 > s or q2 < q) for s2, q2 in points)]


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    structured = [r for r in rows if r.get("kind") == "structured"]
    if not structured:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=False)
    for ax, key, title in ((axes[0], "x_dense", "held-out plays (in domain)"), (axes[1], "x_dense_ood", "pydoc (out of domain)")):
        for distilled, marker in ((False, "o"), (True, "*")):
            rs = [r for r in structured if bool(r.get("steps")) == distilled]
            ax.scatter([r["speedup_b1"] for r in rs], [r[key] for r in rs], marker=marker, s=70 if distilled else 35,
                       label="distilled" if distilled else "pruned only", alpha=0.85)
            for r in rs:
                ax.annotate(r["config"].replace(" (unstructured)", ""), (r["speedup_b1"], r[key]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        pts = [(r["speedup_b1"], r[key]) for r in structured]
        front = sorted((pts[i] for i in pareto(pts)))
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
        ax.axhline(1.5, color="r", lw=0.6, ls=":", label="target 1.5x dense")
        ax.axvline(1.5, color="g", lw=0.6, ls=":", label="target 1.5x speed")
        ax.set_yscale("log")
        ax.set_xlabel("measured prefill speed-up, batch 1, 256 tokens")
        ax.set_ylabel("perplexity / dense perplexity")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M structured pruning: speed vs quality (2-core CPU)")
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", action="append", help="config name (repeatable); default: none (see --front)")
    ap.add_argument("--front", action="store_true", help="every config without distillation")
    ap.add_argument("--plot", action="store_true", help="rewrite table and plot from the JSON")
    ap.add_argument("--minutes", type=float, default=0.0, help="distillation budget per config (wall minutes)")
    ap.add_argument("--steps", type=int, default=0, help="distillation steps (instead of --minutes)")
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument("--lm-weight", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--tag", default="", help="suffix of the row name (variants of one config)")
    ap.add_argument("--runs", type=int, default=11, help="dense/pruned pairs per speed measurement")
    ap.add_argument("--eval-windows", type=int, default=16)
    args = ap.parse_args()
    if args.list:
        for k, v in CONFIGS.items():
            print(f"{k:<32} {v}")
        return
    rows = load_rows()
    meta = {}
    if OUT.with_suffix(".json").is_file():
        meta = json.loads(OUT.with_suffix(".json").read_text()).get("meta", {})
    if args.plot:
        write(rows, meta)
        return
    torch.set_num_threads(2)
    model, tok = prunekit.load_model("smollm2-135m")
    bos = bos_id(tok)
    seqlen = 256
    cal_text = prunekit.load_text("shakespeare", "calibration")
    cal_ids = tokenize(tok, cal_text)
    calib = calibration_batches(cal_ids, 32, seqlen, seed=0, bos=bos)
    sets = {name: evaluation_windows(tokenize(tok, prunekit.load_text(name, "evaluation")), seqlen, args.eval_windows, bos=bos)
            for name in ("shakespeare", "pydoc")}
    overlap = {name: shared_ngrams(cal_text, prunekit.load_text(name, "evaluation")) for name in sets}
    dense_refs = {}
    for name, w in sets.items():
        ppl, preds = score_windows(model, w)
        dense_refs[name] = {"perplexity": ppl, "predictions": preds}
    vocab = model.config.vocab_size
    meta = {"protocol": (
        f"SmolLM2-135M (dense perplexity {dense_refs['shakespeare']['perplexity']:.2f} on the held-out plays, "
        f"{dense_refs['pydoc']['perplexity']:.2f} on pydoc); calibration 32 x {seqlen} tokens; distillation on windows "
        f"of the calibration plays (13-grams shared with the held-out plays: {overlap['shakespeare']}, with pydoc: "
        f"{overlap['pydoc']}); evaluation {args.eval_windows} x {seqlen} tokens each; {platform.machine()} CPU "
        f"({platform.processor() or 'x86_64'}), {os.cpu_count()} cores, torch {torch.__version__}, 2 threads; speed-ups: "
        f"median of {args.runs} dense/pruned prefill pairs"),
        "dense": {k: v["perplexity"] for k, v in dense_refs.items()}, "shared_13grams": overlap}
    print(meta["protocol"], flush=True)

    names = list(CONFIGS) if args.front else (args.only or [])
    for name in names:
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; see --list")
        base = CONFIGS[name]
        distill = None
        if not args.front and (args.minutes or args.steps):
            distill = {"steps": args.steps or 1, "iterations": args.iterations, "hidden_weight": args.hidden_weight,
                       "lm_weight": args.lm_weight, "logit_weight": 1.0, "lr": args.lr, "batch_size": args.batch_size,
                       "seqlen": seqlen, "samples": 4096, "text": "shakespeare", "precision": args.precision, "seed": 1}
            if args.minutes and not args.steps:  # steps from the measured step time of this config
                probe = copy.deepcopy(model)
                n = 6
                _, prep = prunekit.prune(probe, {**base, "distill": {**distill, "steps": n, "iterations": 1}}, calib,
                                         tokenizer=tok, progress=False)
                per = prep.summary["distill"]["seconds"] / n  # the distillation steps only (first ones included)
                distill["steps"] = max(args.iterations, int(args.minutes * 60 / per))
                print(f"{name}: {per:.2f} s per distillation step -> {distill['steps']} steps", flush=True)
                del probe
        recipe = {**base, **({"distill": distill} if distill else {})}
        t0 = time.perf_counter()
        m, rep = prunekit.prune(copy.deepcopy(model), recipe, calib, tokenizer=tok, progress=True)
        wall = time.perf_counter() - t0
        res = measure(m, dense_refs, sets)
        label = name + (f" + distill{args.tag}" if distill else "")
        row = {"config": label, "base": name, "kind": "structured" if "structure" in base else "unstructured",
               "recipe": rep.recipe, "params": count_params(m) if "structure" in base else rep.summary.get("nonzeros"),
               "speedup_b1": paired_prefill(model, m, 1, seqlen, args.runs, vocab),
               "speedup_b8": paired_prefill(model, m, 8, seqlen, args.runs, vocab),
               "perplexity": res["shakespeare"]["perplexity"], "x_dense": res["shakespeare"]["x_dense"],
               "agreement": res["shakespeare"]["agreement"], "perplexity_ood": res["pydoc"]["perplexity"],
               "x_dense_ood": res["pydoc"]["x_dense"], "agreement_ood": res["pydoc"]["agreement"],
               "wall_min": wall / 60, "loadavg": os.getloadavg()[0]}
        if distill:
            d = rep.summary["distill"]
            row.update({"distill": f"{distill['iterations']} part(s), hidden {args.hidden_weight:g}, lm {args.lm_weight:g}",
                        "steps": d["steps"], "tokens": d["tokens"], "distill_min": d["seconds"] / 60,
                        "loss_first": d["loss_first"], "loss_last": d["loss_last"]})
        print(f"{label}: b1 {row['speedup_b1']:.2f}x b8 {row['speedup_b8']:.2f}x  plays {row['perplexity']:.2f} "
              f"({row['x_dense']:.2f}x, agr {row['agreement']:.3f})  pydoc {row['perplexity_ood']:.2f} "
              f"({row['x_dense_ood']:.2f}x, agr {row['agreement_ood']:.3f})  {wall / 60:.1f} min", flush=True)
        rows = [r for r in load_rows() if r["config"] != label] + [row]
        write(rows, meta)
        del m


if __name__ == "__main__":
    main()

"""PASER vs random vs all: which recovery windows a PERP recovery of Wanda 50% trains on, at equal steps."""

from __future__ import annotations

import copy
import math

import torch

import prunekit
from prunekit.train import recover

SPARSITY = 0.5
KEEP = 0.2
PER_TEXT = 128  # candidate windows of each text: 256 in all
STEPS = 64  # 64 steps x 4 windows = one pass over all 256 candidates; 20% (51 windows) are seen 5 times each
LR = 5e-4  # the recovery benchmark's perp learning rate


def _mix(row) -> float:
    """The one quality figure, fixed before any run: the geometric mean of the two texts' perplexities."""
    return math.sqrt(row["ppl_shakespeare"] * row["ppl_pydoc"])


def run(ctx) -> dict:
    model, tok = ctx.load()
    dense = copy.deepcopy(model)
    calib = ctx.calib("shakespeare", 32, seed=0)
    cands = torch.cat([ctx.calib("shakespeare", PER_TEXT, seed=1), ctx.calib("pydoc", PER_TEXT, seed=1)])
    n_sh = cands.shape[0] // 2  # rows [0, n_sh) are shakespeare, the rest pydoc

    def measure(m, label, **extra):
        row = {"label": label, "ppl_shakespeare": ctx.ppl(m, "shakespeare"), "ppl_pydoc": ctx.ppl(m, "pydoc"), **extra}
        row["ppl"] = round(_mix(row), 3)
        print("    ", row, flush=True)
        return row

    rows = [measure(dense, "dense")]
    prunekit.prune(model, {"method": "wanda", "sparsity": SPARSITY}, calib, progress=False)
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    rows.append(measure(model, f"wanda {SPARSITY:.0%}, no recovery"))
    steps = ctx.steps(STEPS)
    got = {}
    for label, fields in (("all 100%", {}), (f"paser {KEEP:.0%}", {"select": "paser", "keep": KEEP}),
                          (f"random {KEEP:.0%}", {"select": "random", "keep": KEEP})):
        model.load_state_dict(pruned)
        rec = {"method": "perp", "steps": steps, "lr": LR, "batch_size": 4, "seqlen": ctx.seqlen, **fields}
        paser = fields.get("select") == "paser"
        _, stats = recover(model, rec, cands, teacher=dense if paser else None, tokenizer=tok, progress=False)
        sel = stats["selection"]
        idx = sel.get("indices") or (list(range(cands.shape[0])) if sel["select"] == "all" else None)
        extra = {"windows": sel["selected"], "steps": stats["steps"], "train_s": round(stats["seconds"], 1)}
        if idx is not None:
            extra["from_shakespeare"] = sum(1 for i in idx if i < n_sh)
        if paser:
            extra["clusters"] = " ".join(f"{c['budget']}/{c['size']}@{c['degradation']:.3f}"
                                         for c in sel["per_cluster"])
            extra["dups_skipped"] = sel["near_duplicates_skipped"]
            extra["select_s"] = round(sum(sel["seconds"].values()), 1)
        got[label] = measure(model, f"perp {steps} steps, {label}", **extra)
        rows.append(got[label])
    full, pas, rnd = got["all 100%"], got[f"paser {KEEP:.0%}"], got[f"random {KEEP:.0%}"]
    met = pas["ppl"] <= rnd["ppl"] and pas["ppl"] <= 1.05 * full["ppl"]
    before = rows[1]["ppl"]
    targets = [{
        "target": "PASER at 20% of the data recovers at least as much as random 20% and within 5% of full data",
        "met": met,
        "detail": (f"geometric-mean perplexity (shakespeare x pydoc) after recovery: PASER {pas['ppl']} vs random "
                   f"{rnd['ppl']} vs all {full['ppl']} (PASER / all = {pas['ppl'] / full['ppl']:.3f}; before recovery "
                   f"{before}, dense {rows[0]['ppl']}); shakespeare {pas['ppl_shakespeare']} / "
                   f"{rnd['ppl_shakespeare']} / "
                   f"{full['ppl_shakespeare']}, pydoc {pas['ppl_pydoc']} / {rnd['ppl_pydoc']} / {full['ppl_pydoc']}; "
                   f"PASER took {pas.get('from_shakespeare')} shakespeare windows of {pas['windows']}, random "
                   f"{rnd.get('from_shakespeare')}"),
    }]
    setup = (f"SmolLM2-135M, Wanda {SPARSITY:.0%} unstructured (32 calibration windows x {ctx.seqlen} tokens of "
             f"shakespeare). Candidate recovery windows: {cands.shape[0]} ({n_sh} of shakespeare's and "
             f"{cands.shape[0] - n_sh} of pydoc's calibration split, seed 1). Recovery: PERP (norms, biases, masked "
             f"LoRA rank 8), {steps} steps of 4 x {ctx.seqlen} tokens, lr {LR:g}, seed 0, on (a) every candidate, "
             f"(b) PASER {KEEP:.0%} (MiniLM embeddings of the decoded windows, 8 k-means clusters, budgets by mean "
             "Jensen-Shannon divergence of the pruned from the dense next-token distributions, most degraded first, "
             "near duplicates at cosine > 0.95 skipped), (c) a seeded random 20%. Perplexity on 32 held-out windows "
             "of each text's evaluation split; ppl = their geometric mean (the target's figure, fixed beforehand). "
             "clusters: budget/size@mean divergence per cluster.")
    return {"setup": setup, "rows": rows, "targets": targets, "plot": "ppl"}

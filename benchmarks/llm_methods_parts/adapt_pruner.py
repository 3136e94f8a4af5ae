"""Adapt-Pruner (block-adaptive parts with training between) vs one-shot structure + the same training steps."""

from __future__ import annotations

from prunekit.recipe import Recipe
from prunekit.train.distill import compress_and_distill

SPARSITY = 0.2
PARTS = 4
STEPS = 64  # in all, for every row
STRUCTURE = {"kinds": ["heads", "mlp"], "sparsity": SPARSITY, "criterion": "taylor"}
TRAIN = {"batch_size": 4, "lr": 2e-4, "lm_weight": 1.0, "logit_weight": 0.0, "checkpoint_every": 10_000}
RUNS = (  # label, distill fields besides the training ones
    ("one-shot + training", {"iterations": 1}),
    (f"even {PARTS} parts (Minitron)", {"iterations": PARTS}),
    (f"Adapt-Pruner {PARTS} parts", {"iterations": PARTS, "schedule": "adapt-pruner"}),
)


def run(ctx) -> dict:
    calib = ctx.calib("shakespeare", 32, seed=0)
    train = ctx.calib("shakespeare", 4 * STEPS, seed=1)
    steps = max(ctx.steps(STEPS), PARTS)
    model, _ = ctx.load()
    rows = [{"label": "dense", "params": sum(p.numel() for p in model.parameters()),
             "ppl": ctx.ppl(model, "shakespeare"), "ppl_pydoc": ctx.ppl(model, "pydoc")}]
    got = {}
    for label, fields in RUNS:
        model, _ = ctx.load()
        rec = Recipe.make(structure=STRUCTURE, distill={"steps": steps, **TRAIN, **fields})
        model, rep = compress_and_distill(model, rec, calib, train, progress=False)
        j = rep.summary["journey"]
        row = {"label": label, "params": rep.summary["params"], "journey_avg_params": round(j["average_params"]),
               "ppl": ctx.ppl(model, "shakespeare"), "ppl_pydoc": ctx.ppl(model, "pydoc"),
               "train_s": round(rep.times.get("distill_s", 0.0), 1),
               "prune_s": round(rep.times.get("prune_s", 0.0), 1)}
        rows.append(row)
        got[label] = row
        print("    ", row, flush=True)
    a, o = got[RUNS[2][0]], got[RUNS[0][0]]
    targets = [{"target": "Adapt-Pruner beats one-shot + the same training steps", "met": a["ppl"] < o["ppl"],
                "detail": f"shakespeare ppl {a['ppl']} vs {o['ppl']} at {a['params']:,} vs {o['params']:,} final "
                          f"params (journey average {a['journey_avg_params']:,} vs {o['journey_avg_params']:,}); pydoc "
                          f"{a['ppl_pydoc']} vs {o['ppl_pydoc']}; even {PARTS} parts: {got[RUNS[1][0]]['ppl']}"}]
    setup = (f"SmolLM2-135M, structure heads + MLP {SPARSITY:.0%} by first-order Taylor (query-head slices), "
             f"{steps} training steps in all for every row (batch {TRAIN['batch_size']} x {ctx.seqlen} tokens of "
             f"shakespeare's calibration split, next-token loss, AdamW lr {TRAIN['lr']:g}, warmup + cosine per part). "
             f"One-shot: all pruning first, then the steps. Even: {PARTS} equal parts, each followed by 1/{PARTS} "
             f"of the steps. Adapt-Pruner: {PARTS} parts of the same totals shared out by block angular distance (amplitude "
             "0.02, re-measured before each part). Calibration 32 windows; perplexity on 32 held-out windows of "
             "shakespeare and of pydoc (out of domain); journey = live parameters averaged over the training steps.")
    return {"setup": setup, "rows": rows, "targets": targets}

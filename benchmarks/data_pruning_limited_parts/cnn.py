"""The end-to-end contrast: the small CNN (FastCNN, width 16) trained on the images themselves, to convergence with
early stopping on the validation split, at fewer fractions: random and the grid's best score at 10% (its CCS,
easiest and hardest selections). Does the frozen-feature protocol's ordering hold when the features are learned?"""

from __future__ import annotations

import numpy as np

from data_pruning_limited_parts.grid import grid

FRACTIONS = (0.1, 0.3)


def run(ctx) -> dict:
    from prunekit.data.train import TrainConfig, train_subset

    g = grid(ctx)
    im = ctx.images()
    best = max((n for n in ctx.scores()), key=lambda n: np.mean(g[f"{n}/ccs"][0.1]))
    cfg = dict(model="fast-cnn", width=16, steps=100 if ctx.quick else 2500, batch_size=128, lr=2e-3)

    def acc(keep_pool, seed):
        out = train_subset(im["train"], im["pool"][keep_pool], TrainConfig(**cfg, seed=seed), test=im["test"],
                           val=im["val"])
        return out["test_accuracy"]

    rows = [ctx.row("full pool", [acc(np.arange(len(im["pool"])), s) for s in ctx.seeds], fraction=1.0)]
    for f in FRACTIONS:
        rows.append(ctx.row(f"random {f:.0%}", [acc(ctx.keep("random", "random", f, s), s) for s in ctx.seeds],
                            fraction=f))
        for strat in ("ccs", "easiest", "hardest"):
            rows.append(ctx.row(f"{best}/{strat} {f:.0%}", [acc(ctx.keep(best, strat, f, s), s) for s in ctx.seeds],
                                fraction=f))
        print("  ", rows[-4:], flush=True)
    full, r10 = rows[0], rows[1]
    ccs10 = rows[2]
    return {"setup": f"FastCNN (width 16) on the 28x28 images, {cfg['steps']} steps of 128 for every subset, the best "
            "of at most 40 validation checks kept; scores from the frozen-feature protocol (computed on the pool). "
            f"Best score at 10% in the grid: {best}.",
            "rows": rows,
            "findings": [f"end to end: full {full['acc']:.2f}, random 10% {r10['acc']:.2f} "
                         f"({full['acc'] - r10['acc']:.2f} points lower), {best}/ccs 10% {ccs10['acc']:.2f} "
                         f"({ctx.versus(ccs10, r10)} random)"]}

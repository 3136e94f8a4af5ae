"""LAPP, learnable per-layer thresholds under a progressive FLOPs constraint from scratch (Zhai et al. 2023), against
gradual magnitude pruning at equal FLOPs and equal epochs on Fashion-MNIST SmallCNN.

* lapp: learner ``lapp``, ``EPOCHS`` epochs from scratch with the thresholds learned and the FLOPs target falling
  from 1 to ``1 - FLOPS_REMOVED`` (cubic ramp), then ``FINETUNE`` epoch(s) with the masks fixed;
* gradual magnitude, uniform: the same density in every layer, sparsity ``FLOPS_REMOVED`` (so exactly the same FLOPs
  ratio), schedule ``gradual`` over ``EPOCHS + FINETUNE`` epochs (cubic, from 10% to 70% of the steps);
* gradual magnitude, global: one magnitude ranking over all layers (the common baseline), its sparsity chosen per
  seed so that a global magnitude mask of the dense model of that seed has LAPP's FLOPs ratio (the achieved FLOPs of
  its final masks are reported, they move a little with training);
* dense: ``EPOCHS + FINETUNE`` epochs of plain training.

FLOPs are the multiply-accumulates of the kept weights (each kept weight x its layer's output positions,
``prunekit.vision.learn.lapp.flops_ratio``) over the dense model's.
"""

from __future__ import annotations

import torch

from prunekit.core.masks import prunable
from prunekit.vision.learn.lapp import flops_ratio, output_positions
from prunekit.vision.models import build_model
from prunekit.vision.schedules import compute_masks
from prunekit.vision.train import evaluate, train_epochs

FLOPS_REMOVED = 0.8
EPOCHS, FINETUNE = 3, 1
TRAIN, TEST = 10000, 2000


def _global_for_flops(model, positions: dict, target: float) -> float:
    """The global magnitude sparsity whose masks on ``model`` keep ``target`` of the FLOPs (bisection)."""
    lo, hi = 0.0, 0.999
    for _ in range(20):
        mid = (lo + hi) / 2
        r = float(flops_ratio(compute_masks(model, mid, "magnitude", "global").masks, positions))
        lo, hi = (mid, hi) if r > target else (lo, mid)
    return (lo + hi) / 2


def run(ctx) -> dict:
    epochs, finetune = ctx.epochs(EPOCHS), ctx.epochs(FINETUNE)
    labels = ("dense", "lapp (learned thresholds)", "gradual magnitude, uniform", "gradual magnitude, global")
    res = {k: {"acc": [], "flops": [], "sparsity": []} for k in labels}
    layer_sp: dict[str, list] = {}
    global_sp, shifts = [], []
    for seed in ctx.seeds:
        data = ctx.data(seed, train=TRAIN, test=TEST)
        cfg = ctx.config(model="cnn", epochs=epochs + finetune, seed=seed)
        torch.manual_seed(seed)
        dense = build_model("cnn")
        positions = output_positions(dense, data["x_train"][:2], list(prunable(dense)))
        train_epochs(dense, data, cfg.epochs, cfg, None, "dense", None, progress=False, seed=seed)
        res["dense"]["acc"].append(evaluate(dense, data["x_test"], data["y_test"]))
        res["dense"]["flops"].append(1.0)
        res["dense"]["sparsity"].append(0.0)
        _, masks, info = ctx.train_prune(data, model="cnn", learn="lapp", sparsity=FLOPS_REMOVED, epochs=epochs,
                                         finetune_epochs=finetune, seed=seed)
        L = info["learn"]
        shifts.append(L["shift"])
        for n, row in L["layers"].items():
            layer_sp.setdefault(n, []).append(row["sparsity"])
        runs = {"lapp (learned thresholds)": (info, masks)}
        _, m_u, i_u = ctx.train_prune(data, model="cnn", schedule="gradual", allocation="uniform",
                                      sparsity=FLOPS_REMOVED, epochs=epochs, finetune_epochs=finetune, seed=seed)
        runs["gradual magnitude, uniform"] = (i_u, m_u)
        sp = _global_for_flops(dense, positions, 1.0 - FLOPS_REMOVED)
        global_sp.append(sp)
        _, m_g, i_g = ctx.train_prune(data, model="cnn", schedule="gradual", allocation="global", sparsity=sp,
                                      epochs=epochs, finetune_epochs=finetune, seed=seed)
        runs["gradual magnitude, global"] = (i_g, m_g)
        for k, (inf, m) in runs.items():
            res[k]["acc"].append(inf["metrics"]["test_acc"])
            res[k]["flops"].append(float(flops_ratio(m.masks, positions)))
            res[k]["sparsity"].append(m.sparsity())
    rows = []
    for k in labels:
        acc, std = ctx.mean_std(res[k]["acc"])
        rows.append({"label": k, "acc": round(acc, 4), "acc_std": round(std, 4),
                     "flops_ratio": round(ctx.mean_std(res[k]["flops"])[0], 4),
                     "weight_sparsity": round(ctx.mean_std(res[k]["sparsity"])[0], 4)})
    dense_row, lapp_row, uni_row, glob_row = rows
    best = max((uni_row, glob_row), key=lambda r: r["acc"])
    verdict = ctx.versus(lapp_row, best)
    per_layer = ", ".join(f"{n.removesuffix('.weight')} {sum(v) / len(v):.2f}" for n, v in layer_sp.items())
    findings = [
        f"At {lapp_row['flops_ratio']:.1%} of the dense FLOPs LAPP reached {lapp_row['acc']:.4f} ± "
        f"{lapp_row['acc_std']:.4f}, {verdict} the best gradual baseline ({best['label']}: {best['acc']:.4f} ± "
        f"{best['acc_std']:.4f}); uniform {uni_row['acc']:.4f} at {uni_row['flops_ratio']:.1%} FLOPs, global "
        f"{glob_row['acc']:.4f} at {glob_row['flops_ratio']:.1%} FLOPs; dense {dense_row['acc']:.4f}.",
        f"LAPP's learned per-layer sparsity: {per_layer} (weight sparsity {lapp_row['weight_sparsity']:.1%}: the "
        f"constraint is on FLOPs, so the wide fc layer, 1 output position, is cheap to keep); common threshold shift "
        f"to meet the target {', '.join(f'{s:+.3f}' for s in shifts)}.",
    ]
    setup = (f"Fashion-MNIST SmallCNN ('cnn'), {TRAIN if not ctx.quick else ctx.train_subset} training images (a "
             f"seeded subset per seed), {TEST if not ctx.quick else ctx.test_subset} test images, SGD lr 0.05 cosine, "
             f"batch 128, seeds {list(ctx.seeds)}; {FLOPS_REMOVED:.0%} of the conv/linear FLOPs removed. LAPP: learner "
             f"`lapp` (lam 20, temperature 0.1, both-sided penalty, ramp 0.7), {epochs} epoch(s) from scratch + "
             f"{finetune} with the masks fixed. Gradual magnitude (uniform at sparsity {FLOPS_REMOVED}; global at "
             f"{', '.join(f'{s:.3f}' for s in global_sp)}, matched to the FLOPs on each seed's dense model): "
             f"{epochs + finetune} epochs, cubic from 10% to 70% of the steps, every 25 steps. Dense: "
             f"{epochs + finetune} epochs.")
    return {"setup": setup, "rows": rows, "targets": [], "findings": findings, "plot": "acc"}

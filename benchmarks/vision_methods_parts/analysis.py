"""Analysis views (``prunekit compare``, :mod:`prunekit.vision.compare`) of a dense SmallCNN against magnitude 90%
(pruned after training, then fine-tuned) and SNIP 90% (pruned at initialization, then trained) at equal epochs, and
the three-regime diagnosis of two magnitude-90% models fine-tuned from one dense model with different data orders,
at two temperatures (the dense training's epochs). One seed: these are diagnostics, not a method comparison.
"""

from __future__ import annotations

import copy
import statistics

import torch

from prunekit.vision import compare as C
from prunekit.vision.models import build_model
from prunekit.vision.train import evaluate, prune_once, train_epochs

TRAIN, TEST = 6000, 1000
DENSE_EPOCHS, FT_EPOCHS = 2, 1
SPARSITY = 0.9
SEVERITIES = (1, 3, 5)
TEMPERATURES = (1, 2)  # dense epochs before pruning


def _dense(ctx, data, seed, epochs):
    cfg = ctx.config(model="cnn", epochs=epochs, seed=seed)
    torch.manual_seed(seed)
    model = build_model("cnn", num_classes=10)
    train_epochs(model, data, cfg.epochs, cfg, None, "dense", progress=False, seed=seed)
    return model.eval(), cfg


def _magnitude(ctx, data, dense, cfg, order_seed):
    model = copy.deepcopy(dense)
    masks = prune_once(model, data, cfg, SPARSITY)
    masks.apply(model)
    train_epochs(model, data, ctx.epochs(FT_EPOCHS), cfg, masks, "finetune", progress=False, seed=order_seed)
    return model.eval()


def run(ctx) -> dict:
    seed = ctx.seeds[0]
    data = ctx.data(seed, train=TRAIN, test=TEST)
    x, y = data["x_test"], data["y_test"]
    dense, cfg = _dense(ctx, data, seed, DENSE_EPOCHS)
    mag = _magnitude(ctx, data, dense, cfg, seed + 1)
    snip, _, _ = ctx.train_prune(data, model="cnn", criterion="snip", schedule="at-init", sparsity=SPARSITY,
                                 epochs=DENSE_EPOCHS + FT_EPOCHS, finetune_epochs=0, seed=seed)
    snip.eval()
    models = {"dense": dense, f"magnitude {SPARSITY:.0%}": mag, f"snip {SPARSITY:.0%}": snip}
    rob = {k: C.corruption_robustness(m, x, y, severities=SEVERITIES, seed=seed) for k, m in models.items()}
    rows, findings = [], []
    for label, m in models.items():
        row = {"label": label, "acc": round(evaluate(m, x, y), 4), "acc_std": 0.0,
               "corrupted_acc": round(rob[label]["overall"], 4)}
        if m is not dense:
            cka = C.layer_cka(dense, m, x[:500])
            ag = C.agreement(dense, m, x, y)
            pls = [C.decision_plane(dense, m, x[idx], resolution=41, seed=seed) for idx in C.plane_anchors(x, y, 3, seed)]
            row.update({"agreement_with_dense": round(ag["agreement"], 4),
                        "cka_mean": round(statistics.fmean(cka.values()), 4),
                        "cka_min": round(min(cka.values()), 4),
                        "plane_disagreement": round(statistics.fmean(p["disagreement"] for p in pls), 4)})
            findings.append(f"{label} vs dense: top-1 agreement {ag['agreement']:.3f}, CKA per layer "
                            + ", ".join(f"{k} {v:.3f}" for k, v in cka.items())
                            + f"; the two disagree on {row['plane_disagreement']:.1%} of three planes through test images.")
        worst = min(rob[label]["mean"], key=rob[label]["mean"].get)
        findings.append(f"{label}: clean {rob[label]['clean']:.3f}, mean over corruptions (severities "
                        f"{','.join(map(str, SEVERITIES))}) {rob[label]['overall']:.3f}; worst {worst} "
                        f"{rob[label]['mean'][worst]:.3f}.")
        rows.append(row)
    for t in TEMPERATURES:
        d, c = (dense, cfg) if t == DENSE_EPOCHS else _dense(ctx, data, seed, t)
        a = mag if t == DENSE_EPOCHS else _magnitude(ctx, data, d, c, seed + 1)
        b = _magnitude(ctx, data, d, c, seed + 2)
        reg = C.three_regime(a, b, data, alphas=7, examples=1000, bn_batches=20, temperature={"dense epochs": ctx.epochs(t)},
                             load=1 - SPARSITY, seed=seed)
        rows.append({"label": f"2 x magnitude {SPARSITY:.0%}, dense {ctx.epochs(t)} epoch(s)",
                     "acc": round(statistics.fmean([evaluate(a, x, y), evaluate(b, x, y)]), 4), "acc_std": 0.0,
                     "barrier": round(reg["barrier"], 4), "logit_cka": round(reg["similarity"], 4),
                     "regime": reg["regime"]})
        findings.append(C.regime_line(reg))
    setup = (f"Fashion-MNIST, SmallCNN 'cnn' (width 32), {TRAIN if not ctx.quick else ctx.train_subset} training / "
             f"{TEST if not ctx.quick else ctx.test_subset} test images, seed {seed}; SGD lr 0.05, batch 128, cosine "
             f"per phase. Dense: {ctx.epochs(DENSE_EPOCHS)} epochs; magnitude {SPARSITY:.0%}: global magnitude on the "
             f"trained dense model, {ctx.epochs(FT_EPOCHS)} fine-tuning epoch; SNIP {SPARSITY:.0%}: global SNIP at "
             f"initialization, {ctx.epochs(DENSE_EPOCHS + FT_EPOCHS)} epochs (equal total). CKA per layer on 500 test "
             f"images, corruptions at severities {','.join(map(str, SEVERITIES))}, three 41x41 planes. Regime: two "
             f"magnitude-{SPARSITY:.0%} models from one dense model (dense epochs = the temperature "
             f"{', '.join(str(ctx.epochs(t)) for t in TEMPERATURES)}), fine-tuned with different data orders; LMC at 7 "
             f"points on 1000 training images, BatchNorm re-estimated on 20 batches; thresholds barrier 0.1, logit CKA 0.9.")
    return {"setup": setup, "rows": rows, "targets": [], "findings": findings, "plot": "acc"}

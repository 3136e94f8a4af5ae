"""PQ index + SAP (Diao et al., ICLR 2023) vs the lottery schedule (iterative magnitude pruning with rewinding) at the
sparsity SAP reached, equal epochs: Fashion-MNIST, SmallCNN ('cnn').

Per seed one dense model is trained (its weights at iteration ``REWIND`` kept) and every method starts from it: SAP
at the paper's defaults (p = 0.5, q = 1, eta_r = 0, beta = 0.9, global scope) with gamma = 1 (the paper's default)
and gamma = 3 (the smallest of its gamma study), then lottery (``prunekit.vision.train.lottery``, magnitude / global,
the same rounds, rewind point and epochs) to that seed's SAP sparsity, its rounds the geometric ramp
1 - (1 - s)^(r / R). The two differ only in how much each round removes.
"""

from __future__ import annotations

import copy
import statistics

import torch

from prunekit.vision.models import build_model
from prunekit.vision.pq import SapOptions, layer_pq
from prunekit.vision.schedules import Rewinder, Sap, lottery_sparsities
from prunekit.vision.train import evaluate, lottery, train_epochs

ROUNDS = 3
GAMMAS = (1.0, 3.0)
TRAIN, TEST = 4000, 2000
DENSE_EPOCHS, ROUND_EPOCHS = 2, 1
REWIND = 32  # the end of the first dense epoch (4000 images / batch 128); 0 in a quick run


def _short(name: str) -> str:
    return name.removesuffix(".weight")


def run(ctx) -> dict:
    rewind = 0 if ctx.quick else REWIND
    results: dict = {g: {"sap_acc": [], "lt_acc": [], "sparsity": [], "traj": [], "pq": []} for g in GAMMAS}
    dense_acc = []
    for seed in ctx.seeds:
        data = ctx.data(seed, train=TRAIN, test=TEST)
        cfg = ctx.config(model="cnn", epochs=ROUND_EPOCHS, rounds=ROUNDS, rewind_step=rewind, seed=seed,
                         allocation="global")
        dense_cfg = ctx.config(model="cnn", epochs=DENSE_EPOCHS, seed=seed)
        torch.manual_seed(seed)
        dense = build_model("cnn", num_classes=10)
        rew = Rewinder()
        if rewind == 0:
            rew.save(dense, 0)

        def save_early(step, model=dense):
            if step == rewind and rew.state is None:
                rew.save(model, step)

        train_epochs(dense, data, dense_cfg.epochs, dense_cfg, None, "dense", progress=False, on_step=save_early,
                     seed=seed)
        dense_acc.append(evaluate(dense, data["x_test"], data["y_test"]))
        for g in GAMMAS:
            model = copy.deepcopy(dense)
            sched = Sap(ROUNDS, SapOptions(gamma=g), rewind_step=rewind)
            masks = lottery(model, data, cfg, [], progress=False, dense_trained=True, rewinder=rew, schedule=sched)
            final_pq = layer_pq(model, masks)
            r = results[g]
            r["sap_acc"].append(evaluate(model, data["x_test"], data["y_test"]))
            s = masks.sparsity()
            r["sparsity"].append(s)
            r["traj"].append([row["sparsity"] for row in sched.log])
            r["pq"].append([{**row["pq"], "global": row["pq_global"]} for row in sched.log] + [final_pq])
            model = copy.deepcopy(dense)
            lt = lottery(model, data, cfg, lottery_sparsities(s, ROUNDS), progress=False, dense_trained=True,
                         rewinder=rew)
            assert abs(lt.sparsity() - s) < 1e-5
            r["lt_acc"].append(evaluate(model, data["x_test"], data["y_test"]))
    rows = []
    da, ds = ctx.mean_std(dense_acc)
    rows.append({"label": "dense", "acc": round(da, 4), "acc_std": round(ds, 4), "sparsity": 0.0,
                 "epochs": ctx.epochs(DENSE_EPOCHS)})
    findings = []
    total_epochs = ctx.epochs(DENSE_EPOCHS) + ROUNDS * ctx.epochs(ROUND_EPOCHS)
    for g in GAMMAS:
        r = results[g]
        sm, ss = ctx.mean_std(r["sparsity"])
        traj = [statistics.fmean(t[i] for t in r["traj"]) for i in range(ROUNDS)]
        for label, key in ((f"SAP gamma={g:g}", "sap_acc"), (f"lottery @ SAP gamma={g:g} sparsity", "lt_acc")):
            am, asd = ctx.mean_std(r[key])
            rows.append({"label": label, "acc": round(am, 4), "acc_std": round(asd, 4), "sparsity": round(sm, 4),
                         "sparsity_std": round(ss, 4), "epochs": total_epochs,
                         "rounds": " -> ".join(f"{x:.3f}" for x in (traj if key == "sap_acc" else
                                                                     lottery_sparsities(sm, ROUNDS)))})
        layers = list(r["pq"][0][0])
        pq_mean = [{k: statistics.fmean(seed_pq[i][k] for seed_pq in r["pq"]) for k in layers}
                   for i in range(ROUNDS + 1)]
        glob = " -> ".join(f"{p['global']:.3f}" for p in pq_mean)
        per_layer = "; ".join(f"{_short(k)} " + " -> ".join(f"{p[k]:.3f}" for p in pq_mean)
                              for k in layers if k != "global")
        diff = statistics.fmean(r["sap_acc"]) - statistics.fmean(r["lt_acc"])
        findings.append(f"SAP gamma={g:g} reached {sm:.1%} ± {ss:.1%} sparsity in {ROUNDS} rounds "
                        f"({' -> '.join(f'{x:.1%}' for x in traj)}); at that sparsity and {total_epochs} epochs it "
                        f"scored {diff * 100:+.2f} points against lottery's geometric rounds.")
        findings.append(f"PQ index (p=0.5, q=1) over rounds, gamma={g:g} (before each pruning, then the final "
                        f"model; mean over seeds): global {glob}; per layer: {per_layer}.")
    setup = (f"Fashion-MNIST, SmallCNN 'cnn' (width 32), {TRAIN if not ctx.quick else ctx.train_subset} training / "
             f"{TEST if not ctx.quick else ctx.test_subset} test images, {len(ctx.seeds)} seed(s); SGD lr 0.05, "
             f"batch 128, cosine per phase. Per seed one dense model ({DENSE_EPOCHS} epochs, weights at iteration "
             f"{rewind} kept) that every method starts from; then {ROUNDS} rounds of (prune, rewind survivors to "
             f"iteration {rewind}, train {ROUND_EPOCHS} epoch). SAP: p=0.5, q=1, eta_r=0, beta=0.9, global magnitude "
             f"ranking, gamma 1 (paper default) and 3; lottery: the same rounds, rewind point and epochs, global "
             f"magnitude, to that seed's SAP sparsity along 1 - (1 - s)^(r/R). Test accuracy mean ± std over seeds.")
    return {"setup": setup, "rows": rows, "targets": [], "findings": findings, "plot": "acc"}

"""FedTiny (Huang et al., ICDCS 2023) on Flower's apps, against federated dense training (FedAvg) and
prune-after-federation at the same sparsity, the same rounds and the same local epochs, on non-IID Fashion-MNIST
clients (Dirichlet alpha ``ALPHA`` over the labels) with SmallCNN.

* fedtiny: adaptive BatchNorm selection of the initial mask among ``CANDIDATES`` magnitude masks (erk, uniform,
  lamp, global allocations), masked FedAvg, prune-and-grow from the clients' top-K gradients every ``EVERY``
  rounds until T_end = ``ROUNDS`` - ``FINETUNE``, then ``FINETUNE`` rounds with the mask fixed;
* dense: FedAvg of the dense model, ``ROUNDS`` rounds;
* prune-after: dense FedAvg for T_end rounds, global magnitude pruning of the global model, ``FINETUNE`` masked
  rounds.

Every row: the global model's test accuracy (mean ± std over the seeds), the payload bytes down and up over the
whole run (sparse values + mask bitmaps when a mask is new + gradient reports; fedtiny's selection round included),
the values a client holds and its peak training memory estimate.
"""

from __future__ import annotations

SPARSITY = 0.9
CLIENTS, ALPHA = 4, 0.5
ROUNDS, FINETUNE, EVERY = 20, 4, 2
CANDIDATES = 4
TRAIN, TEST = 6000, 2000
VARIANTS = ("fedtiny", "dense", "prune-after")


def run(ctx) -> dict:
    rounds, finetune = (3, 1) if ctx.quick else (ROUNDS, FINETUNE)
    res = {v: {"acc": [], "down": [], "up": [], "held": [], "peak": [], "sel": []} for v in VARIANTS}
    images: list = []
    for seed in ctx.seeds:
        data = ctx.data(seed, train=TRAIN, test=TEST)
        for v in VARIANTS:
            _, _, info = ctx.train_prune(data, model="cnn", sparsity=SPARSITY, seed=seed, learn="fedtiny",
                                         options={"variant": v, "clients": CLIENTS, "alpha": ALPHA,
                                                  "rounds": rounds, "finetune_rounds": finetune,
                                                  "adjust_every": EVERY, "candidates": CANDIDATES})
            L = info["learn"]
            r = res[v]
            r["acc"].append(info["metrics"]["test_acc"])
            r["down"].append(L["communication"]["bytes_down"])
            r["up"].append(L["communication"]["bytes_up"])
            r["held"].append(L["client_memory"]["values_held"])
            r["peak"].append(L["client_memory"]["peak_train_bytes"])
            if L["selection"] is not None:
                r["sel"].append(L["selection"]["allocations"][L["selection"]["chosen"]])
            if v == "dense":
                images.append(L["client_images"])
    rows = []
    for v in VARIANTS:
        r = res[v]
        acc, std = ctx.mean_std(r["acc"])
        down, up = ctx.mean_std(r["down"])[0], ctx.mean_std(r["up"])[0]
        rows.append({"label": v, "acc": round(acc, 4), "acc_std": round(std, 4),
                     "mb_down": round(down / 1e6, 2), "mb_up": round(up / 1e6, 2),
                     "mb_total": round((down + up) / 1e6, 2),
                     "client_values": int(ctx.mean_std(r["held"])[0]),
                     "client_peak_mb": round(ctx.mean_std(r["peak"])[0] / 1e6, 2)})
    tiny, dense, after = rows
    ratio = tiny["mb_total"] / dense["mb_total"]
    gap = dense["acc"] - tiny["acc"]
    target = {"target": "FedTiny within 2 points of federated dense at 90% sparsity with less communication",
              "met": gap <= 0.02 and ratio < 1.0,
              "detail": f"fedtiny {tiny['acc']:.4f} ± {tiny['acc_std']:.4f} vs dense {dense['acc']:.4f} ± "
                        f"{dense['acc_std']:.4f} (dense minus fedtiny: {gap * 100:+.2f} points), {tiny['mb_total']:.2f} MB vs "
                        f"{dense['mb_total']:.2f} MB in all ({ratio:.1%}); means over seeds {list(ctx.seeds)}."}
    findings = [
        f"Prune-after-federation reached {after['acc']:.4f} ± {after['acc_std']:.4f} with {after['mb_total']:.2f} MB "
        f"(its dense rounds cost as much as dense FedAvg's); fedtiny's clients hold {tiny['client_values']:,} values "
        f"vs {dense['client_values']:,} dense, peak training memory estimate {tiny['client_peak_mb']:.2f} MB vs "
        f"{dense['client_peak_mb']:.2f} MB (one batch's activations dominate both).",
        f"Adaptive BatchNorm selection chose: {', '.join(res['fedtiny']['sel'])} (per seed).",
    ]
    n_train = TRAIN if not ctx.quick else ctx.train_subset
    setup = (f"Fashion-MNIST SmallCNN ('cnn'), {n_train} training images (a seeded subset per seed) split over "
             f"{CLIENTS} clients by Dirichlet alpha {ALPHA} over the labels (images per client, seed by seed: "
             f"{images}), {TEST if not ctx.quick else ctx.test_subset} test images on the server, {rounds} rounds of "
             f"1 local epoch (SGD lr 0.05 cosine within the round, batch 128, FedAvg weighted by images), sparsity "
             f"{SPARSITY:.0%} of the conv/linear weights. fedtiny: {CANDIDATES} candidate masks (erk, uniform, lamp, "
             f"global magnitude at init), each scored by the clients' loss after re-estimating BatchNorm on 4 of their "
             f"batches; prune-and-grow every {EVERY} rounds (fraction 0.2 cosine-decayed, top-K gradient reports with "
             f"K = the layer's move) until round {rounds - finetune}, then {finetune} rounds with the mask fixed. "
             f"prune-after: {rounds - finetune} dense rounds, global magnitude pruning, {finetune} masked rounds. "
             f"Bytes: the payloads as Flower serializes them (npy data of each Array, 8 bytes per metric/config "
             f"value), over all clients, down and up; seeds {list(ctx.seeds)}; the rounds run in process "
             f"(learner fedtiny's LocalGrid), 1 CPU thread.")
    return {"setup": setup, "rows": rows, "targets": [target], "findings": findings, "plot": "acc"}

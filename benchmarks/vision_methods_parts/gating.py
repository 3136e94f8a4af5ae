"""Dynamic channel gating, Fire Together Wire Together (Elkerdawy et al., CVPR 2022), against static channel pruning at
the same average MACs and equal epochs on Fashion-MNIST SmallCNN.

* gating: ``EPOCHS`` dense epochs, then ``FINETUNE`` epoch(s) with the gates (predictors GAP -> linear, trained with
  BCE toward each input's top-(1 - ``SPARSITY``) heat-map channels, backbone fine-tuned); the average executed MACs
  per test image (kept-in x kept-out per layer, plus the predictors) and the batch-1 CPU time of the skip execution;
* l1 / bn-scale: ``EPOCHS`` dense epochs, channel pruning at the uniform ratio whose MACs come closest to gating's
  average executed MACs, ``FINETUNE`` epoch(s) of fine-tuning, BatchNorm re-estimation.

Every row: test accuracy (mean ± std over the seeds), MACs per image (gating: the average over the test images),
parameters, and the batch-1 milliseconds per image against the dense network timed in the same process.
"""

from __future__ import annotations


from vision_methods_parts.polarization import _ratio_for_macs

from prunekit.vision.channels import count_macs
from prunekit.vision.learn.gating import batch1_seconds, strip_gates

SPARSITY = 0.5
EPOCHS, FINETUNE = 3, 2
TRAIN, TEST = 5000, 2000
TIMED = 200


def _ms(model, x, repeats: int = 3) -> float:
    """Milliseconds per image, batch 1 (:func:`prunekit.vision.learn.gating.batch1_seconds`)."""
    return 1e3 * batch1_seconds(model, x, repeats)


def run(ctx) -> dict:
    epochs, finetune = ctx.epochs(EPOCHS), ctx.epochs(FINETUNE)
    timed = 16 if ctx.quick else TIMED
    labels = ("gating (FTWT)", "l1 channels (static)", "bn-scale channels (static)", "dense")
    res = {k: {"acc": [], "macs": [], "params": [], "ms": [], "speedup": []} for k in labels}
    ratios, opened, dense_macs = [], [], None
    for seed in ctx.seeds:
        data = ctx.data(seed, train=TRAIN, test=TEST)
        example = data["x_train"][:1]
        x = data["x_test"][:timed]
        model, _, info = ctx.train_prune(data, model="cnn", epochs=epochs, finetune_epochs=finetune, seed=seed,
                                         sparsity=SPARSITY, learn="gating", options={"speed_images": timed})
        L = info["learn"]
        dense_macs = L["macs_dense"]
        macs = L["macs_executed"] + L["macs_predictors"]
        dense_ms = _ms(strip_gates(model), x)
        gated_ms = L["speed"]["gated_ms"] * dense_ms / L["speed"]["dense_ms"]  # its own ratio, on this timing
        opened.append(sum(L["open_fraction"].values()) / len(L["open_fraction"]))
        for label, acc, m, p, ms in ((labels[0], L["gated_acc"], macs, info["metrics"]["params"], gated_ms),
                                     (labels[3], L["dense_acc"], dense_macs,
                                      sum(t.numel() for t in strip_gates(model).parameters()), dense_ms)):
            r = res[label]
            r["acc"].append(acc)
            r["macs"].append(m)
            r["params"].append(p)
            r["ms"].append(ms)
            r["speedup"].append(dense_ms / ms)
        ratio, _ = _ratio_for_macs(int(macs), example)
        ratios.append(ratio)
        for label, crit in ((labels[1], "l1"), (labels[2], "bn-scale")):
            static, _, done = ctx.train_prune(data, model="cnn", structure="channels", criterion=crit, sparsity=ratio,
                                              epochs=epochs, finetune_epochs=finetune, seed=seed)
            ms = _ms(static, x)
            r = res[label]
            r["acc"].append(done["metrics"]["test_acc"])
            r["macs"].append(count_macs(static, example))
            r["params"].append(done["metrics"]["params"])
            r["ms"].append(ms)
            r["speedup"].append(dense_ms / ms)
    rows = []
    for label in labels:
        rows.append(ctx.mean_row(label, res[label], dense_macs, ms_per_image=("ms", 3), speedup=("speedup", 2)))
    gate, l1, bns, dense = rows
    best = max((l1, bns), key=lambda x: x["acc"])
    verdict = ctx.versus(gate, best)
    findings = [
        f"At {gate['macs_ratio']:.0%} of the dense MACs on average (gates open {ctx.mean_std(opened)[0]:.0%} of the "
        f"time, predictors included) and {epochs + finetune} epochs, gating reached {gate['acc']:.4f} ± "
        f"{gate['acc_std']:.4f}, {verdict} the best static pruning at the same MACs ({best['label']}: "
        f"{best['acc']:.4f} ± {best['acc_std']:.4f}); dense {dense['acc']:.4f} after {epochs} epoch(s).",
        f"Measured batch-1 CPU time (1 thread): dense {dense['ms_per_image']:.3f} ms, gated skip execution "
        f"{gate['ms_per_image']:.3f} ms ({gate['speedup']:.2f}x), static l1 {l1['ms_per_image']:.3f} ms "
        f"({l1['speedup']:.2f}x): the MACs gating saves per input "
        f"{'turn into time' if gate['speedup'] > 1 else 'do not turn into time'} at this size (per-input "
        f"index_select of weights and scatter of outputs against convolutions of a few MFLOPs), while the static "
        f"network is a plain smaller network.",
    ]
    setup = (f"Fashion-MNIST SmallCNN ('cnn', 4 conv + BatchNorm, {dense_macs:,} MACs per image), "
             f"{TRAIN if not ctx.quick else ctx.train_subset} training images (a seeded subset per seed), "
             f"{TEST if not ctx.quick else ctx.test_subset} test images, SGD lr 0.05 cosine, batch 128, seeds "
             f"{list(ctx.seeds)}. Gating: learner `gating`, {epochs} dense epoch(s) then {finetune} epoch(s) with the "
             f"4 conv gates (GAP -> linear predictors, BCE toward each input's top {1 - SPARSITY:.0%} channels of the "
             f"spatial-max heat map, lam 1, threshold 0.5), executed MACs averaged over the test images. Static: "
             f"channel pruning (Torch-Pruning graph, uniform ratio chosen per seed so the MACs come closest to "
             f"gating's average: ratios {', '.join(f'{x:.3f}' for x in ratios)}) by l1 or bn-scale after the same "
             f"{epochs} dense epoch(s), {finetune} fine-tune epoch(s), BatchNorm re-estimation. Speed: ms per image at "
             f"batch 1 over {timed} test images, best of 3 passes, 1 thread, dense timed in the same process.")
    return {"setup": setup, "rows": rows, "targets": [], "findings": findings, "plot": "acc"}

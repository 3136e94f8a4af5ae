"""Polarization pruning (Zhuang et al., NeurIPS 2020), one pass, against prunekit's channel pruning at equal MACs and
equal epochs on Fashion-MNIST SmallCNN.

* polarization: ``EPOCHS`` epochs with the polarizer (lam ``LAM``, t ``T``, scales from 0.5, clamped to [0, 1]),
  each layer's valley as the threshold, the channels removed, ``FINETUNE`` epoch(s) of fine-tuning;
* bn-scale after L1 (network slimming): ``EPOCHS`` epochs with lam ``LAM`` x ||gamma||_1 (scales from 0.5), then
  channel pruning by |gamma| (criterion ``bn-scale``), uniform ratio, ``FINETUNE`` epoch(s);
* bn-scale and magnitude (group L2) after plain dense training (``EPOCHS``), same ratio and fine-tune.

The uniform ratio of the baselines is chosen per seed so that their MACs (``count_macs``) come closest to what
polarization kept. Every row: test accuracy after the fine-tune (mean ± std over the seeds), right after the removal
(before any fine-tune or BatchNorm re-estimation) and before the removal.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunekit.vision.channels import count_macs, prune_channels
from prunekit.vision.models import build_model
from prunekit.vision.train import train_epochs, train_prune

LAM, T = 0.01, 1.2
EPOCHS, FINETUNE = 3, 1
TRAIN, TEST = 5000, 2000


def _ratio_for_macs(target: int, example: torch.Tensor) -> tuple[float, int]:
    """The uniform channel ratio whose pruned SmallCNN has the MACs closest to ``target`` (bisection; the counts
    only depend on the ratio)."""

    def macs(r: float) -> int:
        m = build_model("cnn")
        prune_channels(m, example, r, "magnitude", verify=False)
        return count_macs(m, example)

    lo, hi = 0.0, 0.95
    best = (0.0, macs(0.0))
    for _ in range(14):
        mid = (lo + hi) / 2
        got = macs(mid)
        if abs(got - target) < abs(best[1] - target):
            best = (mid, got)
        lo, hi = (mid, hi) if got > target else (lo, mid)
    return best


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _channels(model: nn.Module) -> int:
    return sum(m.num_features for m in _bns(model))


def run(ctx) -> dict:
    epochs, finetune = ctx.epochs(EPOCHS), ctx.epochs(FINETUNE)
    labels = ("polarization (valley)", "bn-scale after L1 (slimming)", "bn-scale after dense", "magnitude after dense")
    res: dict[str, dict[str, list]] = {k: {"acc": [], "removed": [], "trained": [], "macs": [], "params": [],
                                           "channels": []} for k in labels}
    dense_macs, ratios = None, []
    for seed in ctx.seeds:
        data = ctx.data(seed, train=TRAIN, test=TEST)
        example = data["x_train"][:1]
        # polarization: one training run with the polarizer, removal at the valley, fine-tune
        model, _, info = ctx.train_prune(data, model="cnn", epochs=epochs, finetune_epochs=finetune, seed=seed,
                                         learn="polarization", options={"lam": LAM, "t": T})
        L = info["learn"]
        dense_macs = L["macs_before"]
        r = res[labels[0]]
        r["acc"].append(info["metrics"]["test_acc"])
        r["removed"].append(L["acc_after_removal"])
        r["trained"].append(L["acc_polarized"])
        r["macs"].append(L["macs_after"])
        r["params"].append(L["params_after"])
        r["channels"].append(L["channels_after"])
        ratio, _ = _ratio_for_macs(L["macs_after"], example)
        ratios.append(ratio)
        # the baselines' trained models: L1 on the scales (slimming), plain dense
        cfg = ctx.config(model="cnn", epochs=epochs, seed=seed)
        torch.manual_seed(seed)
        slim = build_model("cnn")
        gammas = [m.weight for m in _bns(slim)]
        with torch.no_grad():
            for g in gammas:
                g.fill_(0.5)
        train_epochs(slim, data, cfg.epochs, cfg, None, "l1", None, progress=False, seed=seed,
                     regularizer=lambda m: LAM * sum(g.abs().sum() for g in gammas))
        torch.manual_seed(seed)
        dense = build_model("cnn")
        train_epochs(dense, data, cfg.epochs, cfg, None, "dense", None, progress=False, seed=seed)
        for label, trained, crit in ((labels[1], slim, "bn-scale"), (labels[2], dense, "bn-scale"),
                                     (labels[3], dense, "magnitude")):
            fields = dict(model="cnn", structure="channels", criterion=crit, sparsity=ratio, seed=seed, epochs=0)
            cut, _, at_cut = train_prune(ctx.config(**fields, finetune_epochs=0, bn_recalibrate=False),
                                         progress=False, model=copy.deepcopy(trained), data=data)
            tuned, _, done = train_prune(ctx.config(**fields, finetune_epochs=finetune), progress=False,
                                         model=copy.deepcopy(trained), data=data)
            r = res[label]
            r["acc"].append(done["metrics"]["test_acc"])
            r["removed"].append(at_cut["metrics"]["test_acc"])
            r["trained"].append(at_cut["dense_acc"])
            r["macs"].append(count_macs(tuned, example))
            r["params"].append(done["metrics"]["params"])
            r["channels"].append(_channels(tuned))
    rows = []
    for label in labels:
        rows.append(ctx.mean_row(label, res[label], dense_macs, acc_at_removal=("removed", 4),
                                 acc_before_removal=("trained", 4), bn_channels=("channels", 1)))
    pol, slim_row, bnd, mag = rows
    best_base = max(rows[1:], key=lambda x: x["acc"])
    verdict = ctx.versus(pol, best_base)
    findings = [
        f"At {pol['macs_ratio']:.0%} of the dense MACs ({pol['bn_channels']:.0f} of 192 BatchNorm channels kept by the "
        f"valley) and {epochs + finetune} epochs in all, one-pass polarization reached {pol['acc']:.4f} ± "
        f"{pol['acc_std']:.4f}, {verdict} the best baseline ({best_base['label']}: {best_base['acc']:.4f} ± "
        f"{best_base['acc_std']:.4f}); slimming {slim_row['acc']:.4f}, bn-scale {bnd['acc']:.4f}, magnitude "
        f"{mag['acc']:.4f} at {mag['macs_ratio']:.0%} MACs.",
        f"Removal itself: polarization went from {pol['acc_before_removal']:.4f} to {pol['acc_at_removal']:.4f} "
        f"(its removed scales are at or near 0), slimming from {slim_row['acc_before_removal']:.4f} to "
        f"{slim_row['acc_at_removal']:.4f}, magnitude from {mag['acc_before_removal']:.4f} to "
        f"{mag['acc_at_removal']:.4f} before any fine-tune.",
    ]
    setup = (f"Fashion-MNIST SmallCNN ('cnn', 4 conv + BatchNorm, 192 BatchNorm channels, {dense_macs:,} MACs per "
             f"image), {TRAIN if not ctx.quick else ctx.train_subset} training images (a seeded subset per seed), "
             f"{TEST if not ctx.quick else ctx.test_subset} test images, SGD lr 0.05 cosine, batch 128, seeds "
             f"{list(ctx.seeds)}. Polarization: learner `polarization`, {epochs} epoch(s) with the polarizer (lam {LAM}, "
             f"t {T}, global mean, scales from 0.5 clamped to [0, 1]), each layer's histogram valley as threshold, "
             f"{finetune} fine-tune epoch(s). Baselines: channel pruning (Torch-Pruning graph, uniform ratio per layer, "
             f"chosen per seed so their MACs come closest to polarization's: ratios "
             f"{', '.join(f'{x:.3f}' for x in ratios)}) after {epochs} epoch(s) of L1 on the scales (lam {LAM}, scales "
             f"from 0.5; network slimming, criterion bn-scale) or of plain training (bn-scale, magnitude), then "
             f"{finetune} fine-tune epoch(s) and BatchNorm re-estimation, as in every channel run. Equal total epochs.")
    return {"setup": setup, "rows": rows, "targets": [], "findings": findings, "plot": "acc"}

"""DP4TL (Zhang et al. 2023): prune the source before pre-training, using the target. Source: the Fashion-MNIST
pool; target: scikit-learn digits (8x8, upscaled to 28x28), a few hundred labeled training images. A FastCNN is
pre-trained on each source subset (the same number of steps for every subset), fine-tuned on the target (a new
head, every weight, a fixed number of steps) and tested on the digits test split. The source model that label /
feature mapping look through is the full-source pre-training of the same seed."""

from __future__ import annotations

import copy

import numpy as np
import torch

KEEPS = (0.1, 0.3)
PRE_STEPS, FT_STEPS = 500, 80
TARGET_TRAIN = 100
CLUSTERS, TARGET_CLUSTERS, KMEANS_ITERS = 50, 10, 30


def run(ctx) -> dict:
    from prunekit.data import load_dataset, select
    from prunekit.data.compose import train_student
    from prunekit.data.datasets import DataSet
    from prunekit.data.select import validation_split
    from prunekit.data.train import TrainConfig, accuracy, features, fit, predict
    from prunekit.data.transfer import (feature_mapping_rank, finetune, keep_groups, label_frequency,
                                        label_mapping_keep, match_images, model_features)

    pre_steps, ft_steps = (40, 20) if ctx.quick else (PRE_STEPS, FT_STEPS)
    n_target = 100 if ctx.quick else TARGET_TRAIN
    im = ctx.images()
    src = im["train"].subset(im["pool"])
    xs, ys = features(src), torch.from_numpy(src.y)
    n = len(src)
    dig_tr, dig_te = load_dataset("digits", "train"), load_dataset("digits", "test")

    def as_input(d):  # digits at the source's 28x28
        return features(DataSet(d.name, "image", match_images(d.x, src.x.shape[1:])))

    xt_all, yt_all = as_input(dig_tr), torch.from_numpy(dig_tr.y)
    xte, yte = as_input(dig_te), torch.from_numpy(dig_te.y)

    def score(label, model, xt, yt, fcfg):
        """Fine-tune ``model`` (None: train from scratch) on the target sample; record its test accuracy."""
        m = finetune(copy.deepcopy(model), xt, yt, 10, fcfg) if model is not None else \
            train_student(xt, 10, fcfg, labels=yt)
        accs.setdefault(label, []).append(accuracy(m, xte, yte))

    accs: dict[str, list[float]] = {}
    extra: dict[str, dict] = {}
    freq_sum = np.zeros(src.num_classes)
    for seed in ctx.seeds:
        _, tidx = validation_split(dig_tr.y, n_target, seed=seed)  # a stratified labeled target sample
        xt, yt = xt_all[tidx], yt_all[tidx]
        fcfg = TrainConfig(steps=ft_steps, batch_size=64, seed=seed)
        pcfg = TrainConfig(steps=pre_steps, seed=seed)

        score("no pre-training", None, xt, yt, fcfg)
        full = fit(xs, ys, src.num_classes, pcfg)
        score("full source", full, xt, yt, fcfg)
        extra["full source"] = {"keep": 1.0, "source_images": n}
        logits = predict(full, xt).double().numpy()
        freq_sum += label_frequency(logits, src.num_classes)
        groups, dist = feature_mapping_rank(model_features(full, xs), model_features(full, xt), CLUSTERS,
                                            TARGET_CLUSTERS, seed=seed, max_iter=KMEANS_ITERS)
        for keep in KEEPS:
            subsets = {
                "random": select(np.zeros(n), keep, "random", seed=seed),
                "LM": label_mapping_keep(logits, src.y, keep, seed=seed),
                "FM": keep_groups(groups, dist, keep, seed=seed),  # = feature_mapping_keep, clustered once
            }
            for name, idx in subsets.items():
                label = f"{name} {keep:.0%}"
                model = fit(xs[idx], ys[idx], src.num_classes, pcfg, stats_from=xs)
                score(label, model, xt, yt, fcfg)
                classes = np.bincount(src.y[idx], minlength=src.num_classes)
                extra[label] = {"keep": keep, "source_images": len(idx),
                                "classes": int((classes > 0).sum())}

    rows = [ctx.row(label, a, **extra.get(label, {"keep": 0.0, "source_images": 0})) for label, a in accs.items()]
    by = {r["label"]: r for r in rows}

    def paired(a: str, b: str) -> tuple[str, int]:
        """Row ``a`` minus row ``b`` seed by seed (the same target sample and seed on both sides), in points, and on
        how many seeds ``a`` is ahead."""
        d = [100 * (x - y) for x, y in zip(accs[a], accs[b])]
        m, sd = ctx.mean_std(d)
        ahead = sum(v > 0 for v in d)
        return f"paired {m:+.2f} ± {sd:.2f} points, ahead on {ahead}/{len(d)} seeds", ahead

    targets, findings = [], []
    for method, name in (("LM", "label mapping"), ("FM", "feature mapping")):
        parts, wins = [], 0
        for keep in KEEPS:
            a, b = by[f"{method} {keep:.0%}"], by[f"random {keep:.0%}"]
            v = ctx.versus(a, b)
            wins += v == "above"
            parts.append(f"at {keep:.0%} of the source {a['acc']:.2f} ± {a['acc_std']:.2f} vs random "
                         f"{b['acc']:.2f} ± {b['acc_std']:.2f} ({v}; {paired(a['label'], b['label'])[0]})")
        met = wins == len(KEEPS)
        targets.append({"target": f"{name} ({method}) beats random source pruning at equal source size (DP4TL)",
                        "met": met, "detail": "; ".join(parts)})
        findings.append(f"{name}: {'reproduced' if met else 'not reproduced'} — " + "; ".join(parts) + ".")
    none, full = by["no pre-training"], by["full source"]
    text, ahead = paired("full source", "no pre-training")
    verdict = ("helps on every seed, by less than the spread across seeds (the target sample changes per seed)"
               if ahead == len(ctx.seeds) and ctx.versus(full, none) != "above" else
               "helps" if ctx.versus(full, none) == "above" else "does not clearly help")
    findings.append(f"Pre-training on the whole source: {full['acc']:.2f} ± {full['acc_std']:.2f} vs no pre-training "
                    f"{none['acc']:.2f} ± {none['acc_std']:.2f} ({ctx.versus(full, none)}; {text}): pre-training "
                    f"{verdict}.")
    order = np.argsort(-freq_sum)
    classes = src.classes or [str(i) for i in range(src.num_classes)]
    top = ", ".join(f"{classes[i]} ({freq_sum[i] / freq_sum.sum():.0%})" for i in order[:4])
    findings.append(f"The full-source model maps the digits mostly to {top}; with {src.num_classes} source classes a "
                    f"{KEEPS[0]:.0%} budget is about one whole class, so LM pre-trains on a single class there.")
    setup = (f"Source: the Fashion-MNIST pool ({n:,} images, {src.num_classes} classes); target: scikit-learn digits "
             f"(8x8 upscaled bilinearly to 28x28), {n_target} labeled training images (stratified, per seed), "
             f"{len(dig_te)} test images. FastCNN (width 16) pre-trained {pre_steps} steps (AdamW 2e-3, one-cycle, "
             f"batch 128, normalized with the full pool's statistics) on each source subset; fine-tuned {ft_steps} "
             f"steps (batch 64, a new head, all weights) on the target; 'no pre-training' trains the same steps from "
             f"scratch. LM: top-1 label-mapping frequency of the target images under the full-source model, whole "
             f"classes from the most mapped; FM: {CLUSTERS} k-means clusters (at most {KMEANS_ITERS} Lloyd iterations) "
             f"of the source embeddings ranked by the distance to the nearest of {TARGET_CLUSTERS} target centroids. "
             f"Random: seeded uniform. Keep "
             f"{', '.join(f'{k:.0%}' for k in KEEPS)} of the source; target test accuracy (%), mean ± std over seeds "
             f"{list(ctx.seeds)}; the paired differences compare two rows seed by seed (same target sample).")
    return {"setup": setup, "rows": rows, "targets": targets, "findings": findings, "plot": "acc"}

"""Prune-combine-augment (Xiao & He 2024) against random selection at the same storage budget (bytes of uint8 images
kept). Teacher: a FastCNN trained on the whole pool (cached as safetensors). Students: a FastCNN trained the same
number of steps on what each budget stores, tested on the 10k Fashion-MNIST test images."""

from __future__ import annotations

import numpy as np
import torch

BUDGETS = (0.02, 0.10)  # fractions of the pool's bytes
STEPS, TEACHER_STEPS = 700, 3000
FACTOR = 2
SCALE = (0.25, 1.0)


def _teacher(ctx, src, x, y, steps):
    """The pool's teacher: trained once, then read back from ``ctx.cache`` (safetensors, never a pickle)."""
    from safetensors.torch import load_file, save_file

    from prunekit.data.train import Standardize, TrainConfig, fit
    from prunekit.zoo.nets import FastCNN

    path = ctx.cache / f"pca_teacher_{src.fingerprint()}_w16_s{steps}.safetensors"
    if path.exists():
        model = Standardize(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), FastCNN(1, src.num_classes, 16))
        model.load_state_dict(load_file(str(path)))
        return model.eval(), True
    model = fit(x, y, src.num_classes, TrainConfig(steps=steps, seed=0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return model, False


def _grouped(idx, labels, seed):
    """``idx`` ordered by class (seeded order inside a class), so that a canvas holds one class where it can."""
    key = np.random.default_rng(seed).permutation(len(idx))
    return idx[np.lexsort((key, labels[idx]))]


def run(ctx) -> dict:
    from prunekit.data import select
    from prunekit.data.compose import combine, downsample, images_within, stored_bytes, train_student
    from prunekit.data.datasets import DataSet
    from prunekit.data.train import TrainConfig, accuracy, features, predict
    from prunekit.data.transfer import match_images

    steps, teacher_steps = (40, 100) if ctx.quick else (STEPS, TEACHER_STEPS)
    im = ctx.images()
    src = im["train"].subset(im["pool"])
    test = im["test"]
    x, y = features(src), torch.from_numpy(src.y)
    xte, yte = features(test), torch.from_numpy(test.y)
    n, shape = len(src), src.x.shape[1:]
    teacher, cached = _teacher(ctx, src, x, y, teacher_steps)
    teacher_acc = accuracy(teacher, xte, yte)
    # what a tile keeps: the test images area-downsampled like a tile, then upsampled back (bilinear)
    half = DataSet("half", "image", match_images(downsample(test.x, FACTOR), shape))
    teacher_half = accuracy(teacher, features(half), yte)
    logits = predict(teacher, x)
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    hardness = (other - true).double().numpy()  # minus the teacher's margin: higher = harder

    accs: dict[str, list[float]] = {}
    extra: dict[str, dict] = {}
    for frac in BUDGETS:
        budget = int(frac * src.x.nbytes)
        n1, nf = images_within(budget, shape, 1), images_within(budget, shape, FACTOR)
        for seed in ctx.seeds:
            cfg = TrainConfig(steps=steps, seed=seed)
            rand1 = select(np.zeros(n), n1 / n, "random", seed=seed)
            easy1 = select(hardness, n1 / n, "easiest", labels=src.y, class_balanced=True, seed=seed)
            randf = select(np.zeros(n), nf / n, "random", seed=seed)
            easyf = select(hardness, nf / n, "easiest", labels=src.y, class_balanced=True, seed=seed)
            assert len(rand1) == len(easy1) == n1 and len(randf) == len(easyf) == nf
            runs = {
                "random · hard": (src.x[rand1], dict(labels=src.y[rand1])),
                "random · hard + aug": (src.x[rand1], dict(labels=src.y[rand1], augment=True)),
                "random · soft + aug": (src.x[rand1], dict(teacher=teacher, augment=True)),
                "easiest · soft + aug": (src.x[easy1], dict(teacher=teacher, augment=True)),
                f"PCA: easiest · combine x{FACTOR * FACTOR} · soft + aug":
                    (combine(src.x[_grouped(easyf, src.y, seed)], FACTOR)[0], dict(teacher=teacher, augment=True)),
                f"random · combine x{FACTOR * FACTOR} · soft + aug":
                    (combine(src.x[_grouped(randf, src.y, seed)], FACTOR)[0], dict(teacher=teacher, augment=True)),
            }
            for name, (stored, kw) in runs.items():
                label = f"{frac:.0%} {name}"
                nbytes = stored_bytes(stored)
                assert nbytes <= budget
                model = train_student(stored, src.num_classes, cfg, stats_from=x, scale=SCALE, **kw)
                accs.setdefault(label, []).append(accuracy(model, xte, yte))
                extra[label] = {"budget": frac, "bytes": nbytes,
                                "images": nf if "combine" in name else n1, "stored": len(stored)}

    rows = [ctx.row(label, a, **extra[label]) for label, a in accs.items()]
    by = {r["label"]: r for r in rows}
    targets, findings = [], []
    pca_name = f"PCA: easiest · combine x{FACTOR * FACTOR} · soft + aug"
    comb_name = f"random · combine x{FACTOR * FACTOR} · soft + aug"
    parts, wins = [], 0
    for frac in BUDGETS:
        p = by[f"{frac:.0%} {pca_name}"]
        versus = {k: by[f"{frac:.0%} {k}"] for k in ("random · hard", "random · soft + aug")}
        vs = {k: ctx.versus(p, r) for k, r in versus.items()}
        wins += all(v == "above" for v in vs.values())
        parts.append(f"at {frac:.0%} of the pool's bytes ({p['bytes']:,} B) PCA {p['acc']:.2f} ± {p['acc_std']:.2f} "
                     "vs " + ", ".join(f"{k} {r['acc']:.2f} ± {r['acc_std']:.2f} ({vs[k]})"
                                       for k, r in versus.items()))
    met = wins == len(BUDGETS)
    targets.append({"target": "prune-combine-augment beats random selection at the same storage budget (hard and "
                              "soft labels)", "met": met, "detail": "; ".join(parts)})
    findings.append(f"PCA vs random at equal bytes: {'reproduced' if met else 'not reproduced'} — "
                    + "; ".join(parts) + ".")
    for frac in BUDGETS:
        e, c, rc, s, h, ha = (by[f"{frac:.0%} {k}"] for k in ("easiest · soft + aug", pca_name, comb_name,
                                                                "random · soft + aug", "random · hard",
                                                                "random · hard + aug"))
        findings.append(
            f"{frac:.0%}: soft labels {s['acc']:.2f} vs hard {h['acc']:.2f} (hard + aug {ha['acc']:.2f}; soft "
            f"{ctx.versus(s, ha)} hard + aug); easiest-by-teacher-margin {e['acc']:.2f} vs random {s['acc']:.2f} "
            f"({ctx.versus(e, s)}); combining {FACTOR * FACTOR}x the images at half resolution: easiest {c['acc']:.2f} "
            f"vs full-res {e['acc']:.2f} ({ctx.versus(c, e)}), random {rc['acc']:.2f} vs full-res {s['acc']:.2f} "
            f"({ctx.versus(rc, s)}).")
    findings.append(f"What a {FACTOR}x-downsampled tile keeps at 28 px: the teacher scores {100 * teacher_half:.2f}% "
                    f"on the test images downsampled {FACTOR}x and upsampled back, {100 * teacher_acc:.2f}% on the "
                    "originals; a student on canvases also sees objects at scales and positions the test images do not have.")
    where = "read from the cache" if cached else "trained in this run"
    setup = (f"Fashion-MNIST pool ({n:,} images, {src.x.nbytes:,} bytes as uint8), test {len(test):,} images. "
             f"Teacher: FastCNN trained {teacher_steps} steps on the whole pool ({where}; test accuracy "
             f"{100 * teacher_acc:.2f}%). Storage budgets {', '.join(f'{b:.0%}' for b in BUDGETS)} of "
             f"the pool's bytes; full-resolution rows keep that many whole images, combine rows {FACTOR * FACTOR}x "
             f"as many, each area-downsampled {FACTOR}x and tiled {FACTOR}x{FACTOR} into 28x28 canvases grouped by "
             f"class (bytes = the stored arrays' nbytes). Selection: seeded random, or class-balanced easiest by the "
             f"teacher's margin (true logit minus the best other). Students: FastCNN, {steps} steps of AdamW 2e-3 "
             f"one-cycle, batch 128 for every row, normalized with the pool's statistics. hard: cross-entropy on the "
             f"labels; soft: only the teacher's soft labels (KD, T=4) computed on each augmented batch, no labels "
             f"stored; aug: random resized crop (area {SCALE[0]}-{SCALE[1]}, aspect 3/4-4/3) + horizontal flip, "
             f"batched in torch. Test accuracy (%), mean ± std over seeds {list(ctx.seeds)}.")
    return {"setup": setup, "rows": rows, "targets": targets, "findings": findings, "plot": "acc"}

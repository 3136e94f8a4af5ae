"""Self-supervised prototypes ("Beyond neural scaling laws"): k-means in the space of a SimCLR encoder trained on
the pool itself (no labels), distance to the nearest prototype; against the supervised scores and the pixel-PCA
and ImageNet (EfficientNet-Lite0) prototypes. Also each embedding's linear-probe accuracy, to show what the
encoder learned."""

from __future__ import annotations

import numpy as np
import torch

from data_pruning_limited_parts.grid import STRATEGIES, grid

PROTOS = ("prototype-pca", "prototype-lite0", "prototype-simclr")


def probe(ctx, name: str, z: np.ndarray) -> dict:
    """Linear probe on the whole pool (early stopping on the validation split), test accuracy per seed."""
    from prunekit.data.embed import embed
    from prunekit.data.train import TrainConfig, accuracy, fit

    im = ctx.images()
    zt = {"pixel-PCA(64)": "pca", "SimCLR": "simclr", "EfficientNet-Lite0": "efficientnet-lite0"}[name]
    test = embed(im["test"], zt, image_size=64, cache=ctx.cache / "embeddings") if zt != "simclr" else None
    if zt == "simclr":  # the encoder is the pool's; embed the test images with it
        from prunekit.data.ssl import embed_images, encoder_for

        test = embed_images(encoder_for(im["train"].subset(im["pool"])), im["test"].x)
    elif zt == "pca":  # the PCA fitted on the pool, applied to the test images
        from sklearn.decomposition import PCA

        flat = im["train"].x[im["pool"]].reshape(len(im["pool"]), -1).astype(np.float32) / 255
        p = PCA(64, random_state=0).fit(flat[:20000])
        test = p.transform(im["test"].x.reshape(len(im["test"].x), -1).astype(np.float32) / 255)
        z = p.transform(flat)
    x, xt = torch.from_numpy(np.asarray(z, np.float32)), torch.from_numpy(np.asarray(test, np.float32))
    y = torch.from_numpy(im["train"].y[im["pool"]])
    n_val = len(im["val"])
    accs = []
    for s in ctx.seeds:  # the probe's own early-stopping split: the last n_val pool rows of a seeded permutation
        perm = torch.from_numpy(np.random.default_rng(s).permutation(len(x)))
        tr, va = perm[:-n_val], perm[-n_val:]
        m = fit(x[tr], y[tr], 10, TrainConfig(model="linear", steps=100 if ctx.quick else 1500, batch_size=256,
                                               lr=2e-3, seed=s), val=(x[va], y[va]), stats_from=x)
        accs.append(accuracy(m, xt, torch.from_numpy(im["test"].y)))
    return ctx.row(f"linear probe: {name}", accs)


def best(ctx, g, name, f):
    """The better strategy of score ``name`` at fraction ``f``: (row, strategy)."""
    rows = [(ctx.row(f"{name}/{s}", g[f"{name}/{s}"][f]), s) for s in STRATEGIES]
    return max(rows, key=lambda r: r[0]["acc"])


def run(ctx) -> dict:
    from prunekit.data.embed import embed

    from data_pruning_limited import SUPERVISED

    g = grid(ctx)
    im = ctx.images()
    pool_images = im["train"].subset(im["pool"])
    rows = [probe(ctx, "pixel-PCA(64)", None),
            probe(ctx, "SimCLR", embed(pool_images, "simclr")),
            probe(ctx, "EfficientNet-Lite0", embed(pool_images, "efficientnet-lite0", image_size=64,
                                                   cache=ctx.cache / "embeddings"))]
    fractions = [f for f in (0.5, 0.7, 0.9) if f in g["random"]]
    gaps, detail = [], []
    for f in fractions:
        sup, sup_name = max(((best(ctx, g, n, f), n) for n in SUPERVISED), key=lambda r: r[0][0]["acc"])
        for proto in PROTOS:
            r, strat = best(ctx, g, proto, f)
            rows.append({**r, "label": f"{proto} ({strat}) at {f:.0%}", "vs best supervised":
                         round(r["acc"] - sup[0]["acc"], 2)})
        ssl_row, ssl_strat = best(ctx, g, "prototype-simclr", f)
        gaps.append(sup[0]["acc"] - ssl_row["acc"])
        rows.append({**sup[0], "label": f"best supervised: {sup_name} ({sup[1]}) at {f:.0%}"})
        detail.append(f"{f:.0%}: SimCLR prototypes ({ssl_strat}) {ssl_row['acc']:.2f} vs {sup_name} ({sup[1]}) "
                      f"{sup[0]['acc']:.2f}")
    return {"setup": "Each score's better of easiest / hardest / ccs at each kept fraction (rows from the grid part); "
            "linear probes: a linear head on each embedding of the whole pool, test accuracy. SimCLR encoder: "
            "prunekit.data.ssl defaults (3 conv layers, width 16, 1,500 steps of 256 pairs, trained on the pool's "
            "55,000 images without labels, cached).",
            "rows": rows,
            "targets": [{"target": "self-supervised prototypes within 1 point of the best supervised score at 50-90% "
                         "kept", "met": bool(gaps) and max(gaps) <= 1.0, "detail": "; ".join(detail)}]}

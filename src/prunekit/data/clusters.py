"""k-means on embeddings: k-means++ seeding (scikit-learn) on the driver, then Lloyd iterations whose
assignment/partial-sum step runs on the engine (local blocks or Ray Data), reduced in float64 in block order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunekit.errors import PruneError


@dataclass
class Clusters:
    centroids: np.ndarray  # [k, d] float64
    labels: np.ndarray  # [N] int64
    distance: np.ndarray  # [N] euclidean distance to the own centroid
    inertia: float
    iterations: int


def _assign(X, C):
    # squared distances without forming [n, k, d]
    d2 = (X * X).sum(1, keepdims=True) - 2.0 * X @ C.T + (C * C).sum(1)[None]
    lab = d2.argmin(1)
    return lab, np.sqrt(np.maximum(d2[np.arange(len(X)), lab], 0.0))


def _partial(X, idx, C):
    x = X[idx].astype(np.float64)
    lab, dist = _assign(x, C)
    k = C.shape[0]
    sums = np.zeros_like(C)
    np.add.at(sums, lab, x)
    return {"sums": sums, "counts": np.bincount(lab, minlength=k).astype(np.float64), "inertia": np.array((dist ** 2).sum())}


def _final(X, idx, C):
    lab, dist = _assign(X[idx].astype(np.float64), C)
    return {"label": lab.astype(np.int64), "distance": dist}


def kmeans(X: np.ndarray, k: int, *, seed: int = 0, engine=None, max_iter: int = 100, tol: float = 1e-6,
           sample: int = 20000) -> Clusters:
    from sklearn.cluster import kmeans_plusplus

    from prunekit.data.engine import get_engine

    n = len(X)
    if k < 1 or k > n:
        raise PruneError(f"Cannot make {k} clusters of {n} examples; give --clusters between 1 and {n}.")
    eng = get_engine(engine)
    rng = np.random.default_rng(seed)
    samp = X[np.sort(rng.permutation(n)[:sample])].astype(np.float64)
    C, _ = kmeans_plusplus(samp, k, random_state=seed)
    handle = eng.put(X)
    it = 0
    prev = np.inf
    for it in range(1, max_iter + 1):
        parts = eng.map_blocks(_partial, n, handle, C)
        sums = np.sum([p["sums"] for p in parts], axis=0)
        counts = np.sum([p["counts"] for p in parts], axis=0)
        inertia = float(np.sum([p["inertia"] for p in parts]))
        empty = counts == 0
        newC = np.where(empty[:, None], C, sums / np.maximum(counts, 1)[:, None])
        shift = float(((newC - C) ** 2).sum())
        C = newC
        if shift <= tol * float((C ** 2).sum()) / max(k, 1) or abs(prev - inertia) <= tol * max(inertia, 1e-12):
            break
        prev = inertia
    fin = eng.map_rows(_final, n, handle, C)
    return Clusters(C, fin["label"], fin["distance"], float((fin["distance"] ** 2).sum()), it)

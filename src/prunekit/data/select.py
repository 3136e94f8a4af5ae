"""Choose the examples to keep from per-example scores (higher = harder). Every selection is a pure function of
its inputs and ``seed``; the result is the sorted array of kept indices.

Strategies
* ``easiest`` / ``hardest`` / ``random``: the lowest / highest scores, or a seeded uniform draw.
* ``ccs`` (Zheng et al. 2023, coverage-centric coreset selection): drop the hardest ``beta`` fraction, split the
  score range of the rest into ``bins`` equal-width strata and spend the budget over strata from the smallest
  up, giving each its even share of what is left (a stratum smaller than its share is kept whole), sampling
  uniformly inside a stratum.
* ``dbp`` (Abbas et al. 2024, density-based pruning over concept clusters): cluster complexity
  C_j = d_intra_j * d_inter_j (mean member distance to the centroid x mean distance to the ``neighbors``
  nearest other centroids); budgets ~ softmax(C / temperature) * total, capped by cluster size (the excess
  is handed on); inside a cluster the hardest (highest-score) examples are kept.
* ``semdedup`` (Abbas et al. 2023): inside each cluster, walk the examples from the one farthest from the
  centroid inwards and drop any whose cosine similarity to an already kept one exceeds 1 - eps. With
  ``keep`` and no ``eps``, eps is searched so that about ``keep`` of the data remains.

``class_balanced`` (easiest/hardest/random/ccs): every class keeps the same fraction (largest remainder).
"""

from __future__ import annotations

import numpy as np

from prunekit.core.masks import apportion
from prunekit.core.registry import Registry
from prunekit.errors import PruneError

STRATEGIES = Registry("strategy")
STRATEGIES.register_names((
    ("easiest", "keep the lowest scores"), ("hardest", "keep the highest scores"), ("random", "a seeded random subset"),
    ("ccs", "coverage-centric: drop the hardest beta, stratified over score bins"),
    ("dbp", "density-based: cluster budgets from cluster complexity"),
    ("semdedup", "semantic deduplication inside clusters"),
))


def budget(n: int, keep: float) -> int:
    check_keep(keep)
    return max(1, int(round(keep * n)))


def check_keep(keep) -> None:
    if keep is None or not (0.0 < float(keep) <= 1.0):
        raise PruneError(f"The keep fraction must be in (0, 1], got {keep}; e.g. --keep 0.3 keeps 30%.")


def _order(scores: np.ndarray, seed: int, descending: bool) -> np.ndarray:
    """Indices sorted by score; ties broken by a seeded permutation (reproducible, unbiased)."""
    tie = np.random.default_rng(seed).permutation(len(scores))
    key = -scores if descending else scores
    return np.lexsort((tie, key))


def _pick(scores, m, strategy, seed, beta=0.0, bins=50):
    n = len(scores)
    if m >= n:
        return np.arange(n)
    if strategy == "hardest":
        return _order(scores, seed, True)[:m]
    if strategy == "easiest":
        return _order(scores, seed, False)[:m]
    if strategy == "random":
        return np.random.default_rng(seed).permutation(n)[:m]
    if strategy == "ccs":
        return _ccs(scores, m, seed, beta, bins)
    raise AssertionError(strategy)


def ccs_bins(scores: np.ndarray, bins: int) -> np.ndarray:
    lo, hi = float(scores.min()), float(scores.max())
    if hi <= lo:
        return np.zeros(len(scores), dtype=np.int64)
    return np.minimum(((scores - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)


def _ccs(scores, m, seed, beta, bins):
    n = len(scores)
    order = _order(scores, seed, True)
    cut = int(round(beta * n))
    pool = np.sort(order[cut:])
    if m > len(pool):
        raise PruneError(f"CCS cannot keep {m} of {n} examples after dropping the hardest {cut}; "
                         "lower --beta or --keep so that beta + keep <= 1.")
    rng = np.random.default_rng(seed)
    b = ccs_bins(scores[pool], bins)
    strata = [pool[b == i] for i in range(bins)]
    strata = [s for s in strata if len(s)]
    strata.sort(key=len)
    chosen, left = [], m
    for i, s in enumerate(strata):
        share = left // (len(strata) - i)
        take = min(len(s), share)
        chosen.append(rng.choice(s, size=take, replace=False) if take < len(s) else s)
        left -= take
    out = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    if left > 0:  # rounding leftovers: fill from the unchosen pool at random
        rest = np.setdiff1d(pool, out)
        out = np.concatenate([out, rng.choice(rest, size=left, replace=False)])
    return out


def _largest_remainder(sizes: np.ndarray, total: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Integer quotas summing to ``total``, proportional to ``weights`` (default: sizes), each at most its size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    w = sizes.astype(np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.asarray(apportion(int(total), w.tolist(), sizes.tolist()), dtype=np.int64)


def select(scores, keep: float | None = None, strategy: str = "hardest", *, labels=None, class_balanced: bool = False,
           seed: int = 0, beta: float = 0.0, bins: int = 50, clusters=None, embeddings=None, eps: float | None = None,
           temperature: float = 0.1, neighbors: int = 5) -> np.ndarray:
    """Sorted indices of the examples to keep (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    strategy = STRATEGIES.canonical(strategy)
    if not np.isfinite(scores).all():
        raise PruneError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or Inf; score the data again.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PruneError(f"--seed must be an integer of at least 0, got {seed}.")
    if not (isinstance(bins, (int, np.integer)) and bins >= 1):
        raise PruneError(f"--bins must be at least 1, got {bins}.")
    if strategy == "dbp":
        if not temperature > 0 or not np.isfinite(temperature):
            raise PruneError(f"DBP --temperature must be a positive number, got {temperature}.")
        if not (isinstance(neighbors, (int, np.integer)) and neighbors >= 1):
            raise PruneError(f"DBP --neighbors must be at least 1, got {neighbors}.")
    if eps is not None and not 0.0 < eps <= 2.0:
        raise PruneError(f"SemDeDup --eps must be in (0, 2] (cosine distance), got {eps}.")
    if strategy == "semdedup":
        if keep is not None:
            check_keep(keep)
        if eps is None and keep is None:
            raise PruneError("semdedup needs --eps (similarity threshold 1 - eps) or --keep (eps is then searched).")
        return semdedup(_need(embeddings, "semdedup"), _need(clusters, "semdedup"), eps=eps, keep=keep)
    m = budget(n, keep)
    if strategy == "ccs":
        if not (0.0 <= beta < 1.0):  # also false for NaN
            raise PruneError(f"CCS --beta must be in [0, 1), got {beta}.")
        if beta + keep > 1.0 + 1e-9:
            raise PruneError(f"CCS with beta {beta} and keep {keep}: beta + keep > 1; lower one so the sum is at most 1.")
    if strategy == "dbp":
        return dbp(scores, m, _need(embeddings, "dbp"), _need(clusters, "dbp"), seed=seed, temperature=temperature,
                   neighbors=neighbors)
    if class_balanced:
        if labels is None:
            raise PruneError("--class-balanced needs labels; the score file has none (score a labeled data set).")
        labels = np.asarray(labels)
        classes, inv = np.unique(labels, return_inverse=True)
        sizes = np.bincount(inv)
        quotas = _largest_remainder(sizes, m)
        out = []
        for c, q in enumerate(quotas):
            members = np.flatnonzero(inv == c)
            if q:
                out.append(members[_pick(scores[members], int(q), strategy, seed + c, beta, bins)])
        return np.sort(np.concatenate(out))
    return np.sort(_pick(scores, m, strategy, seed, beta, bins))


def _need(arr, what):
    if arr is None:
        raise PruneError(f"The {what} strategy needs embeddings and clusters; score with --score prototype "
                         "(or add --with-embeddings to any score).")
    return np.asarray(arr)


def cluster_complexity(z: np.ndarray, clusters: np.ndarray, neighbors: int = 5):
    ids = np.unique(clusters)
    cents = np.stack([z[clusters == c].mean(0) for c in ids])
    intra = np.array([np.linalg.norm(z[clusters == c] - cents[i], axis=1).mean() for i, c in enumerate(ids)])
    d = np.linalg.norm(cents[:, None] - cents[None], axis=2)
    np.fill_diagonal(d, np.inf)
    k = max(1, min(neighbors, len(ids) - 1))
    inter = np.sort(d, axis=1)[:, :k].mean(1) if len(ids) > 1 else np.ones(1)
    return ids, intra, inter


def dbp(scores, m, z, clusters, *, seed=0, temperature=0.1, neighbors=5):
    z = np.asarray(z, dtype=np.float64)
    ids, intra, inter = cluster_complexity(z, clusters, neighbors)
    comp = intra * inter
    comp = comp / max(comp.max(), 1e-12)
    w = np.exp((comp - comp.max()) / temperature)
    sizes = np.array([(clusters == c).sum() for c in ids])
    quotas = _largest_remainder(sizes, m, weights=w)
    out = []
    for i, c in enumerate(ids):
        members = np.flatnonzero(clusters == c)
        if quotas[i]:
            out.append(members[_order(scores[members], seed + i, True)[:quotas[i]]])
    return np.sort(np.concatenate(out))


def _dedup_mask(z, clusters, eps):
    keep = np.zeros(len(z), dtype=bool)
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        zc = z[members]
        cent = zc.mean(0)
        cent = cent / max(np.linalg.norm(cent), 1e-12)
        order = np.argsort(-(1 - zc @ cent), kind="stable")  # farthest from the centroid first
        sims = zc[order] @ zc[order].T
        kept_local = np.zeros(len(members), dtype=bool)
        for j in range(len(order)):
            if j == 0 or not (sims[j, :j][kept_local[:j]] > 1 - eps).any():
                kept_local[j] = True
        keep[members[order[kept_local]]] = True
    return keep


def semdedup(z, clusters, *, eps=None, keep=None):
    z = np.asarray(z, dtype=np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    if eps is not None:
        if not (0.0 <= eps < 2.0):
            raise PruneError(f"--eps must be in [0, 2), got {eps}.")
        return np.flatnonzero(_dedup_mask(z, clusters, eps))
    target = budget(len(z), keep)
    lo, hi = 0.0, 2.0  # eps 0 drops only exact duplicates; 2 keeps one per cluster
    best = _dedup_mask(z, clusters, lo)
    if best.sum() <= target:
        return np.flatnonzero(best)
    for _ in range(30):
        mid = (lo + hi) / 2
        mask = _dedup_mask(z, clusters, mid)
        if mask.sum() >= target:
            lo, best = mid, mask
        else:
            hi = mid
    return np.flatnonzero(best)


def validation_split(labels, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pool, val): sorted disjoint indices of the training set, ``val`` holding ``size`` examples stratified by
    label (seeded), for early stopping. Carve it from the training set, never the test set; score and prune the
    pool only."""
    labels = np.asarray(labels)
    n = len(labels)
    if not (isinstance(size, (int, np.integer)) and 0 < size < n):
        raise PruneError(f"The validation split must hold between 1 and {n - 1} examples, got {size}.")
    classes, inv = np.unique(labels, return_inverse=True)
    quotas = _largest_remainder(np.bincount(inv), int(size))
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.choice(np.flatnonzero(inv == c), size=int(q), replace=False)
                          for c, q in enumerate(quotas) if q])
    val = np.sort(val)
    pool = np.setdiff1d(np.arange(n), val)
    return pool, val

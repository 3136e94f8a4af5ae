"""How much to prune where: the exact number of weights each target layer loses.

* uniform  - every layer the same fraction; the total is exactly int(total * sparsity).
* global   - one threshold over the criterion's importance in all layers, but no layer keeps less than
             ``min_density`` of its weights (layer collapse guard); exact total.
* owl      - Outlier-Weighted Layerwise sparsity (Yin et al., 2024): blocks whose importance scores hold more
             outliers (score > M x the block's mean) keep more weights; block sparsities span a range of
             width 2 * lambda with mean s; exact total.
* list     - the user's sparsity per block (decoder layer).
"""

from __future__ import annotations

import math

import torch

from prunekit.errors import PruneError
from prunekit.masks import smallest_k, split_count


def round_to_total(exact: list[float], total: int, caps: list[int]) -> list[int]:
    """Integers near ``exact`` (each in [0, cap]) that sum to ``total`` exactly (largest remainder)."""
    out = [max(0, min(int(math.floor(e)), c)) for e, c in zip(exact, caps)]
    left = total - sum(out)
    order = sorted(range(len(exact)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    while left > 0:
        moved = False
        for i in order:
            if left and out[i] < caps[i]:
                out[i] += 1
                left -= 1
                moved = True
        if not moved:
            break
    while left < 0:
        moved = False
        for i in reversed(order):
            if left and out[i] > 0:
                out[i] -= 1
                left += 1
                moved = True
        if not moved:
            break
    return out


def uniform(numels: list[int], sparsity: float) -> list[int]:
    return split_count(int(sum(numels) * sparsity), numels)


def per_block(numels: list[int], blocks: list[int], sparsities: list[float], n_blocks: int) -> list[int]:
    if len(sparsities) != n_blocks:
        raise PruneError(
            f"The allocation list has {len(sparsities)} sparsities but the model has {n_blocks} layers; give one per layer."
        )
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise PruneError(f"Every sparsity in the allocation list must be in [0, 1), got {s}.")
    return [int(n * sparsities[b]) for n, b in zip(numels, blocks)]


def global_threshold(importance: list[torch.Tensor], sparsity: float, min_density: float) -> list[int]:
    """Counts from one threshold over all layers' importance, capped so each layer keeps >= min_density."""
    if min_density > 1.0 - sparsity + 1e-12:
        raise PruneError(
            f"A per-layer minimum density of {min_density:g} is above the target density {1 - sparsity:g}; "
            "lower --min-density or the sparsity."
        )
    numels = [t.numel() for t in importance]
    caps = [n - math.ceil(n * min_density) for n in numels]
    budget = int(sum(numels) * sparsity)
    counts = [0] * len(importance)
    free = list(range(len(importance)))
    while free and budget > 0:
        flat = torch.cat([importance[i].flatten().float() for i in free])
        mask = smallest_k(flat, min(budget, flat.numel()))
        got, pos = {}, 0
        for i in free:
            got[i] = int(mask[pos : pos + numels[i]].sum())
            pos += numels[i]
        over = [i for i in free if got[i] > caps[i]]
        if not over:
            for i in free:
                counts[i] = got[i]
            break
        for i in over:  # these layers hit their minimum density: fix them, re-threshold the rest
            counts[i] = caps[i]
            budget -= caps[i]
        free = [i for i in free if i not in over]
    return counts


def owl_block_sparsity(block_importance: list[torch.Tensor], sparsity: float, m: float, lam: float) -> list[float]:
    """OWL: outlier ratio D_b = share of scores above m * mean in block b. Densities are D rescaled to
    [0, 2 lam], shifted to mean 1 - s: more outliers, more weights kept."""
    if m <= 0:
        raise PruneError(f"OWL's outlier multiple M must be positive (typical: 3 to 10), got {m}.")
    if not 0 <= lam < 0.5:
        raise PruneError(f"OWL's lambda must be in [0, 0.5) (typical: 0.02 to 0.2), got {lam}.")
    ratios = []
    for scores in block_importance:
        flat = scores.float()
        ratios.append(float((flat > m * flat.mean()).sum()) / flat.numel())
    r = torch.tensor(ratios, dtype=torch.float64)
    if float(r.max() - r.min()) == 0.0:
        return [sparsity] * len(ratios)
    r = (r - r.min()) / (r.max() - r.min()) * (2 * lam)
    density = r - r.mean() + (1 - sparsity)
    out = [float(1 - d) for d in density]
    if min(out) < 0 or max(out) >= 1:
        raise PruneError(
            f"OWL with lambda {lam:g} at sparsity {sparsity:g} asks some layer for a sparsity outside [0, 1); lower lambda."
        )
    return out


def from_block_sparsity(numels: list[int], blocks: list[int], block_sparsity: list[float], sparsity: float) -> list[int]:
    """Per-layer counts following per-block sparsities, rounded so the total is exactly int(total * sparsity)."""
    exact = [n * block_sparsity[b] for n, b in zip(numels, blocks)]
    return round_to_total(exact, int(sum(numels) * sparsity), [n for n in numels])

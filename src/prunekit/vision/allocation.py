"""How a target sparsity spreads over layers, turned into exact masks.

* ``uniform``     every layer keeps the same fraction (layer-wise pruning).
* ``global``      one threshold over all layers (plain global pruning; can empty a layer at high sparsity).
* ``global-min``  Global MP with a minimum (Gupta et al., 2022, "Global magnitude pruning with minimum
                  threshold is all we need"): each layer first keeps its top ``ceil(min_density * n)`` weights,
                  the rest of the budget goes to the globally best remaining weights.
* ``lamp``        LAMP (Lee et al., 2021): per-layer score v_u / sum_{v_j >= v_u} v_j on squared scores, ranked
                  globally (each layer's largest weight scores 1 and always survives).
* ``erk``         Erdos-Renyi-Kernel densities (Evci et al., 2020, RigL): density_l proportional to
                  sum(shape_l) / prod(shape_l), scaled to the target, layers that would exceed 1 kept dense.
                  Within a layer the best-scored weights are kept (random scores give "random + ERK").

All allocations keep exactly ``round((1 - sparsity) * N)`` weights of the N prunable ones.
"""

from __future__ import annotations

import math

import torch

from prunekit.errors import PruneError
from prunekit.vision.masks import Masks, check_sparsity

ALLOCATIONS = ("uniform", "global", "global-min", "lamp", "erk")


def _keep_total(scores: dict[str, torch.Tensor], sparsity: float) -> int:
    n = sum(s.numel() for s in scores.values())
    return int(round((1.0 - sparsity) * n))


def _topk_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    flat = s.reshape(-1)
    m = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        m[torch.topk(flat.float(), k, sorted=False).indices] = True
    return m.view(s.shape)


def _counts(densities: dict[str, float], sizes: dict[str, int], total: int) -> dict[str, int]:
    """Integer per-layer counts near density * size that add up to ``total`` (largest remainder)."""
    raw = {k: densities[k] * sizes[k] for k in sizes}
    counts = {k: min(sizes[k], int(math.floor(v))) for k, v in raw.items()}
    diff = total - sum(counts.values())
    order = sorted(sizes, key=lambda k: raw[k] - counts[k], reverse=diff > 0)
    i = 0
    while diff != 0 and i < 10 * len(order) + 10:
        k = order[i % len(order)]
        if diff > 0 and counts[k] < sizes[k]:
            counts[k] += 1
            diff -= 1
        elif diff < 0 and counts[k] > 0:
            counts[k] -= 1
            diff += 1
        i += 1
    return counts


def erk_densities(shapes: dict[str, tuple[int, ...]], sparsity: float, power: float = 1.0) -> dict[str, float]:
    """ERK layer densities whose parameter-weighted mean is ``1 - sparsity`` (RigL's procedure: raise the
    scale epsilon until some layer would pass density 1, make it dense, solve again for the rest)."""
    check_sparsity(sparsity)
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: (sum(s) / math.prod(s)) ** power for k, s in shapes.items()}
    keep = (1.0 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    while True:
        rest = [k for k in shapes if k not in dense]
        budget = keep - sum(sizes[k] for k in dense)
        denom = sum(raw[k] * sizes[k] for k in rest)
        eps = budget / denom if denom > 0 else 0.0
        over = [k for k in rest if eps * raw[k] > 1.0]
        if not over:
            break
        dense.update(over)
    return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


def lamp_scores(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, s in scores.items():
        v = s.float().reshape(-1).pow(2)
        v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
        vs, idx = torch.sort(v)
        suffix = torch.flip(torch.cumsum(torch.flip(vs, [0]), 0), [0])
        lamp = torch.empty_like(v)
        lamp[idx] = vs / suffix.clamp_min(1e-30)
        lamp = torch.where(torch.isfinite(s.reshape(-1)), lamp, torch.full_like(lamp, -float("inf")))
        out[k] = lamp.view(s.shape)
    return out


def allocate(scores: dict[str, torch.Tensor], sparsity: float, allocation: str = "global",
             min_density: float | None = None, power: float = 1.0) -> Masks:
    """Masks keeping exactly ``round((1 - sparsity) * N)`` weights, spread by ``allocation`` (module doc)."""
    check_sparsity(sparsity)
    if allocation not in ALLOCATIONS:
        raise PruneError(f"Unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}.")
    scores = {k: s.detach().cpu() for k, s in scores.items()}
    sizes = {k: s.numel() for k, s in scores.items()}
    total = _keep_total(scores, sparsity)
    if allocation in ("uniform", "erk"):
        if allocation == "uniform":
            dens = {k: 1.0 - sparsity for k in scores}
        else:
            dens = erk_densities({k: tuple(s.shape) for k, s in scores.items()}, sparsity, power)
        counts = _counts(dens, sizes, total)
        return Masks({k: _topk_mask(scores[k], counts[k]) for k in scores})
    if allocation == "lamp":
        scores = lamp_scores(scores)
    if allocation == "global-min":
        if min_density is None:
            raise PruneError("Allocation 'global-min' needs --min-density (least fraction of weights each layer keeps).")
        if not (0.0 <= min_density <= 1.0):
            raise PruneError(f"--min-density must be in [0, 1]; got {min_density}.")
        if min_density > 1.0 - sparsity + 1e-12:
            raise PruneError(f"The per-layer minimum density {min_density} is above the target density "
                             f"{1 - sparsity:.4g}; lower --min-density or the sparsity.")
        reserve = {k: min(sizes[k], math.ceil(min_density * sizes[k] - 1e-9)) for k in scores}
        if sum(reserve.values()) > total:
            raise PruneError(f"The per-layer minimum density {min_density} needs {sum(reserve.values())} weights but "
                             f"the target keeps {total}; lower --min-density.")
        masks = {k: _topk_mask(scores[k], reserve[k]) for k in scores}
        rest = total - sum(reserve.values())
        flat = torch.cat([torch.where(masks[k], torch.full_like(scores[k].float(), -float("inf")),
                                      scores[k].float()).reshape(-1) for k in scores])
        chosen = _topk_mask(flat, rest)
        off = 0
        for k in scores:
            masks[k] |= chosen[off:off + sizes[k]].view(scores[k].shape)
            off += sizes[k]
        return Masks(masks)
    # global / lamp: one ranking over all layers
    flat = torch.cat([scores[k].float().reshape(-1) for k in scores])
    chosen = _topk_mask(flat, total)
    out, off = {}, 0
    for k in scores:
        out[k] = chosen[off:off + sizes[k]].view(scores[k].shape)
        off += sizes[k]
    return Masks(out)

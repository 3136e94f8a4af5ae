"""Allocation: how one target sparsity spreads over layers, as the exact number of weights each layer keeps.

One function, :func:`keep_counts`, over ``{layer name: scores}`` (any family: LLM block layers, CNN/ViT
weights). Every kind keeps exactly ``round((1 - sparsity) * N)`` of the N weights (:func:`kept_total`):

* ``uniform``  every layer the same fraction.
* ``global``   one ranking of the scores over all layers; with ``min_density`` > 0 each layer first keeps its
               best ``ceil(min_density * n)`` weights (Global MP, Gupta et al. 2022: the floor that prevents layer
               collapse), the rest of the budget goes to the globally best remaining weights.
* ``owl``      Outlier-Weighted Layerwise sparsity (Yin et al. 2024): groups (decoder blocks; by default each layer)
               whose scores hold more outliers (> M x the group's mean) keep more; group sparsities span
               ``2 * owl_lambda`` around the target.
* ``lamp``     LAMP (Lee et al. 2021): per layer v_u / sum_{v_j >= v_u} v_j on squared scores, ranked globally
               (each layer's best weight scores 1 and survives).
* ``erk``      Erdos-Renyi-Kernel densities (Evci et al. 2020): density proportional to sum(shape) / prod(shape),
               scaled to the target; layers that would pass density 1 stay dense.
* ``list``     an explicit sparsity per group (per decoder layer for LLMs, per layer otherwise).
* ``sensitivity`` LLMs: a ``list`` computed from a measured sensitivity table
               (:func:`prunekit.evaluate.sensitivity.block_sparsities`) before this function is called.
* ``rd``       rate-distortion (Xu et al., "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep
               Neural Networks", ICCV 2023): each group's measured output-distortion curve over a sparsity grid
               (``rd_curves``: the network's output changes when only that group is pruned), summed over groups
               (the paper's additivity), minimised at the exact total by a dynamic program (:func:`rd_sparsities`).
               The curves are measured by the family (LLM: :func:`prunekit.evaluate.sensitivity.sensitivity` with
               ``measure="distortion"``; vision: :func:`prunekit.vision.schedules.rd_curves`).

Which weights a layer keeps is the method's business (Wanda compares within rows, SparseGPT updates as it
goes); :meth:`prunekit.core.masks.Masks.from_scores` keeps each layer's highest scores.
"""

from __future__ import annotations

import math

import torch

from prunekit.core.masks import Masks, round_to_total, check_sparsity, keep_highest, kept_total
from prunekit.core.registry import Registry
from prunekit.errors import PruneError

ALLOCATIONS = Registry("allocation")
ALLOCATIONS.register_names((
    ("uniform", "every layer the same fraction"),
    ("global", "one ranking over all layers; min_density: the per-layer floor (Global MP)"),
    ("owl", "outlier-weighted layerwise sparsity per group (decoder block)"),
    ("lamp", "layer-adaptive magnitude scores ranked globally"),
    ("erk", "Erdos-Renyi-Kernel densities from the layer shapes"),
    ("list", "an explicit sparsity per group (decoder layer)"),
    ("sensitivity", "per decoder block from a measured sensitivity table (prunekit sensitivity), cheapest first"),
    ("rd", "rate-distortion: measured output-distortion curves per layer/block, total minimised by dynamic programming"),
))


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
        vs, idx = torch.sort(v, stable=True)
        suffix = torch.flip(torch.cumsum(torch.flip(vs, [0]), 0), [0])
        lamp = torch.empty_like(v)
        lamp[idx] = vs / suffix.clamp_min(1e-30)
        lamp = torch.where(torch.isfinite(s.reshape(-1)), lamp, torch.full_like(lamp, -float("inf")))
        out[k] = lamp.view(s.shape)
    return out


def owl_ratio(scores: torch.Tensor, m: float) -> float:
    """OWL's outlier ratio of one group: the share of its scores above ``m`` x their mean."""
    flat = scores.float()
    return float((flat > m * flat.mean()).sum()) / flat.numel()


def owl_group_sparsity(group_scores: list[torch.Tensor] | None, sparsity: float, m: float, lam: float,
                       ratios: list[float] | None = None) -> list[float]:
    """OWL: outlier ratio D_g = share of scores above ``m`` x mean in group g; densities are D rescaled to
    [0, 2 lam], shifted to mean 1 - s: more outliers, more weights kept. ``ratios``: the D_g already computed
    (:func:`owl_ratio`, e.g. block by block from disk) instead of ``group_scores``."""
    if not m > 0:
        raise PruneError(f"OWL's outlier multiple M must be positive (typical: 3 to 10), got {m}.")
    if not 0 <= lam < 0.5:
        raise PruneError(f"OWL's lambda must be in [0, 0.5) (typical: 0.02 to 0.2), got {lam}.")
    if ratios is None:
        ratios = [owl_ratio(scores, m) for scores in group_scores]
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


def rd_sparsities(curves: dict, sizes: dict, grid: list[float], sparsity: float, *, step: float | None = 0.01,
                  resolution: int = 20000) -> dict:
    """Per-group sparsities minimising the summed distortion ``sum_g D_g(s_g)`` subject to removing at least
    ``sparsity`` of all weights (``sum_g n_g s_g >= sparsity * sum_g n_g``), by dynamic programming over the removed
    count (the paper's solver).

    ``curves[g]``: distortion at each point of ``grid`` (sparsities in [0, 1)); distortion 0 at sparsity 0 when the
    grid lacks it. ``step``: the curves are interpolated linearly onto this finer grid (None: the grid points only).
    ``resolution``: the removed count is counted in units of ``ceil(target / resolution)`` weights, each choice's
    removal rounded to the nearest unit (exact when the target is that small; otherwise the total may miss the
    target by a few units, which :func:`keep_counts` then makes exact).
    """
    import numpy as np

    check_sparsity(sparsity)
    names = list(curves)
    if not names:
        return {}
    pts = sorted(float(g) for g in grid)
    if any(not (0.0 <= g < 1.0) for g in pts) or len(set(pts)) != len(pts):
        raise PruneError(f"The rate-distortion grid must be distinct sparsities in [0, 1), got {list(grid)}.")
    for g in names:
        if len(curves[g]) != len(pts) or not all(math.isfinite(float(v)) for v in curves[g]):
            raise PruneError(f"The distortion curve of {g} needs one finite value per grid point ({len(pts)}).")
    order = sorted(range(len(pts)), key=[float(g) for g in grid].__getitem__)  # curve values in grid order
    xs = pts if pts[0] == 0.0 else [0.0] + pts
    top = pts[-1]
    if sparsity > top + 1e-12:
        raise PruneError(f"The rate-distortion grid goes up to sparsity {top:g}, below the target {sparsity:g}; "
                         "measure a grid that reaches it.")
    levels = np.array(xs if step is None else sorted(set(np.round(np.arange(0.0, top + step / 2, step), 10).tolist())
                                                      | set(xs)))
    levels = levels[levels <= top + 1e-12]
    dist = {}
    for g in names:
        ys = [float(curves[g][i]) for i in order]
        ys = ys if pts[0] == 0.0 else [0.0] + ys
        dist[g] = np.interp(levels, np.array(xs), np.array(ys))
    total = sum(int(sizes[g]) for g in names)
    need = sparsity * total
    unit = max(1, math.ceil(need / resolution))
    T = math.ceil(need / unit - 1e-9)
    removed = {g: np.minimum(np.round(int(sizes[g]) * levels / unit).astype(np.int64), T) for g in names}
    # tables[i][b]: least distortion of the first i groups removing b units (b == T: T or more)
    tables = [np.full(T + 1, np.inf)]
    tables[0][0] = 0.0
    for g in names:
        prev, new = tables[-1], np.full(T + 1, np.inf)
        for k, d in zip(removed[g].tolist(), dist[g].tolist()):
            np.minimum(new[k:], prev[: T + 1 - k] + d, out=new[k:])  # b -> b + k
            if k > 0:  # everything that lands past T counts as T
                new[T] = min(new[T], float(np.min(prev[T + 1 - k:])) + d)
        tables.append(new)
    if not np.isfinite(tables[-1][T]):
        raise PruneError("No allocation on the rate-distortion grid reaches the target; measure a grid that goes higher.")
    out, b = {}, T
    for li in range(len(names) - 1, -1, -1):  # backtrack: which level got each group there
        g = names[li]
        prev, here = tables[li], tables[li + 1][b]
        found = None
        for lv, (k, d) in enumerate(zip(removed[g].tolist(), dist[g].tolist())):
            cands = range(T - k, T + 1) if b == T else ([b - k] if b >= k else [])
            for pb in cands:
                if np.isfinite(prev[pb]) and abs(prev[pb] + d - here) <= 1e-9 * max(1.0, abs(here)):
                    found = (lv, pb)
                    break
            if found:
                break
        assert found is not None, "rate-distortion backtrack lost its path"
        out[g], b = float(levels[found[0]]), found[1]
    return {g: out[g] for g in names}


def _ranked(scores: dict[str, torch.Tensor], total: int, reserve: dict[str, int]) -> dict[str, int]:
    """Counts from one ranking over all layers after each layer has kept its ``reserve`` best weights."""
    names = list(scores)
    kept = {k: keep_highest(scores[k], reserve[k]) for k in names}
    rest = total - sum(reserve.values())
    flat = torch.cat([scores[k].float().reshape(-1).masked_fill(kept[k].reshape(-1), float("inf")) for k in names])
    # the reserved entries rank first (inf), so the global choice takes them plus the best ``rest`` others
    chosen = keep_highest(flat, total)
    counts, off = {}, 0
    for k in names:
        n = scores[k].numel()
        counts[k] = int(chosen[off : off + n].sum())
        off += n
    assert sum(counts.values()) == total and rest >= 0
    return counts


def keep_counts(
    scores: dict[str, torch.Tensor],
    sparsity: float,
    kind: str = "uniform",
    *,
    min_density: float = 0.0,
    groups: dict[str, int] | None = None,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    per_group: list[float] | None = None,
    power: float = 1.0,
    slack: str = "kept",
    owl_ratios: dict[int, float] | None = None,
    rd_curves: dict | None = None,
    rd_grid: list[float] | None = None,
) -> dict[str, int]:
    """``{layer: weights kept}`` at ``sparsity`` spread by ``kind`` (see the module doc).

    ``scores``: the criterion's importance per weight (only the shapes matter for uniform, erk and list).
    ``groups``: layer -> group index for owl and list (decoder block; default: every layer its own group).
    ``owl_ratios``: owl's per-group outlier ratios already computed (``{group: ratio}``); ``scores`` then only
    give the shapes.
    ``rd_curves`` / ``rd_grid``: rd's measured distortion per group (``{group: [D at each grid sparsity]}``, the
    group keys of ``groups``; without ``groups``, per layer name); ``scores`` then only give the shapes.
    ``slack``: where uniform / erk / owl put the one-weight rounding slack of the exact total: ``kept`` (round each
    layer's kept target; vision) or ``removed`` (round each layer's removal target; LLM). The two differ
    only by one weight in layers whose targets have equal or near-equal fractional parts; each family keeps the
    rule its published figures were made with.
    """
    if slack not in ("kept", "removed"):
        raise ValueError(f"slack must be 'kept' or 'removed', not {slack!r}")
    check_sparsity(sparsity)
    kind = ALLOCATIONS.canonical(kind)
    if kind == "sensitivity":
        raise PruneError("Allocation 'sensitivity' is turned into per-block sparsities from its table first; pass "
                         "kind 'list' with those (prunekit.evaluate.sensitivity.block_sparsities).")
    if not 0.0 <= min_density <= 1.0:
        raise PruneError(f"The per-layer minimum density must be in [0, 1]; got {min_density}.")
    names = list(scores)
    sizes = {k: scores[k].numel() for k in names}
    total = kept_total(sum(sizes.values()), sparsity)
    if groups is None:
        groups = {k: k for k in names} if kind == "rd" else {k: i for i, k in enumerate(names)}

    def exact(densities: dict[str, float], target: int) -> dict[str, int]:
        if slack == "removed":
            # the LLM convention: each layer's removal target rounded, the slack to the largest fractional parts
            # of the removal targets (ties: the earlier layer loses the extra weight)
            removed = round_to_total([sizes[k] * (1 - densities[k]) for k in names], sum(sizes.values()) - target,
                                     [sizes[k] for k in names])
            return {k: sizes[k] - r for k, r in zip(names, removed)}
        # the vision convention: each layer as near its own kept target as integers allow; only the total's
        # rounding slack moves (to the largest fractional parts; ties: the earlier layer keeps the extra weight)
        kept = round_to_total([densities[k] * sizes[k] for k in names], target, [sizes[k] for k in names])
        return dict(zip(names, kept))

    if kind == "uniform":
        return exact({k: 1.0 - sparsity for k in names}, total)
    if kind == "erk":
        return exact(erk_densities({k: tuple(scores[k].shape) for k in names}, sparsity, power), total)
    if kind == "list":
        n_groups = len(set(groups.values()))
        if per_group is None or len(per_group) != n_groups:
            got = 0 if per_group is None else len(per_group)
            raise PruneError(f"The allocation list has {got} sparsities but the model has {n_groups} layers; give one per layer.")
        for s in per_group:
            if not 0.0 <= s < 1.0:
                raise PruneError(f"Every sparsity in the allocation list must be in [0, 1), got {s}.")
        return {k: kept_total(sizes[k], per_group[groups[k]]) for k in names}
    if kind == "rd":
        if rd_curves is None or rd_grid is None:
            raise PruneError("Allocation 'rd' needs the measured distortion curves (rd_curves) and their grid (rd_grid).")
        missing = sorted({str(groups[k]) for k in names if groups[k] not in rd_curves})
        if missing:
            raise PruneError(f"The rate-distortion curves miss {len(missing)} group(s) of this model, e.g. {missing[0]}; "
                             "measure them on this model.")
        gsize: dict = {}
        for k in names:
            gsize[groups[k]] = gsize.get(groups[k], 0) + sizes[k]
        gs = rd_sparsities({g: rd_curves[g] for g in gsize}, gsize, rd_grid, sparsity)
        return exact({k: 1.0 - gs[groups[k]] for k in names}, total)
    if kind == "owl":
        order = sorted(set(groups.values()))
        if owl_ratios is not None:
            gs = dict(zip(order, owl_group_sparsity(None, sparsity, owl_m, owl_lambda, [owl_ratios[g] for g in order])))
        else:
            group_scores = [torch.cat([scores[k].flatten() for k in names if groups[k] == g]) for g in order]
            gs = dict(zip(order, owl_group_sparsity(group_scores, sparsity, owl_m, owl_lambda)))
        return exact({k: 1.0 - gs[groups[k]] for k in names}, total)
    # global and lamp: one ranking over all layers, after the per-layer floor
    if min_density > 1.0 - sparsity + 1e-12:
        raise PruneError(
            f"A per-layer minimum density of {min_density:g} is above the target density {1 - sparsity:g}; "
            "lower --min-density or the sparsity."
        )
    ranked = lamp_scores(scores) if kind == "lamp" else {k: s.detach().float().cpu() for k, s in scores.items()}
    reserve = {k: min(sizes[k], math.ceil(min_density * sizes[k] - 1e-9)) for k in names}
    if sum(reserve.values()) > total:
        raise PruneError(f"The per-layer minimum density {min_density} needs {sum(reserve.values())} weights but "
                         f"the target keeps {total}; lower --min-density.")
    return _ranked(ranked, total, reserve)


def allocate_masks(scores: dict[str, torch.Tensor], sparsity: float, kind: str = "global", **options) -> Masks:
    """Keep masks at ``sparsity``: :func:`keep_counts` per layer, then each layer's highest scores."""
    return Masks.from_scores(scores, keep_counts(scores, sparsity, kind, **options))

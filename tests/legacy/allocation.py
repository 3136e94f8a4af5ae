"""Frozen copies of the two allocation paths before the one-core consolidation (commit b1d0733): the LLM
side (prunekit/masks.py + prunekit/allocate.py) and the vision side (prunekit/vision/allocation.py). They are
kept only as the references tests/test_core.py checks the shared allocator against; nothing imports them."""

from __future__ import annotations

import math

import torch



def smallest_k(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask over a 1-D tensor marking exactly its ``k`` smallest entries."""
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= flat.numel():
        return ~mask
    thr = flat.kthvalue(k).values
    mask = flat < thr
    remaining = k - int(mask.sum())
    if remaining > 0:
        ties = (flat == thr).nonzero().squeeze(1)[:remaining]
        mask[ties] = True
    return mask


def split_count(count: int, sizes: list[int]) -> list[int]:
    """Split ``count`` over parts proportionally to ``sizes``, exactly (largest remainder), none above its size."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [count * s / total for s in sizes]
    out = [min(int(e), s) for e, s in zip(exact, sizes)]
    left = count - sum(out)
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    while left > 0:
        progressed = False
        for i in order:
            if left == 0:
                break
            if out[i] < sizes[i]:
                out[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return out


def per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune ``count`` weights in total, spread evenly over the output rows (Wanda's comparison group):
    every row loses ``count // rows`` of its lowest scores, the first ``count % rows`` rows one more."""
    rows, cols = scores.shape
    base, extra = divmod(count, rows)
    k = base + (1 if extra else 0)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
        if extra:  # the rows past the first ``extra`` keep their k-th lowest weight
            mask[extra:].scatter_(1, idx[extra:, k - 1 : k], False)
    return mask


def per_layer(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune the ``count`` lowest-scoring weights of the whole matrix."""
    return smallest_k(scores.flatten(), count).view_as(scores)


def n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest-scoring weights in every group of ``m`` consecutive inputs of each row."""
    out, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not divisible by M={m}")
    groups = scores.reshape(out, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.view(out, cols)


def global_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One threshold over all tensors: prune the ``int(total * sparsity)`` lowest scores overall."""
    flat = torch.cat([s.flatten() for s in scores])
    mask = smallest_k(flat, int(flat.numel() * sparsity))
    out, i = [], 0
    for s in scores:
        out.append(mask[i : i + s.numel()].view_as(s))
        i += s.numel()
    return out


def make_mask(scores: torch.Tensor, count: int | None, nm: tuple[int, int] | None, group: str = "row") -> torch.Tensor:
    """Mask for one layer: N:M when ``nm`` is given, else ``count`` weights per ``row`` group or per ``layer``."""
    if nm is not None:
        return n_of_m(scores, *nm)
    return per_row(scores, count) if group == "row" else per_layer(scores, count)


def uniform_count(numel: int, sparsity: float) -> int:
    return int(numel * sparsity)


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


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
        raise ValueError(
            f"The allocation list has {len(sparsities)} sparsities but the model has {n_blocks} layers; give one per layer."
        )
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"Every sparsity in the allocation list must be in [0, 1), got {s}.")
    return [int(n * sparsities[b]) for n, b in zip(numels, blocks)]


def global_threshold(importance: list[torch.Tensor], sparsity: float, min_density: float) -> list[int]:
    """Counts from one threshold over all layers' importance, capped so each layer keeps >= min_density."""
    if min_density > 1.0 - sparsity + 1e-12:
        raise ValueError(
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
        raise ValueError(f"OWL's outlier multiple M must be positive (typical: 3 to 10), got {m}.")
    if not 0 <= lam < 0.5:
        raise ValueError(f"OWL's lambda must be in [0, 0.5) (typical: 0.02 to 0.2), got {lam}.")
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
        raise ValueError(
            f"OWL with lambda {lam:g} at sparsity {sparsity:g} asks some layer for a sparsity outside [0, 1); lower lambda."
        )
    return out


def from_block_sparsity(numels: list[int], blocks: list[int], block_sparsity: list[float], sparsity: float) -> list[int]:
    """Per-layer counts following per-block sparsities, rounded so the total is exactly int(total * sparsity)."""
    exact = [n * block_sparsity[b] for n, b in zip(numels, blocks)]
    return round_to_total(exact, int(sum(numels) * sparsity), [n for n in numels])

# ---- vision (prunekit/vision/allocation.py) ----

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
    pass
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
             min_density: float | None = None, power: float = 1.0) -> dict:
    """Masks keeping exactly ``round((1 - sparsity) * N)`` weights, spread by ``allocation`` (module doc)."""
    pass
    if allocation not in ALLOCATIONS:
        raise ValueError(f"Unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}.")
    scores = {k: s.detach().cpu() for k, s in scores.items()}
    sizes = {k: s.numel() for k, s in scores.items()}
    total = _keep_total(scores, sparsity)
    if allocation in ("uniform", "erk"):
        if allocation == "uniform":
            dens = {k: 1.0 - sparsity for k in scores}
        else:
            dens = erk_densities({k: tuple(s.shape) for k, s in scores.items()}, sparsity, power)
        counts = _counts(dens, sizes, total)
        return {k: _topk_mask(scores[k], counts[k]) for k in scores}
    if allocation == "lamp":
        scores = lamp_scores(scores)
    if allocation == "global-min":
        if min_density is None:
            raise ValueError("Allocation 'global-min' needs --min-density (least fraction of weights each layer keeps).")
        if not (0.0 <= min_density <= 1.0):
            raise ValueError(f"--min-density must be in [0, 1]; got {min_density}.")
        if min_density > 1.0 - sparsity + 1e-12:
            raise ValueError(f"The per-layer minimum density {min_density} is above the target density "
                             f"{1 - sparsity:.4g}; lower --min-density or the sparsity.")
        reserve = {k: min(sizes[k], math.ceil(min_density * sizes[k] - 1e-9)) for k in scores}
        if sum(reserve.values()) > total:
            raise ValueError(f"The per-layer minimum density {min_density} needs {sum(reserve.values())} weights but "
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
        return masks
    # global / lamp: one ranking over all layers
    flat = torch.cat([scores[k].float().reshape(-1) for k in scores])
    chosen = _topk_mask(flat, total)
    out, off = {}, 0
    for k in scores:
        out[k] = chosen[off:off + sizes[k]].view(scores[k].shape)
        off += sizes[k]
    return out

"""Masks from scores. Convention: a mask is a bool tensor, True where the weight is pruned (set to zero).

Every function removes exactly the requested number of weights, even when scores tie (dequantized 4-bit
weights tie a lot): ties are broken by position, never by a ``<= threshold`` that over-prunes.
"""

from __future__ import annotations

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

"""SparseGPT (Frantar & Alistarh, 2023): prune column block by column block with the Optimal Brain
Surgeon update, using the inverse Hessian H^-1 of the layer-wise reconstruction problem, H = X X^T.

Layers that read the same input (q/k/v, gate/up) share H, so prunekit factors it once and runs the
column sweep on their rows stacked into one matrix; the mask is still chosen per layer (unstructured: the
lowest w^2 / [H^-1]_jj^2 of each layer within each column block; N:M: per row group, as in the paper).
"""

from __future__ import annotations

import warnings

import torch

from pydantic import Field

from prunekit.core.config import Config
from prunekit.core.masks import apportion, keep_highest, keep_n_of_m
from prunekit.errors import PruneError
from prunekit.methods.base import METHODS, Method


def inverse_hessian_cholesky(h: torch.Tensor, dampening: float, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1. Raises damping x10 while Cholesky fails.

    Returns the factor and the dampening fraction that worked.
    """
    n = h.shape[0]
    mean_diag = torch.diag(h).mean()
    damp = dampening
    for _ in range(max_tries):
        # Cholesky of the index-reversed matrix gives H = R R^T with R upper triangular; then
        # H^-1 = (R^-1)^T R^-1 and R^-1 is the upper factor we want: one factorization, one triangular inverse.
        # (Each n x n temporary is freed as soon as the next exists: at most three alive, not eight.)
        a = h.clone()
        a.diagonal().add_(damp * mean_diag)
        rev = a.flip(0, 1)
        del a
        lower_rev, info = torch.linalg.cholesky_ex(rev)
        del rev
        if int(info) == 0:
            lower = lower_rev.flip(0, 1)
            del lower_rev
            upper = torch.linalg.solve_triangular(lower, torch.eye(n, dtype=h.dtype, device=h.device), upper=True)
            del lower
            if torch.isfinite(upper).all():
                if damp != dampening:
                    warnings.warn(f"SparseGPT: Hessian not positive definite; raised dampening to {damp:g}", stacklevel=2)
                return upper, damp
        damp *= 10.0
    raise PruneError(
        f"SparseGPT: the calibration Hessian is not positive definite even with dampening {damp / 10:g}; use more "
        "calibration samples or another method."
    )


def sparsegpt_(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    counts: list[int] | None,
    nm: tuple[int, int] | None,
    blocksize: int = 128,
    dampening: float = 0.01,
    overwrite_hessian: bool = False,
) -> None:
    """Prune and update every ``[out, in]`` matrix of ``weights`` in place; they all read the same input.

    Unstructured: ``counts[i]`` weights leave ``weights[i]``, split exactly over the column blocks.
    ``overwrite_hessian``: ``hessian`` may be used as scratch (the engine hands each group's its own; saves one
    in x in matrix, 485 MB for a 7B model's down_proj).
    """
    rows = [w.shape[0] for w in weights]
    bounds = torch.tensor([0] + rows).cumsum(0).tolist()
    W = torch.cat([w.float() for w in weights], 0)
    H = hessian.float()
    if H is hessian and not overwrite_hessian:
        H = H.clone()
    cols = W.shape[1]
    if nm is not None and blocksize % nm[1]:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])  # N:M groups must not straddle column blocks

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv, _ = inverse_hessian_cholesky(H, dampening)
    del H
    starts = list(range(0, cols, blocksize))
    if nm is None:
        widths = [min(blocksize, cols - s) for s in starts]
        per_block = [apportion(c, [r * wd for wd in widths], [r * wd for wd in widths]) for c, r in zip(counts, rows)]

    # The per-column sweep is thousands of tiny ops: one thread avoids synchronisation costs that dominate
    # them on a CPU (and collapse under any other load); the big trailing update uses every thread.
    threads = torch.get_num_threads()
    for bi, i1 in enumerate(starts):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        # work on the transpose: column i of the block is then a contiguous row
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        removed1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            tmp = W1.pow(2) / d.pow(2).unsqueeze(1)
            for seg, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                part = tmp[:, a:b]
                removed1[:, a:b] = ~keep_highest(part, part.numel() - per_block[seg][bi])
            # err_i = w_i * mask_i / d_i, the scale fixed up front for the whole block
            scale = removed1.to(W1.dtype).div_(d.unsqueeze(1))
        else:
            n, m = nm
            scale = torch.zeros_like(W1)

        torch.set_num_threads(1)
        try:
            for i in range(count):
                if nm is not None and i % m == 0:
                    tmp = W1[i : i + m].pow(2) / d[i : i + m].pow(2).unsqueeze(1)
                    removed1[i : i + m] = ~keep_n_of_m(tmp.t(), n, m).t()
                    scale[i : i + m] = removed1[i : i + m].to(W1.dtype).div_(d[i : i + m].unsqueeze(1))
                torch.mul(W1[i], scale[i], out=Err1[i])
                # OBS update of the remaining columns; on column i itself it leaves w - w*mask = q
                W1[i:].addr_(Hinv1[i, i:], Err1[i], alpha=-1.0)
        finally:
            torch.set_num_threads(threads)
        Q1 = W1.masked_fill_(removed1, 0.0)

        W[:, i1:i2] = Q1.t()
        if i2 < cols:
            W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1.0)

    for w, a, b in zip(weights, bounds[:-1], bounds[1:]):
        w.copy_(W[a:b].to(w.dtype))


class SparseGPTOptions(Config):
    what = "sparsegpt option"
    blocksize: int = Field(128, ge=1, description="columns per lazy-update block")
    dampening: float = Field(0.01, gt=0.0, lt=1.0, description="fraction of the mean Hessian diagonal added to it")


@METHODS.register("sparsegpt", params=SparseGPTOptions, description="OBS updates with the calibration Hessian")
class SparseGPT(Method):
    name = "sparsegpt"
    statistic = "hessian"

    def __init__(self, blocksize: int = 128, dampening: float = 0.01):
        self.blocksize = blocksize
        self.dampening = dampening

    def prune_group(self, weights, stat, counts, nm, names):
        sparsegpt_(weights, stat, counts, nm, self.blocksize, self.dampening, overwrite_hessian=True)

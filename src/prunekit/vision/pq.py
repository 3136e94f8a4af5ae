"""The PQ index, a measure of how sparse (compressible) a weight vector is, and the pruning bound it gives
(Diao et al., ICLR 2023, "Pruning Deep Neural Networks from a Sparsity Perspective").

For a vector w of dimension d and 0 < p < q:

    I(w) = 1 - d^(1/q - 1/p) * ||w||_p / ||w||_q            in [0, 1 - d^(1/q - 1/p)]

0 for a constant-magnitude vector (nothing is more important than anything else), the largest value for a one-hot
vector; it does not change when w is scaled or its entries permuted. Larger = sparser = more compressible. The
paper's default is p = 0.5, q = 1.

SAP (sparsity-informed adaptive pruning) turns the index into how many of the d surviving weights to keep:

    r = d * (1 + eta_r)^(-q / (q - p)) * (1 - I(w))^(q p / (q - p))

(the paper's lower bound on the weights needed to keep the relative l_q error below eta_r), and removes, by
magnitude, c = floor(d * min(gamma * (1 - ceil(r) / d), beta)) of them; ``gamma`` scales each round's step and
``beta`` caps it. Each round (train, measure, prune, rewind, train again) is the schedule ``sap``
(:class:`prunekit.vision.schedules.Sap`); the sparsity it ends at is adaptive.

:func:`pq_index` is public so the index can be reported for any weights; :func:`layer_pq` gives one per layer.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.core.masks import Masks, prunable


class SapOptions(Config):
    """The options of the schedule ``sap`` (recipe ``options``, CLI ``--option KEY=VALUE``); the paper's defaults."""

    what = "sap option"
    p: float = 0.5
    q: float = 1.0
    eta_r: float = 0.0
    gamma: float = 1.0
    beta: float = 0.9
    scope: Literal["global", "layer"] = "global"

    @model_validator(mode="after")
    def _check(self):
        if not 0.0 < self.p < self.q:
            raise ValueError(f"the PQ index needs 0 < p < q; got p={self.p:g}, q={self.q:g}")
        if self.eta_r < 0.0:
            raise ValueError(f"eta_r (the tolerated relative error) must be >= 0; got {self.eta_r:g}")
        if not self.gamma > 0.0:
            raise ValueError(f"gamma (the step scale) must be positive; got {self.gamma:g}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError("beta (the most a round prunes of the surviving weights) must be in (0, 1); "
                             f"got {self.beta:g}")
        return self


def pq_index(w: torch.Tensor, p: float = 0.5, q: float = 1.0, mask: torch.Tensor | None = None) -> float:
    """The PQ index of ``w`` (flattened; with ``mask`` only its kept entries, d = how many are kept); 0 for an
    all-zero or empty vector. Computed in float64 in the log domain (no overflow for small p)."""
    if not 0.0 < p < q:
        raise ValueError(f"the PQ index needs 0 < p < q; got p={p}, q={q}")
    x = w.detach().reshape(-1)
    if mask is not None:
        x = x[mask.reshape(-1).to(x.device)]
    a = x.double().abs()
    d = a.numel()
    if d == 0 or not bool((a > 0).any()):
        return 0.0
    a = a / a.max()  # scale-free; keeps the powers in range
    log_p = math.log(float(a.pow(p).sum())) / p
    log_q = math.log(float(a.pow(q).sum())) / q
    ratio = math.exp((1.0 / q - 1.0 / p) * math.log(d) + log_p - log_q)
    return min(max(1.0 - ratio, 0.0), 1.0)


def sap_keep_bound(d: int, index: float, p: float, q: float, eta_r: float) -> float:
    """r = d (1 + eta_r)^(-q/(q-p)) (1 - I)^(qp/(q-p)): how many of ``d`` weights with PQ index ``index`` SAP keeps."""
    return d * (1.0 + eta_r) ** (-q / (q - p)) * (1.0 - index) ** (q * p / (q - p))


def sap_prune_count(d: int, index: float, p: float, q: float, eta_r: float, gamma: float, beta: float) -> int:
    """How many of ``d`` surviving weights one SAP round removes: floor(d * clip(gamma (1 - ceil(r)/d), 0, beta))
    (r from :func:`sap_keep_bound`; ceil as the paper's code)."""
    if d <= 0:
        return 0
    r = math.ceil(sap_keep_bound(d, index, p, q, eta_r) - 1e-9)
    ratio = min(max(gamma * (1.0 - r / d), 0.0), beta)
    return int(math.floor(d * ratio + 1e-9))


def layer_pq(model: nn.Module, masks: Masks | None = None, p: float = 0.5, q: float = 1.0,
             names=None) -> dict[str, float]:
    """``{layer: PQ index}`` of every prunable weight (``names``; default the masks' or :func:`prunable`), over
    its kept weights when ``masks`` are given; the key ``"global"`` is the index of all of them together."""
    params = dict(model.named_parameters())
    names = list(names) if names is not None else (list(masks) if masks is not None else list(prunable(model)))
    out = {n: pq_index(params[n], p, q, masks[n] if masks is not None else None) for n in names}
    alive = [params[n].detach().reshape(-1) if masks is None else params[n].detach().reshape(-1)[masks[n].reshape(-1)]
             for n in names]
    out["global"] = pq_index(torch.cat(alive), p, q) if alive else 0.0
    return out


def sap_plan(model: nn.Module, masks: Masks, opts: SapOptions, cap: float | None = None) -> tuple[dict[str, int], dict]:
    """One SAP round's decision on ``model`` (its ``masks`` give the surviving weights): the weights each layer
    keeps (``scope`` global: one count over all layers, shared out later by one ranking; here returned as
    ``{"*": kept}``; ``scope`` layer: per layer) and the record (the PQ index per layer and over all, the surviving
    count, the bound r, how many are removed). ``cap``: the most sparsity may reach (never pruned beyond)."""
    pq = layer_pq(model, masks, opts.p, opts.q)
    row: dict = {"pq": {k: v for k, v in pq.items() if k != "global"}, "pq_global": pq["global"]}
    if opts.scope == "global":
        n = masks.numel()
        d = masks.kept()
        c = sap_prune_count(d, pq["global"], opts.p, opts.q, opts.eta_r, opts.gamma, opts.beta)
        if cap is not None:
            c = max(0, min(c, d - (n - math.floor(cap * n + 1e-9))))
        row.update(alive=d, keep_bound=sap_keep_bound(d, pq["global"], opts.p, opts.q, opts.eta_r), pruned=c)
        return {"*": d - c}, row
    keep: dict[str, int] = {}
    pruned = 0
    for k, m in masks.items():
        d = int(m.sum())
        c = sap_prune_count(d, pq[k], opts.p, opts.q, opts.eta_r, opts.gamma, opts.beta)
        if cap is not None:
            c = max(0, min(c, d - (m.numel() - math.floor(cap * m.numel() + 1e-9))))
        keep[k] = d - c
        pruned += c
    row.update(alive=masks.kept(), pruned=pruned)
    return keep, row

"""D-Pruner (Zhang et al., "Pruning as a Domain-specific LLM Extractor", NAACL Findings 2024): unstructured pruning
that keeps what the *domain* needs without losing what the model knows in *general*.

Two removal costs, as in the paper and its code:

* **general importance** G: the error that removing a weight makes in its layer's output on *general* text, the
  OBS saliency of SparseGPT (which the paper's code computes): ``G_ij = W_ij^2 / [H^-1]_jj`` with ``H = X X^T / n``
  (plus 1% of its mean diagonal as dampening) from the general windows' inputs to the layer, on the dense model;
* **domain importance** T: what removing a weight costs the domain's language-model loss, to second order with
  the empirical Fisher as the Hessian diagonal: ``T_ij = | -g_ij W_ij + 1/2 F_ij W_ij^2 |`` (g, F: mean gradient
  and mean squared gradient over the domain windows, one backward per window).

The paper folds G into the domain training loss as a regulariser ``lambda * sum G (W' - W)^2`` and accumulates T
while fine-tuning with it (LOMO), with hand-set scale factors. Here (one shot, like the other methods) both costs
are normalised to mean 1 within their layer, so ``lam`` weighs them on one scale:

    S = T / mean(T) + lam * G / mean(G)

``lam = 0`` is the domain's gradient-only importance; a very large ``lam`` ranks like SparseGPT's saliency on the
general text (within a row: Wanda's ranking with the full Hessian); ``lam = 1`` (default) counts both alike. A smoke
run with the Fisher of general *gradients* as G (the first version) gave pydoc perplexity ~500 at 50%: one-shot
gradient scores alone do not carry a 135M model through 50%; the activation term does. Each output row keeps its
highest scores (``group: row``, default) or the whole layer competes (``group: layer``).

Domain windows are the recipe's calibration windows; the general windows come from ``general_text`` (default:
the other bundled text), drawn by :func:`prunekit.api.prune` with the tokenizer, or passed as ``general_batches``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from prunekit.checks import check_finite_tensor
from prunekit.core.config import Config
from prunekit.core.gradients import gradient_pass
from prunekit.core.masks import layer_keep_mask, zero_removed_
from prunekit.errors import PruneError
from prunekit.linear import weight_matrix
from prunekit.methods.base import METHODS, Method
from prunekit.methods.sparsegpt import inverse_hessian_cholesky


def gradient_moments(model, batches: torch.Tensor, targets, desc: str, progress: bool = False):
    """Per target layer, the mean gradient and the mean squared gradient (empirical Fisher diagonal) of the LM loss
    over ``batches`` (one window per backward), in the ``[out, in]`` layout."""
    names = [n for n, _ in targets]
    mean = {n: torch.zeros_like(weight_matrix(m), dtype=torch.float32) for n, m in targets}
    sq = {n: torch.zeros_like(weight_matrix(m), dtype=torch.float32) for n, m in targets}

    def loss(model, row):
        ids = row.unsqueeze(0)
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def add(i, p, g):
        n = names[i]
        g = (g.t() if g.shape != mean[n].shape else g).float()
        mean[n].add_(g)
        sq[n].add_(g.pow(2))

    gradient_pass(model, [m.weight for _, m in targets], batches, loss, add, desc=desc, unit="window", progress=progress)
    k = float(batches.shape[0])
    return {n: v.div_(k) for n, v in mean.items()}, {n: v.div_(k) for n, v in sq.items()}


def general_saliency(model, batches: torch.Tensor, targets, dampening: float = 0.01, progress: bool = False):
    """Per target layer, SparseGPT's OBS saliency ``W^2 / [H^-1]_jj`` of the dense weights, ``H = X X^T`` from the
    layer's inputs over ``batches``, in the ``[out, in]`` layout. The inputs come from the shared calibration engine
    in its one-pass mode (:func:`prunekit.calibrate.run_sequential`, ``propagate=False``: the dense model's
    activations); the scale of H does not matter (the dampening is relative and the scores are normalised)."""
    from prunekit.arch import adapter_for
    from prunekit.calibrate import run_sequential

    blocks = adapter_for(model).blocks(model)
    owner = {id(m): bi for bi, block in enumerate(blocks) for m in block.modules()}
    per_block: list[list] = [[] for _ in blocks]
    for name, m in targets:
        per_block[owner[id(m)]].append((name, m))
    out = {}

    def record(_bi, group, hess):
        H = hess.clone()
        dead = H.diagonal() == 0
        H[dead, dead] = 1.0
        upper, _ = inverse_hessian_cholesky(H, dampening)  # H^-1 = U^T U: its diagonal is U's column norms squared
        hinv_diag = upper.pow(2).sum(0)
        for name, m in group:
            out[name] = weight_matrix(m).detach().float().pow(2) / hinv_diag.unsqueeze(0)

    run_sequential(model, blocks, per_block, batches, "hessian", record, batch_size=1, progress=progress,
                   desc="d-pruner general activations", propagate=False)
    return out


def _unit_mean(s: torch.Tensor) -> torch.Tensor:
    mean = s.mean()
    return s / mean if mean > 0 else s


class DPrunerOptions(Config):
    what = "d-pruner option"
    lam: float = Field(1.0, ge=0.0, description="weight of the general importance (SparseGPT's saliency on the general "
                       "text) against the domain's Taylor importance, each normalised to mean 1 per layer (0: the "
                       "domain's gradient-only importance)")
    general_text: str | None = Field(None, description="the general text (shakespeare | pydoc | PATH.txt; default: "
                                     "the bundled text that is not the calibration text)")
    general_samples: int = Field(32, gt=0, description="general windows (of the calibration seqlen) for the general "
                                 "importance")
    group: Literal["layer", "row"] = Field("row", description="where the scores compete: each output row (Wanda's "
                                           "finding for LLMs; default) or the whole layer")


@METHODS.register("d-pruner", params=DPrunerOptions,
                  description="domain Taylor importance + lambda x general OBS saliency (dual loss)")
class DPruner(Method):
    name = "d-pruner"
    statistic = None  # the scores come from gradients (prepare), not from activation statistics

    def __init__(self, lam: float = 1.0, general_text: str | None = None, general_samples: int = 32,
                 group: str = "row"):
        self.lam, self.group = lam, group
        self.general_batches: torch.Tensor | None = None  # set by prunekit.api.prune before prepare
        self.scores_: dict[str, torch.Tensor] = {}

    def prepare(self, model, batches, targets, progress):
        if not (isinstance(batches, torch.Tensor) and batches.dim() == 2):
            raise PruneError("D-Pruner needs domain calibration windows: token ids [samples, seqlen].")
        if self.lam > 0 and not (isinstance(self.general_batches, torch.Tensor) and self.general_batches.dim() == 2):
            raise PruneError("D-Pruner needs windows of its general text: call prunekit.prune with tokenizer= (they "
                             "are drawn from options.general_text) or general_batches=, or set options.lam to 0.")
        g, f = gradient_moments(model, batches, targets, "d-pruner domain gradients", progress)
        general = general_saliency(model, self.general_batches, targets, progress=progress) if self.lam > 0 else {}
        self.scores_ = {}
        for name, m in targets:
            w = weight_matrix(m).detach().float()
            s = (-g.pop(name) * w + 0.5 * f.pop(name) * w.pow(2)).abs()
            if self.lam > 0:
                s = _unit_mean(s) + self.lam * _unit_mean(general.pop(name))
            check_finite_tensor(s, f"The D-Pruner importance of {name}")
            self.scores_[name] = s

    def importance(self, weight, sqnorm, name):
        return self.scores_[name].to(weight.dtype)

    def prune_group(self, weights, stat, counts, nm, names):
        for i, w in enumerate(weights):
            keep = layer_keep_mask(self.scores_[names[i]].to(w.dtype), None if counts is None else w.numel() - counts[i],
                                   nm, group=self.group)
            zero_removed_(w, keep)

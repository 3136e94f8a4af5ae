"""D-Pruner (Zhang et al., "Pruning as a Domain-specific LLM Extractor", NAACL Findings 2024): unstructured pruning
that keeps what the *domain* needs without losing what the model knows in *general*.

The dual loss of the paper is the domain's language-model loss plus a regulariser that holds the weights near the
dense ones where the general text needs them:

    L_dual(W') = L_domain(W') + lambda * sum_m G_m (W'_m - W_m)^2,    G_m = E_general[(dL/dW_m)^2]

(G: the empirical Fisher diagonal of the general text's loss, estimated on general calibration windows). A
weight's importance is what removing it (W'_m = 0) costs the dual loss, to second order with the domain's own
empirical Fisher F_m as the Hessian diagonal:

    S_m = | -g_m W_m + 1/2 F_m W_m^2 |  +  lambda * G_m W_m^2

with g the mean domain gradient. With lambda = 0 it is the gradient-only (Taylor / Fisher) importance of the
domain alone; as lambda grows the general Fisher term decides. lambda = 1/2 weighs the regulariser like the
general loss's own second-order removal cost (1/2 G W^2). The paper accumulates its scores while fine-tuning
with the dual loss (LOMO); here the scores come from one gradient pass per text on the dense model (the
one-shot setting of the other methods), and each output row keeps its highest scores (``group: row``, the
default: a smoke run on SmolLM2 at 50% gave pydoc perplexity ~600 with layer-wide competition against Wanda's 36)
or the whole layer (``group: layer``).

Domain windows are the recipe's calibration windows; the general windows come from ``general_text`` (default:
the other bundled text), drawn by :func:`prunekit.api.prune` with the tokenizer, or passed as
``general_batches``. Gradients are per window (one backward each: the Fisher needs per-sample squares).
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


class DPrunerOptions(Config):
    what = "d-pruner option"
    lam: float = Field(0.5, ge=0.0, description="weight of the general-knowledge regulariser (0: the domain's "
                       "gradient-only importance; 0.5: the general loss's own second-order cost)")
    general_text: str | None = Field(None, description="the general text (shakespeare | pydoc | PATH.txt; default: "
                                     "the bundled text that is not the calibration text)")
    general_samples: int = Field(32, gt=0, description="general windows (of the calibration seqlen) for the Fisher")
    group: Literal["layer", "row"] = Field("row", description="where the scores compete: each output row (Wanda's "
                                           "finding for LLMs; default) or the whole layer")


@METHODS.register("d-pruner", params=DPrunerOptions,
                  description="domain Taylor importance + lambda x general Fisher x W^2 (dual loss)")
class DPruner(Method):
    name = "d-pruner"
    statistic = None  # the scores come from gradients (prepare), not from activation statistics

    def __init__(self, lam: float = 0.5, general_text: str | None = None, general_samples: int = 32,
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
        fisher_general = {}
        if self.lam > 0:
            _, fisher_general = gradient_moments(model, self.general_batches, targets, "d-pruner general gradients",
                                                 progress)
        self.scores_ = {}
        for name, m in targets:
            w = weight_matrix(m).detach().float()
            s = (-g[name] * w + 0.5 * f[name] * w.pow(2)).abs()
            if self.lam > 0:
                s = s + self.lam * fisher_general[name] * w.pow(2)
            check_finite_tensor(s, f"The D-Pruner importance of {name}")
            self.scores_[name] = s
        del g, f, fisher_general

    def importance(self, weight, sqnorm, name):
        return self.scores_[name].to(weight.dtype)

    def prune_group(self, weights, stat, counts, nm, names):
        for i, w in enumerate(weights):
            keep = layer_keep_mask(self.scores_[names[i]].to(w.dtype), None if counts is None else w.numel() - counts[i],
                                   nm, group=self.group)
            zero_removed_(w, keep)

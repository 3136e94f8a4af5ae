"""GBLM-Pruner (Das et al., 2023): score |W_ij| * (||X_j||_2 + alpha * G_ij), where G_ij is the l2 norm over
calibration samples of d(LM loss)/d(W_ij). With alpha = 0 it is Wanda.

||X_j||_2 is normalized per sample (sqrt of sum over tokens of x_j^2 / samples), as in the paper's code;
gradients are computed one sample at a time (forward, backward, accumulate g^2, free the graph), so peak
memory is one sample's autograd graph plus one float per target weight.
"""

from __future__ import annotations

import torch
from torch import nn

from pydantic import Field

from prunekit.checks import check_finite_tensor
from prunekit.core.config import Config
from prunekit.linear import weight_matrix
from prunekit.core.masks import layer_keep_mask, zero_removed_
from prunekit.methods.base import METHODS, Method
from prunekit.core.gradients import gradient_pass


def gradient_l2(model: nn.Module, batches: torch.Tensor, targets: list[tuple[str, nn.Module]], progress: bool = False) -> dict[str, torch.Tensor]:
    """Per target layer, sqrt(sum over samples of grad^2) in the ``[out, in]`` layout (one sample per backward:
    the squares are of per-sample gradients)."""
    names = [name for name, _ in targets]
    acc = {name: torch.zeros_like(weight_matrix(m), dtype=torch.float32) for name, m in targets}

    def loss(model, row):
        ids = row.unsqueeze(0)
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def add(i, p, g):
        a = acc[names[i]]
        a.add_((g.t() if g.shape != a.shape else g).float().pow(2))

    gradient_pass(model, [m.weight for _, m in targets], batches, loss, add, desc="gblm gradients", unit="sample",
                  progress=progress)
    return {name: a.sqrt_() for name, a in acc.items()}


class GBLMOptions(Config):
    what = "gblm option"
    alpha: float = Field(100.0, ge=0.0, description="weight of the gradient term (0 gives Wanda)")


@METHODS.register("gblm", params=GBLMOptions, description="|W| * (||X|| + alpha * ||grad W||)")
class GBLM(Method):
    name = "gblm"
    statistic = "sqnorm"

    def __init__(self, alpha: float = 100.0):
        self.alpha = alpha
        self.gradients: dict[str, torch.Tensor] = {}
        self.samples = 1

    def prepare(self, model, batches, targets, progress):
        self.samples = int(batches.shape[0])
        self.gradients = gradient_l2(model, batches, targets, progress) if self.alpha != 0 else {}
        for name, g in self.gradients.items():
            check_finite_tensor(g, f"The gradient of the language-model loss for {name}")

    def scores(self, w: torch.Tensor, sqnorm: torch.Tensor, name: str) -> torch.Tensor:
        s = w.abs() * (sqnorm / self.samples).sqrt().to(w.dtype).unsqueeze(0)
        if self.alpha != 0:
            s = s + self.alpha * w.abs() * self.gradients[name].to(w.dtype)
        return s

    def prune_group(self, weights, stat, counts, nm, names):
        for i, w in enumerate(weights):
            keep = layer_keep_mask(self.scores(w, stat, names[i]), None if counts is None else w.numel() - counts[i],
                                   nm, group="row")
            zero_removed_(w, keep)

    def importance(self, weight, sqnorm, name):
        return self.scores(weight, sqnorm, name)

"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row (or N:M group).

No weight update, no second-order information: one statistic per input channel.
"""

from __future__ import annotations

import torch

from prunekit.core.masks import layer_keep_mask, zero_removed_
from prunekit.methods.base import METHODS, Method


def wanda_scores(w: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2 with ``sqnorm[j]`` = sum over calibration tokens of x_j^2."""
    return w.abs() * sqnorm.sqrt().to(w.dtype).unsqueeze(0)


@METHODS.register("wanda", description="|W| * ||X|| compared within each output row")
class Wanda(Method):
    name = "wanda"
    statistic = "sqnorm"

    def prune_group(self, weights, stat, counts, nm, names):
        for i, w in enumerate(weights):
            scores = self.scores(w, stat, names[i])
            keep = layer_keep_mask(scores, None if counts is None else w.numel() - counts[i], nm, group="row")
            zero_removed_(w, keep)

    def scores(self, w: torch.Tensor, sqnorm: torch.Tensor, name: str) -> torch.Tensor:
        return wanda_scores(w, sqnorm)

"""Magnitude pruning: remove the smallest |W|, per layer (or, with scope=global, one threshold over all
target layers, computed by the API since it needs every layer at once)."""

from __future__ import annotations

import torch

from prunekit.masks import make_mask
from prunekit.methods.base import Method


class Magnitude(Method):
    name = "magnitude"
    statistic = None

    def prune_group(self, weights, stat, sparsity, nm):
        for w in weights:
            mask = make_mask(w.abs(), sparsity, nm, group="layer")
            w.masked_fill_(mask, 0.0)

    @staticmethod
    def scores(w: torch.Tensor) -> torch.Tensor:
        return w.abs()

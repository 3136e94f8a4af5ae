"""Magnitude pruning: remove the smallest |W| of each layer. With global allocation the counts per layer come
from one threshold over all target layers (see allocate.py)."""

from __future__ import annotations

from prunekit.core.masks import layer_keep_mask, zero_removed_
from prunekit.methods.base import METHODS, Method


@METHODS.register("magnitude", description="smallest |W| of each layer")
class Magnitude(Method):
    name = "magnitude"
    statistic = None

    def prune_group(self, weights, stat, counts, nm, names):
        for i, w in enumerate(weights):
            keep = layer_keep_mask(w.abs(), None if counts is None else w.numel() - counts[i], nm, group="layer")
            zero_removed_(w, keep)

    def importance(self, weight, sqnorm, name):
        return weight.abs()

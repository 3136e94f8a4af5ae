"""Structured pruning: remove whole attention heads, MLP channels, sublayers and blocks, so that the model
really gets smaller and faster.

* :mod:`~prunekit.structure.shrink`: the coupled groups and their physical removal (the only code that
  changes shapes); :mod:`~prunekit.structure.importance`: magnitude, FLAP fluctuation, Taylor, random;
  :mod:`~prunekit.structure.cfsp`: CFSP's block ratios and fine scores; :mod:`~prunekit.structure.similarity`:
  block angular distance (CFSP, Adapt-Pruner);
  :mod:`~prunekit.structure.plan`: units, uniform / global / per-layer selection, parameter counts;
  :mod:`~prunekit.structure.compensate`: FLAP bias compensation; :mod:`~prunekit.structure.layers`: block
  influence, sublayer influence, FinerCut greedy; :mod:`~prunekit.structure.saved`: stock config or per-layer
  sizes, and rebuilding; :mod:`~prunekit.structure.prune`: the whole run from a recipe.
"""

from prunekit.structure.prune import prune_structured, summary_lines
from prunekit.structure.saved import finalize_config, is_structured_dir, load_structured, rebuild
from prunekit.structure.shrink import (
    count_params,
    layer_sizes,
    remove_attention,
    remove_blocks,
    remove_mlp,
    shrink_heads,
    shrink_mlp,
)

__all__ = [
    "count_params",
    "finalize_config",
    "is_structured_dir",
    "layer_sizes",
    "load_structured",
    "prune_structured",
    "rebuild",
    "remove_attention",
    "remove_blocks",
    "remove_mlp",
    "shrink_heads",
    "shrink_mlp",
    "summary_lines",
]

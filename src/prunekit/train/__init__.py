"""Training after pruning that keeps every pruned weight at exactly zero (see :func:`recover`)."""

from prunekit.train.recovery import make_recovery, pruning_masks, recover

__all__ = ["make_recovery", "pruning_masks", "recover"]

"""Training after pruning: recovery, which keeps every pruned weight at exactly zero (:func:`recover`), and
compress-then-distil, which trains every weight of the pruned model towards the dense teacher
(:func:`compress_and_distill`)."""

from prunekit.train.distill import compress_and_distill
from prunekit.train.recovery import make_recovery, pruning_masks, recover

__all__ = ["compress_and_distill", "make_recovery", "pruning_masks", "recover"]

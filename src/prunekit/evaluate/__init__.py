"""Evaluation: perplexity, sparsity and size."""

from prunekit.evaluate.perplexity import perplexity
from prunekit.evaluate.size import layer_sparsity, size_summary

__all__ = ["layer_sparsity", "perplexity", "size_summary"]

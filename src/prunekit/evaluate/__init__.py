"""Evaluation: perplexity, agreement with the dense model, generations, sparsity and size."""

from prunekit.evaluate.generate import greedy, prompts_from
from prunekit.evaluate.perplexity import agreement, perplexity, score_windows
from prunekit.evaluate.size import layer_sparsity, size_summary

__all__ = ["agreement", "greedy", "layer_sparsity", "perplexity", "prompts_from", "score_windows", "size_summary"]

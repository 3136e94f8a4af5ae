"""Pruning methods of LLM post-training pruning: one file each, one interface (``Method``), one registry
(:data:`METHODS`, a :class:`prunekit.core.registry.Registry`): a method file registers its class with its own
options model, and recipes, the CLI and their errors take the choices from there."""

from prunekit.methods import magnitude, wanda, sparsegpt, gblm, dpruner  # noqa: F401, I001  (they register themselves, in this order)
from prunekit.methods.base import METHODS, Method


def get_method(name: str, options: dict | None = None) -> Method:
    """The method ``name`` built with ``options`` (validated by its options model)."""
    entry = METHODS.get(name)
    opts = METHODS.options(name, options)
    return entry.impl(**(opts.model_dump() if opts is not None else {}))


__all__ = ["METHODS", "Method", "get_method"]

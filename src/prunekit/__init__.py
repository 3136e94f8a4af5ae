"""prunekit: prune neural networks and their training data, with the methods of the literature, measured honestly.

The names below load on first use, so ``import prunekit`` (and the ``prunekit`` command's start) stays light.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "PruneError": "prunekit.errors",
    "Recipe": "prunekit.recipe",
    "Report": "prunekit.report",
    "bos_id": "prunekit.batches",
    "calibration_batches": "prunekit.batches",
    "build_report": "prunekit.evaluate.html_report",
    "evaluate": "prunekit.api",
    "evaluate_tasks": "prunekit.evaluate.tasks",
    "evaluation_windows": "prunekit.batches",
    "load": "prunekit.io",
    "load_model": "prunekit.zoo",
    "load_text": "prunekit.zoo",
    "prune": "prunekit.api",
    "prune_checkpoint": "prunekit.stream",
    "recover": "prunekit.train",
    "save": "prunekit.io",
    "tokenize": "prunekit.batches",
}

__all__ = sorted(_EXPORTS)
_FAMILIES = ("tokens", "context", "structure", "vision", "data", "stream", "train")  # ``prunekit.tokens.apply`` after ``import prunekit``


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _FAMILIES:
        return importlib.import_module(f"prunekit.{name}")
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # importing the subpackage prunekit.evaluate must not replace the function prunekit.evaluate
        if name == "evaluate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

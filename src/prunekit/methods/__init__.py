"""Pruning criteria: one file each, one interface (``Method``), one registry."""

from prunekit.errors import PruneError
from prunekit.methods.base import Method
from prunekit.methods.gblm import GBLM
from prunekit.methods.magnitude import Magnitude
from prunekit.methods.sparsegpt import SparseGPT
from prunekit.methods.wanda import Wanda

REGISTRY: dict[str, type[Method]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT, "gblm": GBLM}


def get_method(name: str, **options) -> Method:
    if name not in REGISTRY:
        raise PruneError(f"Unknown method {name!r}; choose one of: {', '.join(REGISTRY)}.")
    return REGISTRY[name](**options)


__all__ = ["REGISTRY", "Method", "get_method"]

"""Adapter interface, registry and the generic fallback.

An adapter answers "where are the decoder blocks?" for one model family. Families register themselves in
their own small file (llama.py, gpt2.py, opt.py). Unknown families fall back to the longest
``nn.ModuleList`` of identical blocks that contain linear layers.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from prunekit.errors import PruneError
from prunekit.linear import is_prunable


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks_path: str  # dotted attribute path from the *ForCausalLM model to its ModuleList of blocks

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.blocks_path.split("."):
            if not hasattr(obj, part):
                raise PruneError(
                    f"This {self.family} model has no '{self.blocks_path}'; it does not look like a standard "
                    f"{self.family} checkpoint."
                )
            obj = getattr(obj, part)
        if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
            raise PruneError(f"'{self.blocks_path}' of this model is not a non-empty list of blocks.")
        return obj


_REGISTRY: dict[str, Adapter] = {}


def register(model_types: tuple[str, ...], adapter: Adapter) -> Adapter:
    for t in model_types:
        _REGISTRY[t] = adapter
    return adapter


def _generic(model: nn.Module) -> Adapter:
    best_name, best_len = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 1:
            continue
        kinds = {type(b) for b in mod}
        if len(kinds) != 1:
            continue
        if not any(is_prunable(m) for m in mod[0].modules()):
            continue
        if len(mod) > best_len:
            best_name, best_len = name, len(mod)
    if best_name is None:
        raise PruneError(
            f"Found no decoder blocks in this {type(model).__name__} (no list of identical blocks holding linear "
            "layers); prunekit supports Llama, Mistral, Qwen2, GPT-2, OPT and similar decoder-only models."
        )
    return Adapter(family=f"generic ({type(model).__name__})", blocks_path=best_name)


def adapter_for(model: nn.Module) -> Adapter:
    # import the family files so they register themselves
    from prunekit.arch import gpt2, llama, opt  # noqa: F401

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    return _generic(model)


def target_layers(model: nn.Module, adapter: Adapter, exclude: list[str] | tuple[str, ...] = ()) -> list[list[tuple[str, nn.Module]]]:
    """Per block, the prunable linear layers as ``(full module name, module)``, minus ``exclude`` matches.

    ``exclude`` holds fnmatch patterns against full names, e.g. ``*.mlp.down_proj`` or ``model.layers.0.*``.
    """
    blocks = adapter.blocks(model)
    prefix = adapter.blocks_path
    out: list[list[tuple[str, nn.Module]]] = []
    for i, block in enumerate(blocks):
        layers = []
        for sub, mod in block.named_modules():
            if not is_prunable(mod):
                continue
            name = f"{prefix}.{i}.{sub}"
            if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
                continue
            layers.append((name, mod))
        out.append(layers)
    return out

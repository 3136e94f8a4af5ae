"""Token merging and token pruning: fewer tokens per layer, no retraining.

``handle = prunekit.tokens.apply(model, {"method": "tome", "r": 8})`` patches a model loaded by stock
``from_pretrained`` (BERT-style encoders, ViT, CLIP vision) or a module built from ``torch.nn.TransformerEncoderLayer``;
``handle.remove()`` restores it exactly. Methods (``METHODS``): ``tome`` (ToMe), ``zero-tprune``, ``cls-attention``
(EViT-style), ``random``, ``none``. See docs/GLOSSARY.md (token reduction).
"""

from __future__ import annotations

from pathlib import Path

import torch

from prunekit.errors import PruneError
from prunekit.tokens.merge import TokenState, bipartite_soft_matching, pagerank, unmerge  # noqa: F401
from prunekit.tokens.methods import METHODS
from prunekit.tokens.patch import Handle, find_layers, plan
from prunekit.tokens.recipe import TokenRecipe

__all__ = ["apply", "check", "TokenRecipe", "METHODS", "Handle", "mean_pool", "model_tokens", "save", "load"]


def _recipe(recipe) -> TokenRecipe:
    if isinstance(recipe, TokenRecipe):
        return recipe
    if recipe is None:
        return TokenRecipe.make(method="none")
    if not isinstance(recipe, dict):
        raise PruneError(f"A token recipe is a mapping such as {{'method': 'tome', 'r': 8}}, not a {type(recipe).__name__}.")
    return TokenRecipe.make(**recipe)


def model_tokens(model) -> int | None:
    """The sequence length a vision model always sees (patches + class token), or None for text."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "vision_config", cfg)
    size, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        return (size // patch) ** 2 + 1
    pos = getattr(model, "pos", None)  # prunekit's TinyViT
    if isinstance(pos, torch.Tensor) and pos.dim() == 3:
        return int(pos.shape[1])
    return None


def check(recipe, n_layers: int, tokens: int | None = None) -> TokenRecipe:
    """The validated recipe for a model of ``n_layers`` layers and inputs of ``tokens`` tokens (when known): a
    per-layer ``r`` above half the tokens of the first reducing layer, or ``layers`` the model lacks, is one
    sentence."""
    rec = _recipe(recipe)
    drops = not METHODS.get(rec.method).meta.get("merges")
    removals = plan(rec, n_layers, tokens or 2, drops)  # also checks layers
    if tokens is not None and rec.r is not None:
        first = next((n for n in removals if n > 0), 0)
        if first > tokens // 2:
            raise PruneError(f"r={first} is larger than half of the {tokens} tokens of the first reducing layer; "
                             f"use r <= {tokens // 2}.")
    return rec


def apply(model, recipe=None, *, tokens: int | None = None) -> Handle:
    """Patch ``model`` in place with the token ``recipe`` and return the handle (``remove()`` undoes it).

    ``tokens``: the input length when known (vision models know it); a per-layer ``r`` above half of it, or
    ``layers`` the model lacks, is one sentence and the model stays unpatched."""
    rec = _recipe(recipe)
    if getattr(model, "_prunekit_tokens", None) is not None:
        raise PruneError("This model is already patched by prunekit.tokens; call handle.remove() first.")
    layers, family = find_layers(model)
    if model.training:
        raise PruneError("prunekit.tokens patches models for inference (its attention has no dropout); call "
                         "model.eval() first.")
    rec = check(rec, len(layers), tokens or model_tokens(model))
    return Handle(model, rec, layers, family).patch()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, handle: Handle | None = None):
    """Mean of the token states over the real tokens (sentence embeddings). With a handle whose method dropped
    tokens, the dropped positions (zeros after unmerging) are left out; merged tokens count once per original
    token, which equals the size-weighted mean over the merged rows."""
    b, t, _ = hidden.shape
    m = torch.ones(b, t, dtype=hidden.dtype, device=hidden.device) if attention_mask is None else \
        attention_mask.to(hidden.dtype)
    if handle is not None:
        cov = handle.covered()
        if cov is not None and tuple(cov.shape) == (b, t):
            m = m * cov.to(hidden.dtype)
    return (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9)


def save(model, handle_or_recipe, out: str | Path, tokenizer=None, metrics: dict | None = None) -> Path:
    """Write the (unpatched) weights with ``save_pretrained`` and ``prunekit.json`` holding the token recipe, so
    ``prunekit.load(out)`` returns the model patched again. Atomic: nothing half-written."""
    from prunekit.io import atomic_dir, record, write_json

    rec = handle_or_recipe.recipe if isinstance(handle_or_recipe, Handle) else _recipe(handle_or_recipe)
    handle = getattr(model, "_prunekit_tokens", None)
    out = Path(out)
    with atomic_dir(out) as tmp:
        if handle is not None:
            handle.remove()
        try:
            model.save_pretrained(tmp)
        finally:
            if handle is not None:
                handle.patch()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(Path(tmp) / "prunekit.json", record("tokens", rec.model_dump(mode="json"), metrics=metrics or {},
                                                     model_class=type(model).__name__))
    return out


def load(path: str | Path):
    """A directory written by :func:`save`: (model patched with its recipe, handle)."""
    import json

    import transformers

    p = Path(path)
    meta = json.loads((p / "prunekit.json").read_text())
    if meta.get("kind") != "tokens":
        raise PruneError(f"{p} is not a prunekit.tokens output (kind {meta.get('kind')!r}).")
    cls = getattr(transformers, meta.get("model_class", ""), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise PruneError(f"{p} was saved from {meta.get('model_class')!r}, which transformers cannot load.")
    model = cls.from_pretrained(p, trust_remote_code=False).eval()
    return model, apply(model, meta["recipe"])

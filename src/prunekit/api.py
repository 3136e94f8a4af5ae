"""The Python API: ``prune(model, recipe, calibration_batches) -> (model, Report)`` and ``evaluate``."""

from __future__ import annotations

import time

import torch
from torch import nn

from prunekit.arch import adapter_for, target_layers
from prunekit.calibrate import run_sequential
from prunekit.errors import PruneError
from prunekit.evaluate import layer_sparsity, perplexity, size_summary
from prunekit.linear import in_features, weight_matrix
from prunekit.masks import global_masks
from prunekit.methods import get_method
from prunekit.recipe import Recipe
from prunekit.report import Report


def _method_for(recipe: Recipe):
    if recipe.method == "sparsegpt":
        return get_method("sparsegpt", blocksize=recipe.blocksize, dampening=recipe.dampening)
    return get_method(recipe.method)


def _check_targets(per_block: list[list[tuple[str, nn.Module]]], recipe: Recipe) -> list[tuple[str, nn.Module]]:
    flat = [t for block in per_block for t in block]
    if not flat:
        raise PruneError("No layer is left to prune: the --exclude patterns match every linear layer of the blocks.")
    nm = recipe.nm
    if nm is not None:
        for name, mod in flat:
            if in_features(mod) % nm[1]:
                raise PruneError(
                    f"Pattern {recipe.pattern} needs each layer's input size divisible by {nm[1]}, but {name} has "
                    f"{in_features(mod)} inputs; choose another M or --exclude that layer."
                )
    return flat


def prune(
    model: nn.Module,
    recipe: Recipe | dict | None = None,
    calibration_batches: torch.Tensor | None = None,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, Report]:
    """Prune ``model`` in place as ``recipe`` says and return it with a :class:`Report`.

    ``calibration_batches``: int64 token ids ``[samples, seqlen]``, needed by data-driven methods (wanda,
    sparsegpt); see :func:`prunekit.batches.calibration_batches`.
    """
    if recipe is None:
        recipe = Recipe()
    elif isinstance(recipe, dict):
        recipe = Recipe.make(**recipe)
    adapter = adapter_for(model)
    per_block = target_layers(model, adapter, recipe.exclude)
    flat = _check_targets(per_block, recipe)
    method = _method_for(recipe)

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if method.statistic is None:
        with torch.no_grad():
            if recipe.scope == "global":
                mats = [weight_matrix(m) for _, m in flat]
                for w, mask in zip(mats, global_masks([w.abs() for w in mats], recipe.sparsity)):
                    w.masked_fill_(mask, 0.0)
            else:
                for _, m in flat:
                    method.prune_group([weight_matrix(m)], None, recipe.sparsity, recipe.nm)
    else:
        if calibration_batches is None:
            raise PruneError(f"Method {recipe.method} needs calibration data; pass calibration_batches (token ids).")
        if not (isinstance(calibration_batches, torch.Tensor) and calibration_batches.dim() == 2):
            raise PruneError("calibration_batches must be a 2-D tensor of token ids [samples, seqlen].")

        def on_group(_bi, group, stat):
            method.prune_group([weight_matrix(m) for _, m in group], stat, recipe.sparsity, recipe.nm)

        phase = run_sequential(
            model,
            adapter.blocks(model),
            per_block,
            calibration_batches,
            method.statistic,
            on_group,
            batch_size=recipe.calibration.batch_size,
            device=device,
            progress=progress,
            desc=f"{recipe.method} {recipe.pattern}",
        )
        times.update({f"prune_{k}": v for k, v in phase.items()})
    times["prune_s"] = time.perf_counter() - t0

    report = Report(
        recipe=recipe.model_dump(),
        layers=layer_sparsity(flat),
        summary=size_summary(model, flat),
        times=times,
    )
    return model, report


def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> dict[str, float]:
    """Perplexity over token windows ``[n, seqlen]`` plus the model's overall sparsity over its block layers."""
    adapter = adapter_for(model)
    flat = [t for block in target_layers(model, adapter) for t in block]
    s = size_summary(model, flat)
    return {
        "perplexity": perplexity(model, windows, batch_size=batch_size, progress=progress),
        "sparsity": s["target_sparsity"],
        "params": s["params"],
        "nonzeros": s["nonzeros"],
    }

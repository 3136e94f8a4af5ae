"""Diffusion models: prune UNets and text encoders (docs/ARCHITECTURE.md, the ``diffusion/`` row).

``prune(pipeline_dir_or_pipeline, recipe)`` runs one method of :data:`METHODS` (magnitude / N:M per component,
ld-pruner, bk-sdm block removal, channels, aptp, tome) and its short fine-tune; ``load`` / ``save`` read and write
pipeline directories of stock diffusers parts; ``evaluate`` measures class fidelity, FID and sampling time on the
Fashion-MNIST reference model trained here (``reference``).
"""

from __future__ import annotations

import time

from prunekit.diffusion.methods import METHODS, DiffusionRecipe, FinetuneConfig, build_context
from prunekit.diffusion.pipeline import Condition, Pipeline, load, sample, save

__all__ = [
    "METHODS",
    "Condition",
    "DiffusionRecipe",
    "FinetuneConfig",
    "Pipeline",
    "load",
    "prune",
    "record_of",
    "sample",
    "save",
]


def prune(pipe, recipe: DiffusionRecipe | dict, *, progress: bool = True, context=None, **context_kw):
    """Prune ``pipe`` (a :class:`Pipeline` or a pipeline directory) with ``recipe``; returns ``(pruned, rows)``.
    The input pipeline is never changed."""
    from prunekit.diffusion.methods import run

    if not isinstance(recipe, DiffusionRecipe):
        recipe = DiffusionRecipe.make(**recipe)
    if not isinstance(pipe, Pipeline):
        pipe = load(pipe)
    METHODS.canonical(recipe.method)
    ctx = context or build_context(pipe, recipe, progress=progress, **context_kw)
    t0 = time.perf_counter()
    out, rows = run(pipe, recipe, ctx)
    rows["seconds"] = time.perf_counter() - t0
    return out, rows


def record_of(pipe: Pipeline, recipe: DiffusionRecipe, rows: dict, source: str | None = None) -> dict:
    """The ``prunekit.json`` of a pruned pipeline."""
    from prunekit.diffusion.pipeline import count_macs, parameters
    from prunekit.io import record

    metrics = {"unet_params": parameters(pipe.unet), "unet_macs": count_macs(pipe),
               "text_encoder_params": parameters(pipe.text_encoder)}
    base = pipe.record or {}
    return record("diffusion", recipe.model_dump(mode="json"), metrics=metrics,
                  timings={"prune": rows.get("seconds", 0.0)},
                  source=base.get("source"), parent=source, method_rows=rows,
                  classes=base.get("recipe", {}).get("classes"))

"""`prunekit diffusion train-reference|prune|eval`: thin wrappers over ``prunekit.diffusion`` (PruneError -> exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from prunekit.cli_options import Overwrite, Progress, out_option, recipe_option, seed_option, start
from prunekit.core.progress import say
from prunekit.errors import PruneError

diffusion_app = typer.Typer(add_completion=False, no_args_is_help=True,
                            help="Diffusion models: prune UNets and text encoders; measure class fidelity, FID, speed.")


@diffusion_app.command("train-reference")
def train_reference(
    out: Annotated[Path, out_option("write the reference pipeline directory here")],
    steps: Annotated[int, typer.Option(help="training steps (batch 64)")] = 4000,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """The reference model: a text-conditioned DDPM on Fashion-MNIST (16x16), trained once here and cached; copied
    to OUT (stock diffusers sub-folders)."""
    start(progress, hf=True)
    from prunekit.diffusion.reference import ReferenceConfig, reference
    from prunekit.io import atomic_dir, check_output

    if steps < 1:
        raise PruneError("--steps must be at least 1.")
    check_output(out, overwrite)
    src = reference(ReferenceConfig(steps=steps), progress)
    with atomic_dir(Path(out)) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    say(f"reference pipeline in {out} (cached in {src})")
    print(out)


def _options(value: str | None) -> dict:
    if not value:
        return {}
    try:
        data = json.loads(value)
    except json.JSONDecodeError:
        raise PruneError(f"--options {value!r} must be a JSON object, e.g. '{{\"text_sparsity\": 0.3}}'.") from None
    if not isinstance(data, dict):
        raise PruneError("--options must be a JSON object.")
    return data


@diffusion_app.command()
def prune(
    pipeline: Annotated[Path, typer.Argument(help="a pipeline directory (unet/, scheduler/, text_encoder/ ...)")],
    out: Annotated[Path, out_option("write the pruned pipeline directory here")],
    method: Annotated[str | None, typer.Option(help="magnitude | ld-pruner | bk-sdm | channels | aptp | tome")] = None,
    ratio: Annotated[float | None, typer.Option(
        help="magnitude: the UNet's sparsity; structural methods: the fraction of UNet MACs removed; tome: tokens merged")] = None,
    options: Annotated[str | None, typer.Option(help="the method's own options as JSON, e.g. '{\"nm\": \"2:4\"}'")] = None,
    finetune_steps: Annotated[int | None, typer.Option(help="short fine-tune after pruning (denoising + distillation)")] = None,
    recipe: Annotated[Path | None, recipe_option()] = None,
    seed: Annotated[int | None, seed_option("seed of the calibration noise and the fine-tune")] = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Prune a diffusion pipeline with one method; the output loads with stock diffusers (`from_pretrained`)."""
    start(progress, hf=True)
    from prunekit.core.config import read_mapping
    from prunekit.diffusion import DiffusionRecipe, load, record_of, save
    from prunekit.diffusion import prune as run_prune
    from prunekit.io import check_output

    fields = dict(read_mapping(recipe, "Diffusion recipe")) if recipe else {}
    if method is not None:
        fields["method"] = method
    if ratio is not None:
        fields["ratio"] = ratio
    if options is not None:
        fields["options"] = _options(options)
    if seed is not None:
        fields["seed"] = seed
    if finetune_steps is not None:
        if finetune_steps < 0:
            raise PruneError("--finetune-steps must be 0 or more.")
        fields["finetune"] = {**fields.get("finetune", {}), "steps": finetune_steps}
    if "method" not in fields:
        raise PruneError("Give --method (or a recipe with a method).")
    rec = DiffusionRecipe.make(**fields)
    from prunekit.diffusion.methods import METHODS, check_ratio

    METHODS.canonical(rec.method)
    METHODS.options(rec.method, rec.options)
    if rec.ratio is not None:
        check_ratio(rec.ratio)
    check_output(out, overwrite, inputs=(pipeline,))
    pipe = load(pipeline)
    pruned, rows = run_prune(pipe, rec, progress=progress)
    save(pruned, out, record_of(pruned, rec, rows, source=str(pipeline)), overwrite=overwrite, inputs=(pipeline,))
    m = record_of(pruned, rec, rows)["metrics"]
    print(json.dumps({"out": str(out), **m}, indent=2))


@diffusion_app.command("eval")
def eval_(
    pipeline: Annotated[Path, typer.Argument(help="a pipeline directory of the Fashion-MNIST reference or a pruned one")],
    samples: Annotated[int, typer.Option(help="images generated (the classes in turn)")] = 1000,
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 20,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale (1: none)")] = 2.0,
    seed: Annotated[int, seed_option("seed of the sampling noise")] = 0,
    out: Annotated[Path | None, out_option("write the figures as JSON here")] = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Class fidelity, FID on the classifier's features, sampling time per image, UNet parameters and MACs."""
    start(progress, hf=True)
    from prunekit.diffusion import load
    from prunekit.diffusion.evaluate import evaluate
    from prunekit.io import check_output_file, write_json

    if samples < 20:
        raise PruneError("--samples must be at least 20 (two per class), and FID needs many more: 1000 is usual.")
    if steps < 1:
        raise PruneError("--steps must be at least 1.")
    if out is not None:
        check_output_file(out, overwrite, ".json")
    pipe = load(pipeline)
    if pipe.prompts is None and getattr(pipe.unet, "class_embedding", None) is None:
        raise PruneError(f"{pipeline} is not conditioned on classes; eval measures class-conditional "
                         "Fashion-MNIST models (the reference and its pruned versions).")
    res = evaluate(pipe, samples, steps=steps, guidance=guidance, seed=seed, progress=progress)
    res.pop("class_fidelity_per_class", None) if out is None else None
    print(json.dumps(res, indent=2))
    if out is not None:
        write_json(out, {"pipeline": str(pipeline), **res})

"""``prunekit train-prune``: train a vision model while pruning it, write a run directory.

Registered on the main app in :mod:`prunekit.cli`; heavy imports happen inside the command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunekit.cli_options import Overwrite, Progress, out_option, recipe_option, seed_option, start

from prunekit.errors import PruneError


BUNDLED = Path(__file__).parent / "recipes"


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def _read_recipe(path: Path) -> dict:
    from prunekit.core.config import read_mapping

    if not path.is_file() and (BUNDLED / f"{path}.yaml").is_file():
        path = BUNDLED / f"{path}.yaml"
    if not path.is_file():
        raise PruneError(f"Recipe {path} does not exist; give the path of a YAML or JSON recipe file or a bundled "
                         f"recipe name ({', '.join(bundled_recipes())}).")
    data = read_mapping(path, "Recipe")
    data = data.get("train_prune", data)
    if not isinstance(data, dict):
        raise PruneError(f"Recipe {path}: train_prune must be a mapping of settings.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _learned_help() -> str:
    from prunekit.vision.learn import LEARNED

    names = LEARNED.names()

    def keys(name: str) -> str:  # each learner's --option keys, from its params
        params = LEARNED.get(name).params
        return f" (--option {', '.join(params.model_fields)})" if params is not None and params.model_fields else ""

    return " | ".join(n + keys(n) for n in names) if names else "(none yet)"


def parse_options(items: list[str] | None) -> dict:
    """``KEY=VALUE`` strings -> a dict, each value read as a YAML scalar (numbers, true/false, lists)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PruneError(f"--option takes KEY=VALUE, got {item!r}.")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise PruneError(f"--option {item!r}: the value is not a number, word or list.") from None
    return out


def train_prune(
    model: Annotated[Optional[str], typer.Argument(help="cnn | resnet | vit | concat | efficientnet-lite0")] = None,
    out: Annotated[Optional[Path], out_option("run directory (must not exist unless --overwrite)")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="fashion-mnist | synthetic")] = None,
    criterion: Annotated[Optional[str], typer.Option(help="weights: magnitude | random | snip | grasp | synflow | taylor | lrp (Pruning by Explaining: LRP relevance on the recipe's score_batches reference batches; its --option keys: rule epsilon|alpha-beta, alpha, epsilon); channels: also l1, lamp, bn-scale")] = None,
    method: Annotated[Optional[str], typer.Option(help="old spelling of --criterion (deprecated)", hidden=True)] = None,
    allocation: Annotated[Optional[str], typer.Option(help="uniform | global | owl | lamp | erk (global-min: old spelling of global with --min-density)")] = None,
    min_density: Annotated[Optional[float], typer.Option(help="global / lamp: least fraction of weights each layer keeps (Global MP)")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="oneshot | gradual | lottery | at-init | scratch | sap (sparsity-informed adaptive pruning by the PQ index; its --option keys: p, q, eta_r, gamma, beta, scope global|layer)")] = None,
    sparsity: Annotated[Optional[float], typer.Option(help="target: fraction of weights (or of channels with --structure channels), [0, 1); sap: only a cap, its sparsity is adaptive")] = None,
    structure: Annotated[Optional[str], typer.Option(help="weights (masks) | channels (the model shrinks)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="training epochs (per round for lottery and sap)")] = None,
    finetune_epochs: Annotated[Optional[int], typer.Option(help="epochs after pruning (oneshot) or added to training")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="images per step")] = None,
    lr: Annotated[Optional[float], typer.Option(help="SGD learning rate (cosine decay per phase)")] = None,
    seed: Annotated[Optional[int], seed_option("seed of initialization, data order and subset")] = None,
    train_subset: Annotated[Optional[int], typer.Option(help="train on this many images (default all)")] = None,
    test_subset: Annotated[Optional[int], typer.Option(help="evaluate on this many test images (default all)")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="resize images (EfficientNet-Lite0: 64 by default)")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="lottery / sap: pruning rounds")] = None,
    rewind_step: Annotated[Optional[int], typer.Option(help="lottery / sap: iteration the survivors are rewound to")] = None,
    gradual_start: Annotated[Optional[float], typer.Option(help="gradual: fraction of steps where pruning starts")] = None,
    gradual_end: Annotated[Optional[float], typer.Option(help="gradual: fraction of steps where the target is reached")] = None,
    prune_every: Annotated[Optional[int], typer.Option(help="gradual: steps between mask updates")] = None,
    synflow_iterations: Annotated[Optional[int], typer.Option(help="SynFlow scoring rounds")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="fnmatch pattern of layers kept dense; repeatable")] = None,
    learn: Annotated[Optional[str], typer.Option(help="a learned method that trains what it removes (runs its own schedule): " + _learned_help())] = None,
    option: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE: an option of the chosen learn / schedule / criterion (e.g. --option rounds=4); repeatable")] = None,
    recipe: Annotated[Optional[Path], recipe_option("YAML/JSON recipe file or bundled name (global-mp, gradual-cubic, lottery-ticket, synflow-at-init, precrop-snip, lite0-channels); flags override its fields")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 1,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Train a vision model while pruning it (masks or channels) and write a run directory with the model
    (safetensors + manifest) and its curves."""
    start(progress)
    from prunekit.vision.train import make_config

    fields = _read_recipe(recipe) if recipe is not None else {}
    if method is not None:
        import warnings

        warnings.warn("--method is now --criterion for train-prune; --method will be removed in the next release",
                      FutureWarning, stacklevel=1)
        if criterion is not None and criterion != method:
            raise PruneError("Give --criterion only (not also its old spelling --method).")
        criterion = method
    flags = dict(model=model, dataset=dataset, criterion=criterion, allocation=allocation, min_density=min_density,
                 schedule=schedule, sparsity=sparsity, structure=structure, epochs=epochs,
                 finetune_epochs=finetune_epochs, batch_size=batch_size, lr=lr, seed=seed, train_subset=train_subset,
                 test_subset=test_subset, image_size=image_size, rounds=rounds, rewind_step=rewind_step,
                 gradual_start=gradual_start, gradual_end=gradual_end, prune_every=prune_every,
                 synflow_iterations=synflow_iterations, exclude=exclude or None, learn=learn)
    out = out if out is not None else (Path(fields.pop("out")) if "out" in fields else None)
    fields.pop("out", None)
    if out is None:
        raise PruneError("Give the run directory with --out DIR.")
    fields.update({k: v for k, v in flags.items() if v is not None})
    if option:
        fields["options"] = {**(fields.get("options") or {}), **parse_options(option)}
    cfg = make_config(**fields)
    from prunekit.io import check_output

    check_output(out, overwrite)
    if threads < 1:
        raise PruneError(f"--threads must be at least 1, got {threads}.")
    import torch

    from prunekit.vision.train import save_run
    from prunekit.vision.train import train_prune as run

    torch.set_num_threads(max(1, threads))
    how = (f"learned: {cfg.learn} (its options decide what goes)" if cfg.learn else
           f"{cfg.structure} {cfg.criterion}/{cfg.allocation}, schedule {cfg.schedule}, "
           f"{'cap' if cfg.schedule == 'sap' else 'target'} {cfg.sparsity:.1%}")
    print(f"train-prune: {cfg.model} on {cfg.dataset}, {how}", file=sys.stderr, flush=True)
    model_, masks, info = run(cfg, progress=progress)
    save_run(out, model_, cfg, masks, info, overwrite=overwrite)
    m = info["metrics"]
    if "dense_acc" in info:
        before = f"test accuracy before {cfg.learn}'s removal" if cfg.learn else "dense test accuracy"
        print(f"{before} {info['dense_acc']:.4f}")
    for r in info.get("sap", {}).get("rounds", []):
        print(f"sap round {r['round']}: PQ index {r['pq_global']:.4f} -> pruned {r['pruned']:,} of {r['alive']:,}, "
              f"sparsity {r['sparsity']:.4f}, test accuracy {r['test_acc']:.4f}")
    if "acc_after_prune" in info:
        print(f"right after pruning  {info['acc_after_prune']:.4f}")
    if info.get("channels"):  # channel runs and learners that remove channels (polarization)
        ch = info["channels"]
        print(f"channels: parameters {ch['params_before']:,} -> {ch['params_after']:,}")
    j = info["journey"]
    journey = (f"average parameters {j['average_params']:,.0f} over {j['steps']} steps (final {j['final_params'] or 0:,})"
               if j["steps"] else "no training steps")
    print(f"final test accuracy {m['test_acc']:.4f} on {m['test_images']} images, sparsity {m['sparsity']:.4f}, "
          f"{journey}, {info['seconds']:.1f}s")
    print(f"saved {out}  (prunekit.vision.train.load_run('{out}') rebuilds it)")

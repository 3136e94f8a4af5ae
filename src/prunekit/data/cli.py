"""`prunekit data score|select|train|select-for-target`: thin wrappers over ``prunekit.data`` (PruneError -> exit 2)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunekit.cli_options import Overwrite, Progress, out_option, recipe_option, seed_option, start
from prunekit.core.progress import say
from prunekit.errors import PruneError

data_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Data pruning: score every training example, select a subset, train on it.")

DatasetArg = Annotated[str, typer.Argument(help="fashion-mnist | digits | image folder (one sub-folder per class) | .npy/.npz | .csv/.jsonl")]
TextCol = Annotated[str, typer.Option(help="CSV/JSONL: the text column")]
LabelCol = Annotated[str, typer.Option(help="CSV/JSONL: the label column (used when present; 'none' for unlabeled)")]
LabelsOpt = Annotated[Optional[Path], typer.Option(help=".npy data: a .npy file of labels, one per example")]
ImageSize = Annotated[int, typer.Option(help="image folder: images are resized to this many pixels square")]
DataRecipe = Annotated[Optional[Path], recipe_option("YAML/JSON file of these options (names with _ or -); flags given here override it")]


_say = say


def _check_out(out: Path, overwrite: bool) -> None:
    from prunekit.data.files import is_prunekit_file
    from prunekit.io import check_output_file

    check_output_file(out, overwrite, ".parquet", is_ours=is_prunekit_file)


def _is_our_json(path: Path) -> bool:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and (data.get("kind") == "data-train" or ("kept" in data and "total" in data))


def _with_recipe(ctx: typer.Context, recipe: Path | None, values: dict) -> dict:
    """``values`` (this command's options) with those the user did not give on the command line taken from the
    recipe file; an unknown key in it is one sentence."""
    if recipe is None:
        return values
    from prunekit.core.config import read_mapping

    data = {str(k).replace("-", "_"): v for k, v in read_mapping(recipe).items()}
    unknown = sorted(set(data) - set(values) - {"recipe"})
    if unknown:
        raise PruneError(f"Recipe {recipe} has the unknown field {unknown[0]!r} for `prunekit data {ctx.info_name}`; "
                         f"its fields are: {', '.join(k for k in values if k != 'recipe')}.")
    out = dict(values)
    for k, v in data.items():
        source = ctx.get_parameter_source(k)  # typer's click: compare by name
        if source is None or getattr(source, "name", "") in ("DEFAULT", "DEFAULT_MAP"):
            out[k] = Path(v) if k in ("out", "subset", "labels") and v is not None else v
    return out


def _load(dataset, split, text_column, label_column, labels, image_size):
    from prunekit.data import load_dataset

    return load_dataset(dataset, split, text_column=text_column,
                        label_column=None if label_column.lower() == "none" else label_column,
                        labels=labels, image_size=image_size)


@data_app.command("score")
def score_cmd(
    ctx: typer.Context,
    dataset: DatasetArg,
    out: Annotated[Path, out_option("output .parquet: index, score (higher = harder), label, ...")],
    score: Annotated[str, typer.Option("--score", help="random | el2n | grand | forgetting | aum | entropy | prototype")] = "el2n",
    split: Annotated[str, typer.Option(help="built-in data sets: train or test")] = "train",
    seed: Annotated[int, seed_option("seed of the first run (runs use seed, seed+1, ...)")] = 0,
    seeds: Annotated[int, typer.Option(help="training runs averaged (el2n, grand, entropy, forgetting, aum)")] = 3,
    epochs: Annotated[Optional[int], typer.Option(help="epochs per run (default 2 for el2n/grand/entropy, 6 for forgetting/aum; grand: 0 = at init)")] = None,
    model: Annotated[str, typer.Option(help="auto (fast-cnn for images, mlp otherwise) | fast-cnn | mlp | linear")] = "auto",
    grand_params: Annotated[str, typer.Option(help="grand: all (exact per-example gradients) | last (classifier layer)")] = "all",
    encoder: Annotated[str, typer.Option(help="prototype/embeddings: auto | efficientnet-lite0 | simclr (self-supervised, trained on DATASET, cached) | pca | pixels | minilm")] = "auto",
    clusters: Annotated[Optional[int], typer.Option(help="prototype: k-means clusters (default: number of classes, or 10)")] = None,
    ssl_steps: Annotated[int, typer.Option(help="--encoder simclr: training steps of the self-supervised encoder")] = 1500,
    with_embeddings: Annotated[bool, typer.Option("--with-embeddings", help="also store embeddings and clusters (for --strategy dbp / semdedup)")] = False,
    engine: Annotated[str, typer.Option(help="local | ray (Ray Data; local Ray unless --ray-address)")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address, e.g. ray://host:10001")] = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
    text_column: TextCol = "text", label_column: LabelCol = "label", labels: LabelsOpt = None, image_size: ImageSize = 32,
    recipe: DataRecipe = None,
) -> None:
    """Score every example of DATASET (one float each, higher = harder) into a Parquet file."""
    start(progress)
    _v = _with_recipe(ctx, recipe, dict(dataset=dataset, out=out, score=score, split=split, seed=seed, seeds=seeds,
        epochs=epochs, model=model, grand_params=grand_params, encoder=encoder, clusters=clusters, ssl_steps=ssl_steps,
        with_embeddings=with_embeddings, engine=engine, ray_address=ray_address, overwrite=overwrite,
        text_column=text_column, label_column=label_column, labels=labels, image_size=image_size))
    (dataset, out, score, split, seed, seeds, epochs, model, grand_params, encoder, clusters, ssl_steps, with_embeddings,
        engine, ray_address, overwrite, text_column, label_column, labels, image_size) = _v.values()
    from prunekit.data import SCORES, ScoreConfig, save_scores
    from prunekit.data import score as run_score
    from prunekit.data.engine import ENGINES

    score = SCORES.canonical(score)
    if engine not in ENGINES:
        raise PruneError(f"Unknown engine {engine!r}; use local or ray.")
    cfg = ScoreConfig.make(seed=seed, seeds=seeds, epochs=epochs, model=model, grand_params=grand_params, encoder=encoder,
                      clusters=clusters, ssl_steps=ssl_steps)
    cfg.check()
    _check_out(out, overwrite)
    ds = _load(dataset, split, text_column, label_column, labels, image_size)
    _say(f"scoring {len(ds):,} examples of {ds.name} with {score} on the {engine} engine ...")
    t0 = time.perf_counter()
    res = run_score(ds, score, cfg, engine=engine, address=ray_address, with_embeddings=with_embeddings, progress=progress)
    secs = time.perf_counter() - t0
    save_scores(out, ds, res, cfg=cfg.to_dict(), engine=engine, seconds=secs)
    v = res.values
    print(f"{score}: {len(v):,} scores in {secs:.1f}s (min {v.min():.4g}, median {float(sorted(v)[len(v) // 2]):.4g}, "
          f"max {v.max():.4g}); saved {out}")


@data_app.command("select")
def select_cmd(
    ctx: typer.Context,
    scores: Annotated[Path, typer.Argument(help="score file from `prunekit data score`")],
    out: Annotated[Path, out_option("output .parquet with the kept indices")],
    keep: Annotated[Optional[float], typer.Option(help="fraction of the examples to keep, in (0, 1]")] = None,
    strategy: Annotated[str, typer.Option(help="easiest | hardest | random | ccs | dbp | semdedup")] = "hardest",
    class_balanced: Annotated[bool, typer.Option("--class-balanced", help="every class keeps the same fraction")] = False,
    beta: Annotated[float, typer.Option(help="ccs: fraction of the hardest examples dropped first")] = 0.0,
    bins: Annotated[int, typer.Option(help="ccs: score strata")] = 50,
    eps: Annotated[Optional[float], typer.Option(help="semdedup: drop examples with cosine similarity > 1 - eps to a kept one")] = None,
    temperature: Annotated[float, typer.Option(help="dbp: softmax temperature of the cluster budgets")] = 0.1,
    neighbors: Annotated[int, typer.Option(help="dbp: nearest other centroids in the inter-cluster distance")] = 5,
    seed: Annotated[int, seed_option("seed of the sampling and the tie-breaking")] = 0,
    overwrite: Overwrite = False,
    progress: Progress = True,
    recipe: DataRecipe = None,
) -> None:
    """Select the subset to keep from a score file."""
    start(progress)
    _v = _with_recipe(ctx, recipe, dict(scores=scores, out=out, keep=keep, strategy=strategy,
        class_balanced=class_balanced, beta=beta, bins=bins, eps=eps, temperature=temperature, neighbors=neighbors,
        seed=seed, overwrite=overwrite))
    (scores, out, keep, strategy, class_balanced, beta, bins, eps, temperature, neighbors, seed, overwrite) = _v.values()
    from prunekit.data import load_scores, save_keep, select
    from prunekit.data.select import STRATEGIES, check_keep

    strategy = STRATEGIES.canonical(strategy)
    if keep is not None or strategy != "semdedup":
        check_keep(keep)
    _check_out(out, overwrite)
    cols, meta = load_scores(scores)
    idx = select(cols["score"], keep, strategy, labels=cols.get("label"), class_balanced=class_balanced, seed=seed,
                 beta=beta, bins=bins, clusters=cols.get("cluster"), embeddings=cols.get("embedding"), eps=eps,
                 temperature=temperature, neighbors=neighbors)
    n = len(cols["score"])
    save_keep(out, idx, n, {"dataset": meta.get("dataset"), "split": meta.get("split"), "score": meta.get("score"),
                            "strategy": strategy, "source": str(scores), "fingerprint": meta.get("fingerprint")},
              recipe={"strategy": strategy, "keep": keep, "class_balanced": class_balanced, "beta": beta, "bins": bins,
                      "eps": eps, "temperature": temperature, "neighbors": neighbors, "seed": seed})
    line = f"kept {len(idx):,} of {n:,} ({len(idx) / n:.1%}) by {strategy} on {meta.get('score')} scores"
    if "label" in cols:
        counts = [int(c) for c in __import__("numpy").bincount(cols["label"][idx], minlength=int(cols["label"].max()) + 1)]
        line += f"; per class {counts}"
    print(line + f"; saved {out}")


@data_app.command("train")
def train_cmd(
    ctx: typer.Context,
    dataset: DatasetArg,
    subset: Annotated[Optional[Path], typer.Option(help="subset file from `prunekit data select` (default: all examples)")] = None,
    distill: Annotated[bool, typer.Option("--distill", help="distill from a teacher trained on the full data")] = False,
    epochs: Annotated[int, typer.Option(help="training epochs over the subset")] = 5,
    steps: Annotated[Optional[int], typer.Option(help="train a fixed number of steps instead of --epochs (same compute for every subset size)")] = None,
    teacher_epochs: Annotated[Optional[int], typer.Option(help="teacher epochs on the full data (default: --epochs)")] = None,
    model: Annotated[str, typer.Option(help="auto (fast-cnn for images, mlp otherwise) | fast-cnn | mlp | linear")] = "auto",
    temperature: Annotated[float, typer.Option(help="distillation temperature")] = 4.0,
    alpha: Annotated[float, typer.Option(help="distillation weight (the label loss gets 1 - alpha)")] = 0.9,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, one-cycle)")] = 2e-3,
    batch_size: Annotated[int, typer.Option(help="minibatch size")] = 128,
    seed: Annotated[int, seed_option("training seed")] = 0,
    split: Annotated[str, typer.Option(help="built-in data sets: the split trained on")] = "train",
    test: Annotated[Optional[str], typer.Option(help="data set to test on (default: the built-in's test split)")] = None,
    val_size: Annotated[Optional[int], typer.Option(help="early stopping: hold out this many examples (stratified) from those the subset does not keep (from all without --subset) and keep the best validation check")] = None,
    patience: Annotated[Optional[int], typer.Option(help="with --val-size: stop after this many checks without a better validation accuracy")] = None,
    out: Annotated[Optional[Path], out_option("write the metrics as JSON here")] = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
    text_column: TextCol = "text", label_column: LabelCol = "label", labels: LabelsOpt = None, image_size: ImageSize = 32,
    recipe: DataRecipe = None,
) -> None:
    """Train a small model on the kept subset (optionally distilled) and report test accuracy."""
    start(progress)
    _v = _with_recipe(ctx, recipe, dict(dataset=dataset, subset=subset, distill=distill, epochs=epochs, steps=steps,
        teacher_epochs=teacher_epochs, model=model, temperature=temperature, alpha=alpha, lr=lr,
        batch_size=batch_size, seed=seed, split=split, test=test, val_size=val_size, patience=patience, out=out,
        overwrite=overwrite, text_column=text_column, label_column=label_column, labels=labels, image_size=image_size))
    (dataset, subset, distill, epochs, steps, teacher_epochs, model, temperature, alpha, lr, batch_size, seed, split,
        test, val_size, patience, out, overwrite, text_column, label_column, labels, image_size) = _v.values()
    from prunekit.data import TrainConfig, load_keep, train_subset
    from prunekit.data.train import auto_model, model_name
    from prunekit.data.datasets import has_test_split
    from prunekit.io import write_json

    if not (0.0 <= alpha <= 1.0):
        raise PruneError(f"--alpha must be in [0, 1], got {alpha}.")
    if temperature <= 0:
        raise PruneError(f"--temperature must be positive, got {temperature}.")
    if epochs < 1:
        raise PruneError(f"--epochs must be at least 1, got {epochs}.")
    if steps is not None and steps < 1:
        raise PruneError(f"--steps must be at least 1, got {steps}.")
    if teacher_epochs is not None and teacher_epochs < 1:
        raise PruneError(f"--teacher-epochs must be at least 1, got {teacher_epochs}.")
    if val_size is not None and val_size < 1:
        raise PruneError(f"--val-size must be at least 1, got {val_size}.")
    if patience is not None and val_size is None:
        raise PruneError("--patience needs a validation split; add --val-size N.")
    TrainConfig.make(model=model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, temperature=temperature,
                alpha=alpha, steps=steps, patience=patience).check()
    if out is not None:
        from prunekit.io import check_output_file

        check_output_file(out, overwrite, ".json", is_ours=_is_our_json)
    ds = _load(dataset, split, text_column, label_column, labels, image_size)
    keep = None
    if subset is not None:
        keep, _ = load_keep(subset, n=len(ds), fingerprint=ds.fingerprint())
    test_ds = None
    if test is not None:
        test_ds = _load(test, "test", text_column, label_column, labels, image_size)
    elif has_test_split(dataset) and split == "train":
        test_ds = _load(dataset, "test", text_column, label_column, labels, image_size)
    val = None
    if val_size is not None:
        import numpy as np

        from prunekit.data.select import validation_split

        outside = np.arange(len(ds)) if keep is None else np.setdiff1d(np.arange(len(ds)), keep)
        need = val_size + (1 if keep is None else 0)  # without --subset, something must be left to train on
        if need > len(outside):
            raise PruneError(f"--val-size {val_size} needs more examples than the {len(outside):,} "
                             + ("in the data set" if keep is None else "the subset does not keep")
                             + "; give a smaller --val-size.")
        if val_size == len(outside):
            val = outside
        else:
            val = outside[validation_split(ds.require_labels("Early stopping")[outside], val_size, seed=seed)[1]]
    kind = model_name(model) if model != "auto" else auto_model(ds.kind)
    cfg = TrainConfig.make(model=kind, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, temperature=temperature,
                      alpha=alpha, steps=steps, patience=patience)
    tcfg = TrainConfig.make(**{**cfg.model_dump(), "epochs": teacher_epochs or epochs, "steps": None})
    n_keep = (len(ds) - (0 if val is None else len(val))) if keep is None else len(keep)
    _say(f"training a {kind} on {n_keep:,} of {len(ds):,} examples for " + (f"{steps} steps" if steps else f"{epochs} epochs")
         + (f", distilled from a teacher trained on all of them ({tcfg.epochs} epochs)" if distill else "") + " ...")
    res = train_subset(ds, keep, cfg, test=test_ds, distill=distill, teacher_cfg=tcfg, progress=progress, val=val)
    res.pop("model")
    res.update(dataset=ds.name, subset=str(subset) if subset else None)
    if out is not None:
        from prunekit.io import record

        metrics = {k: res[k] for k in ("test_accuracy", "teacher_test_accuracy", "kept", "total", "fraction",
                                       "best_epoch", "epochs_run", "val_accuracy") if k in res}
        timings = {k: res[k] for k in ("train_seconds", "teacher_seconds") if k in res}
        write_json(out, record("data-train", {**cfg.model_dump(), "distill": distill,
                                              **({"teacher": tcfg.model_dump()} if distill else {})},
                               metrics=metrics, timings=timings, dataset=ds.name, subset=res["subset"]))
    acc = f"test accuracy {res['test_accuracy']:.4f}" if "test_accuracy" in res else "no test set (give --test)"
    extra = f" (teacher {res['teacher_test_accuracy']:.4f})" if "teacher_test_accuracy" in res else ""
    if "best_epoch" in res:
        extra += (f"; early stopping on {len(val):,} held-out examples kept epoch {res['best_epoch']} of "
                  f"{res['epochs_run']} (validation accuracy {res['val_accuracy']:.4f})")
    print(f"trained on {res['kept']:,}/{res['total']:,} ({res['fraction']:.1%}) in {res['train_seconds']:.1f}s: {acc}{extra}"
          + (f"; saved {out}" if out else ""))
    json.dumps(res)  # metrics stay JSON-serializable


@data_app.command("select-for-target")
def select_for_target_cmd(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="the source data set to prune before pre-training (same forms as DATASET)")],
    target: Annotated[str, typer.Option(help="the target data set (its training split; labels not needed)")],
    out: Annotated[Path, out_option("output .parquet with the kept source indices")],
    keep: Annotated[Optional[float], typer.Option(help="fraction of the source examples to keep, in (0, 1]")] = None,
    method: Annotated[str, typer.Option(help="label (label mapping: classes the target maps to) | feature (feature mapping: clusters near the target)")] = "label",
    soft: Annotated[bool, typer.Option("--soft", help="label: sum the softmax over source classes instead of top-1 counts")] = False,
    clusters: Annotated[int, typer.Option(help="feature: k-means clusters of the source")] = 50,
    target_clusters: Annotated[int, typer.Option(help="feature: k-means centroids of the target (1 = its mean)")] = 10,
    epochs: Annotated[int, typer.Option(help="epochs of the source model on the whole source")] = 5,
    steps: Annotated[Optional[int], typer.Option(help="train the source model a fixed number of steps instead of --epochs")] = None,
    model: Annotated[str, typer.Option(help="source model: auto (fast-cnn for images, mlp otherwise) | fast-cnn | mlp | linear")] = "auto",
    split: Annotated[str, typer.Option(help="built-in source: the split pruned")] = "train",
    seed: Annotated[int, seed_option("seed of the source model, the clustering and the partial group")] = 0,
    overwrite: Overwrite = False,
    progress: Progress = True,
    text_column: TextCol = "text", label_column: LabelCol = "label", labels: LabelsOpt = None, image_size: ImageSize = 32,
    recipe: DataRecipe = None,
) -> None:
    """Prune a source data set for transfer to a target task (DP4TL: label or feature mapping)."""
    start(progress)
    _v = _with_recipe(ctx, recipe, dict(source=source, target=target, out=out, keep=keep, method=method, soft=soft,
        clusters=clusters, target_clusters=target_clusters, epochs=epochs, steps=steps, model=model, split=split,
        seed=seed, overwrite=overwrite, text_column=text_column, label_column=label_column, labels=labels,
        image_size=image_size))
    (source, target, out, keep, method, soft, clusters, target_clusters, epochs, steps, model, split, seed, overwrite,
        text_column, label_column, labels, image_size) = _v.values()
    from prunekit.data import TrainConfig, save_keep
    from prunekit.data.select import check_keep
    from prunekit.data.train import auto_model, model_name
    from prunekit.data.transfer import METHODS, select_for_target

    if method not in METHODS:
        raise PruneError(f"Unknown method {method!r}; use label (label mapping) or feature (feature mapping).")
    check_keep(keep)
    for name, v in (("--clusters", clusters), ("--target-clusters", target_clusters), ("--epochs", epochs)):
        if v < 1:
            raise PruneError(f"{name} must be at least 1, got {v}.")
    if steps is not None and steps < 1:
        raise PruneError(f"--steps must be at least 1, got {steps}.")
    TrainConfig.make(model=model, epochs=epochs, seed=seed, steps=steps).check()
    _check_out(out, overwrite)
    src = _load(source, split, text_column, label_column, labels, image_size)
    tgt = _load(target, "train", text_column, label_column, None, image_size)
    kind = model_name(model) if model != "auto" else auto_model(src.kind)
    cfg = TrainConfig.make(model=kind, epochs=epochs, seed=seed, steps=steps)
    _say(f"training a {kind} on all {len(src):,} examples of {src.name}, then mapping {len(tgt):,} examples of "
         f"{tgt.name} onto it ({method} mapping) ...")
    res = select_for_target(src, tgt, method, keep, cfg=cfg, seed=seed, soft=soft, clusters=clusters,
                            target_clusters=target_clusters, progress=progress)
    idx = res.keep
    save_keep(out, idx, len(src), {"dataset": src.name, "split": src.meta.get("split"), "strategy": f"dp4tl-{method}",
                                   "target": tgt.name, "fingerprint": src.fingerprint()},
              recipe={"method": method, "keep": keep, "soft": soft, "clusters": clusters,
                      "target_clusters": target_clusters, "seed": seed, **cfg.model_dump()})
    line = f"kept {len(idx):,} of {len(src):,} ({len(idx) / len(src):.1%}) by {method} mapping to {tgt.name}"
    if src.y is not None:
        import numpy as np

        line += f"; per class {[int(c) for c in np.bincount(src.y[idx], minlength=src.num_classes)]}"
    print(line + f"; saved {out}")

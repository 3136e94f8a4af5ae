"""`prunekit context prune | bench | train`: context pruning for retrieval-augmented generation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunekit.cli_options import Overwrite, Progress, out_option, recipe_option, seed_option, start
from prunekit.core.progress import bar, say
from prunekit.errors import PruneError

context_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Context pruning for RAG: keep what matters in the retrieved passages.")

Keep = Annotated[Optional[float], typer.Option(help="fraction of the context kept, in (0, 1]")]
Threshold = Annotated[Optional[float], typer.Option(help="provence/bm25: keep each sentence scoring at least this")]
Scorer = Annotated[Optional[str], typer.Option(help="provence: minilm | a `context train` directory | a HF cross-encoder")]
Trust = Annotated[bool, typer.Option(help="allow code shipped with a scorer (the real Provence checkpoint)")]


def _recipe(recipe: Optional[Path], **given):
    from prunekit.context import ContextRecipe
    from prunekit.core.config import read_mapping

    fields = dict(read_mapping(recipe, "Context recipe")) if recipe else {}
    fields.update({k: v for k, v in given.items() if v is not None})
    return ContextRecipe.make(**fields)


def _pruned_file(p: Path) -> bool:
    """A JSONL file `context prune` wrote (its first line has kept_fraction)."""
    import json

    try:
        with open(p, encoding="utf-8") as fh:
            return "kept_fraction" in json.loads(fh.readline() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


@context_app.command()
def prune(
    input: Annotated[Path, typer.Option("--input", "-i", help='JSONL: {"question": str, "passages": [str, ...]} per line')],
    out: Annotated[Path, out_option("JSONL with the pruned passages, their sentence scores and kept_fraction")],
    method: Annotated[Optional[str], typer.Option(help="provence | llmlingua | longllmlingua | bm25 | first-k | random | keep-all")] = None,
    keep: Keep = None,
    threshold: Threshold = None,
    scorer: Scorer = None,
    recipe: Annotated[Optional[Path], recipe_option()] = None,
    seed: Annotated[Optional[int], seed_option("seed of random")] = None,
    trust_remote_code: Trust = False,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Prune the passages of every question in a JSONL file."""
    start(progress, hf=True)
    from prunekit.context import Pruner, read_jsonl, write_jsonl
    from prunekit.io import check_output_file

    rec = _recipe(recipe, method=method, keep=keep, threshold=threshold, scorer=scorer, seed=seed)
    if Path(input).resolve() == Path(out).resolve():
        raise PruneError("--out is the --input file; write the pruned passages elsewhere.")
    out = check_output_file(out, overwrite, ".jsonl", is_ours=_pruned_file)
    rows = read_jsonl(input)
    pruner = Pruner(rec, trust_remote_code=trust_remote_code)
    results, kept = [], []
    for row in bar(rows, desc=f"{rec.method}", unit="question"):
        p = pruner(row["question"], row["passages"])
        results.append({**row, **p.to_dict()})
        kept.append(p.kept_fraction)
    write_jsonl(out, results)
    print(f"{len(rows)} questions pruned with {rec.method}: kept {sum(kept) / len(kept):.3f} of the context on "
          f"average; wrote {out}")


@context_app.command()
def bench(
    method: Annotated[list[str], typer.Option(help="methods to compare (repeat the flag); keep-all is always the reference")] = ["provence"],  # noqa: B006
    rates: Annotated[str, typer.Option(help="fractions of the context kept, comma-separated")] = "0.3,0.5,0.7",
    scorer: Scorer = None,
    needle: Annotated[int, typer.Option(help="needle questions (Shakespeare)")] = 24,
    pydoc: Annotated[int, typer.Option(help="passage questions (pydoc)")] = 24,
    seed: Annotated[int, seed_option("seed of the question set and of random")] = 0,
    trust_remote_code: Trust = False,
    out: Annotated[Optional[Path], out_option("write the rows as JSON here")] = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Answer quality vs compression on the test part of the built-in RAG questions (needle QA on Shakespeare,
    passage QA on pydoc), read by SmolLM2-135M-Instruct with one prompt for every method."""
    start(progress, hf=True)
    from prunekit.context import ContextRecipe, Pruner, qa
    from prunekit.context.bench import run, table
    from prunekit.context.methods import METHODS
    from prunekit.context.reader import Reader

    try:
        fracs = [float(x) for x in rates.split(",") if x.strip()]
    except ValueError:
        raise PruneError(f"--rates {rates!r} must be fractions separated by commas, e.g. 0.3,0.5,0.7.") from None
    if not fracs:
        raise PruneError("--rates is empty; give fractions such as 0.3,0.5,0.7.")
    for f in fracs:
        if not 0.0 < f <= 1.0:
            raise PruneError(f"Rate {f} is outside (0, 1]; a rate is the fraction of the context kept.")
    if needle < 0 or pydoc < 0 or needle + pydoc == 0:
        raise PruneError("--needle and --pydoc must not be negative and not both 0.")
    methods = [METHODS.canonical(m) for m in method]
    recipes = [ContextRecipe.make(method=m, keep=f, **({"scorer": scorer} if scorer and m == "provence" else {}), seed=seed)
               for m in methods if m != "keep-all" for f in fracs]
    if out is not None and out.exists() and not overwrite:
        raise PruneError(f"{out} exists; pass --overwrite to replace it.")
    items = qa.build("test", needle, pydoc, seed=seed)
    reader = Reader()
    base = run(items, "keep-all", Pruner(method="keep-all"), reader)
    rows = [base]
    loaded = None
    for rec in recipes:
        loaded = Pruner.like(loaded, rec, trust_remote_code=trust_remote_code)
        rows.append(run(items, f"{rec.method} keep={rec.keep}", loaded, reader, base=base))
    for line in table(rows):
        print(line)
    if out is not None:
        from prunekit.io import record, write_json

        write_json(out, record("context", {"methods": methods, "rates": fracs, "needle": needle, "pydoc": pydoc,
                                           "seed": seed}, metrics={"rows": rows}))
        say(f"wrote {out}")


@context_app.command()
def train(
    out: Annotated[Path, out_option("directory for the trained scorer (use it as --scorer DIR)")],
    needle: Annotated[Optional[int], typer.Option(help="training needle questions")] = None,
    pydoc: Annotated[Optional[int], typer.Option(help="training pydoc questions")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="passes over the training questions")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate")] = None,
    recipe: Annotated[Optional[Path], recipe_option()] = None,
    seed: Annotated[Optional[int], seed_option("seed of the training questions and of the training order")] = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Train Provence's MiniLM cross-encoder (a keep head per token, a reranking head) from silver labels that
    SmolLM2 gives on the train part of the built-in questions (never the test part)."""
    start(progress, hf=True)
    from prunekit.context.train import TrainRecipe, train_scorer
    from prunekit.core.config import read_mapping
    from prunekit.io import atomic_dir, check_output

    fields = dict(read_mapping(recipe, "Train recipe")) if recipe else {}
    fields.update({k: v for k, v in {"needle": needle, "pydoc": pydoc, "epochs": epochs, "lr": lr, "seed": seed}.items()
                   if v is not None})
    rec = TrainRecipe.make(**fields)
    out = check_output(out, overwrite)
    scorer, metrics, timings = train_scorer(rec, progress=progress)
    with atomic_dir(out) as tmp:
        scorer.save(tmp, rec.model_dump(mode="json"), metrics, timings)
    print(f"trained on {metrics['questions']} questions ({metrics['relevant_sentences']} of "
          f"{metrics['sentences']} sentences labelled relevant), {metrics['steps']} steps in "
          f"{timings['train_s']:.0f} s; wrote {out}")

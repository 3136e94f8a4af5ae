"""`prunekit tokens bench`: quality and throughput of one token recipe against the unpatched model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunekit.cli_options import Overwrite, Progress, out_option, recipe_option, seed_option, start
from prunekit.core.progress import say
from prunekit.errors import PruneError

tokens_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Token merging and pruning: fewer tokens per layer, no retraining.")


@tokens_app.command()
def bench(
    model: Annotated[str, typer.Argument(help="minilm-l6 (pydoc retrieval) | vit-fashion (Fashion-MNIST top-1)")],
    method: Annotated[str, typer.Option(help="tome | zero-tprune | cls-attention | random | none")] = "tome",
    r: Annotated[Optional[int], typer.Option(help="tokens removed per layer (ToMe's r)")] = None,
    keep: Annotated[Optional[float], typer.Option(help="fraction of the tokens left after the last reducing layer")] = None,
    flops: Annotated[Optional[float], typer.Option(help="fraction of the dense FLOPs to spend (sets a constant r)")] = None,
    schedule: Annotated[str, typer.Option(help="constant | decreasing")] = "constant",
    layers: Annotated[Optional[str], typer.Option(help="reducing layers, comma-separated (default: the method's)")] = None,
    min_tokens: Annotated[Optional[int], typer.Option(
        help="inputs with fewer real tokens are not reduced (64 keeps short queries whole)")] = None,
    text: Annotated[str, typer.Option(help="minilm-l6: the retrieval text (pydoc)")] = "pydoc",
    recipe: Annotated[Optional[Path], recipe_option("YAML/JSON token recipe; flags given here override its fields")] = None,
    seed: Annotated[int, seed_option("seed of random drop")] = 0,
    repeats: Annotated[int, typer.Option(help="timed repeats per measurement (median)")] = 5,
    out: Annotated[Optional[Path], out_option("write the figures as JSON here")] = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Measure a token recipe: quality (recall@1/@10 and embedding cosine on MiniLM; top-1 on the ViT) and
    measured throughput, against the unpatched model, on the same inputs."""
    start(progress, hf=True)
    from prunekit.core.config import read_mapping
    from prunekit.tokens import TokenRecipe
    from prunekit.tokens.bench import MODELS, minilm_rows, vit_rows

    if model not in MODELS:
        raise PruneError(f"Unknown token benchmark model {model!r}; choose one of: {', '.join(MODELS)}.")
    if text != "pydoc":
        raise PruneError(f"The retrieval task is built from pydoc; --text {text!r} is not available.")
    if repeats < 1:
        raise PruneError("--repeats must be at least 1.")
    if out is not None and out.exists() and not overwrite:
        raise PruneError(f"{out} exists; pass --overwrite to replace it.")
    fields = dict(read_mapping(recipe, "Token recipe")) if recipe else {}
    try:
        layer_list = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise PruneError(f"--layers {layers!r} must be layer numbers separated by commas, e.g. 1,3,4.") from None
    given = {"method": method, "r": r, "keep": keep, "flops": flops, "schedule": schedule, "seed": seed,
             "layers": layer_list, "min_tokens": min_tokens}
    for k, v in given.items():
        if v is not None and (k not in fields or v != {"method": "tome", "schedule": "constant", "seed": 0}.get(k)):
            fields[k] = v
    from prunekit.tokens import check

    if model == "vit-fashion":
        from prunekit.zoo.vit import vit_config

        cfg = vit_config()
        check(fields, cfg.num_hidden_layers, (cfg.image_size // cfg.patch_size) ** 2 + 1)
    else:
        check(fields, 6, 256)
    rec = TokenRecipe.make(**fields).model_dump(mode="json", exclude_defaults=True)
    rec.setdefault("method", "tome")
    recipes = [{"method": "none"}, rec]
    say(f"{model}: {rec}")
    log = say
    if model == "minilm-l6":
        res = minilm_rows(recipes, repeats=repeats, log=log)
        d, p = res["rows"]
        print(f"pydoc retrieval ({res['task']['queries']} queries, {res['task']['sections']} sections): "
              f"recall@1 {d['recall@1']:.3f} -> {p['recall@1']:.3f}, recall@10 {d['recall@10']:.3f} -> "
              f"{p['recall@10']:.3f}; embedding cosine vs dense {p['cosine']:.4f}")
        for k in sorted(x for x in p if x.startswith("speedup_")):
            print(f"  {k.removeprefix('speedup_')}: {p[k]:.2f}x ({p['seq_per_s_' + k.removeprefix('speedup_')]:.1f} seq/s)")
    else:
        res = vit_rows(recipes, repeats=repeats, log=log)
        d, p = res["rows"]
        print(f"Fashion-MNIST ViT ({res['task']['test_images']} test images): top-1 {d['top1']:.4f} -> {p['top1']:.4f}; "
              f"tokens per layer {p['tokens']}")
        for k in sorted(x for x in p if x.startswith("speedup_")):
            print(f"  {k.removeprefix('speedup_')}: {p[k]:.2f}x ({p['img_per_s_' + k.removeprefix('speedup_')]:.1f} img/s)")
    if out is not None:
        from prunekit.io import record, write_json

        write_json(out, record("tokens", rec, metrics=res))
        say(f"wrote {out}")

"""`prunekit` command line: thin — parse, call the API, print. Nothing imports this module."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunekit.errors import PruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune neural networks, measured honestly.")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@app.command()
def zoo() -> None:
    """List the bundled models and texts (they work offline)."""
    from prunekit.zoo import MODELS, TEXTS

    print("models:")
    for m in MODELS.values():
        print(f"  {m.name:<14} {m.description}  [package {m.package}]")
    print("  <directory>    any local Hugging Face model directory (a prunekit output too)")
    print("  <owner/name>   a Hugging Face hub id (needs a network)")
    print("texts:")
    for name, desc in TEXTS.items():
        print(f"  {name:<14} {desc}")


def _load_windows(tok, text: str, split: str, seqlen: int, windows: int | None):
    from prunekit.batches import evaluation_windows, tokenize
    from prunekit.zoo import load_text

    return evaluation_windows(tokenize(tok, load_text(text, split)), seqlen, windows, what=f"text {text!r}")


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="zoo name (smollm2-135m), model directory or hub id")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (must not exist unless --overwrite)")],
    method: Annotated[Optional[str], typer.Option(help="magnitude | wanda | sparsegpt")] = None,
    sparsity: Annotated[Optional[float], typer.Option(help="fraction of weights to zero in each layer, [0, 1)")] = None,
    pattern: Annotated[Optional[str], typer.Option(help="unstructured, or N:M (N zeros in every M), e.g. 2:4")] = None,
    scope: Annotated[Optional[str], typer.Option(help="magnitude: layer (default) or global threshold")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="fnmatch pattern of layer names to keep dense; repeatable")] = None,
    calib: Annotated[Optional[str], typer.Option(help="calibration text: shakespeare | pydoc | PATH.txt")] = None,
    calib_samples: Annotated[Optional[int], typer.Option(help="calibration sequences")] = None,
    seqlen: Annotated[Optional[int], typer.Option(help="tokens per calibration sequence")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the calibration sampling")] = None,
    blocksize: Annotated[Optional[int], typer.Option(help="SparseGPT column block")] = None,
    dampening: Annotated[Optional[float], typer.Option(help="SparseGPT dampening fraction")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML/JSON recipe; flags given here override its fields")] = None,
    eval_text: Annotated[Optional[str], typer.Option(help="text for before/after perplexity (default: the calibration text's evaluation split); 'none' skips")] = None,
    eval_windows: Annotated[int, typer.Option(help="evaluation windows of --seqlen tokens")] = 16,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
) -> None:
    """Prune MODEL and save it to --out (loads with stock transformers)."""
    from prunekit import api, io
    from prunekit.batches import calibration_batches, tokenize
    from prunekit.recipe import Recipe
    from prunekit.zoo import load_model, load_text

    fields: dict = {}
    if recipe is not None:
        fields = Recipe.from_file(recipe).model_dump(exclude_unset=True)
    flags = {"method": method, "sparsity": sparsity, "pattern": pattern, "scope": scope, "blocksize": blocksize, "dampening": dampening}
    fields.update({k: v for k, v in flags.items() if v is not None})
    if exclude:
        fields["exclude"] = list(exclude)
    cal = dict(fields.get("calibration", {}))
    cal.update({k: v for k, v in {"text": calib, "samples": calib_samples, "seqlen": seqlen, "seed": seed}.items() if v is not None})
    if cal:
        fields["calibration"] = cal
    rec = Recipe.make(**fields)
    if eval_windows <= 0:
        raise PruneError(f"--eval-windows must be positive, got {eval_windows}.")
    io.check_output(out, overwrite)

    t0 = time.perf_counter()
    _say(f"loading {model} ...")
    m, tok = load_model(model)
    times = {"load_s": time.perf_counter() - t0}

    c = rec.calibration
    batches = None
    if rec.needs_data:
        batches = calibration_batches(
            tokenize(tok, load_text(c.text, "calibration")), c.samples, c.seqlen, c.seed, what=f"text {c.text!r}"
        )
    ev_text = c.text if eval_text is None else eval_text
    windows = None if ev_text == "none" else _load_windows(tok, ev_text, "evaluation", c.seqlen, eval_windows)

    metrics = {}
    if windows is not None:
        t0 = time.perf_counter()
        _say(f"dense perplexity on {ev_text} ({windows.shape[0]} x {windows.shape[1]} tokens) ...")
        metrics["perplexity_dense"] = api.evaluate(m, windows)["perplexity"]
        times["eval_dense_s"] = time.perf_counter() - t0

    _say(f"pruning with {rec.method} ({rec.pattern}, sparsity {rec.sparsity:g}) ...")
    m, rep = api.prune(m, rec, batches, device=device)
    if windows is not None:
        t0 = time.perf_counter()
        metrics["perplexity"] = api.evaluate(m, windows)["perplexity"]
        times["eval_s"] = time.perf_counter() - t0
    rep.times = {**times, **rep.times}
    rep.metrics = metrics
    rep.source = model

    manifest = {"source": model, **rep.to_dict()}
    io.save(m, tok, out, manifest, overwrite=overwrite)
    for line in rep.lines():
        print(line)
    if windows is not None:
        print(f"perplexity  dense {metrics['perplexity_dense']:.2f}  ->  pruned {metrics['perplexity']:.2f}  ({ev_text}, evaluation split)")
    print(f"saved {out}  (load with transformers.AutoModelForCausalLM.from_pretrained('{out}'))")


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="zoo name, model directory (e.g. a prunekit output) or hub id")],
    text: Annotated[str, typer.Option(help="shakespeare | pydoc | PATH.txt (its evaluation split)")] = "shakespeare",
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 256,
    windows: Annotated[int, typer.Option(help="number of non-overlapping windows (from the start)")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Perplexity of MODEL on the evaluation split of TEXT, with its sparsity and size."""
    from prunekit import api, io
    from prunekit.zoo import load_model

    if seqlen <= 0 or windows <= 0:
        raise PruneError("--seqlen and --windows must be positive integers.")
    m, tok = load_model(model)
    w = _load_windows(tok, text, "evaluation", seqlen, windows)
    t0 = time.perf_counter()
    res = api.evaluate(m, w, progress=True)
    res["eval_s"] = time.perf_counter() - t0
    res.update({"text": text, "windows": int(w.shape[0]), "seqlen": seqlen})
    man = io.read_manifest(model) if Path(model).is_dir() else None
    if man:
        res["recipe"] = man.get("recipe")
    if as_json:
        print(json.dumps(res, indent=2))
        return
    print(f"{model}: perplexity {res['perplexity']:.3f} on {text} ({res['windows']} x {seqlen} tokens)")
    print(f"sparsity of block linear layers {res['sparsity']:.4f}  params {res['params']:,}  non-zeros {res['nonzeros']:,}")
    if man:
        r = man.get("recipe", {})
        print(f"pruned by prunekit: {r.get('method')} {r.get('pattern')} sparsity {r.get('sparsity')}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except PruneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # usage errors of typer's (vendored) click: print them as click would, exit 2
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code if isinstance(e.exit_code, int) else 2)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise

if __name__ == "__main__":
    main()

"""Save and load pruned models: ``save_pretrained`` safetensors + tokenizer + ``prunekit.json``.

The output loads with stock ``AutoModelForCausalLM.from_pretrained(out)``; the zeros are in the weights.
Writing goes to a temporary sibling directory that is renamed into place at the end, so an interrupted or
failed save never leaves a half-written result.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prunekit.errors import PruneError

MANIFEST = "prunekit.json"


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) when ``out`` exists and ``overwrite`` is not set."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise PruneError(f"Output {out} already exists; choose another --out or pass --overwrite.")
    if out.exists() and not out.is_dir():
        raise PruneError(f"Output {out} is a file; give a directory path for --out.")
    return out


def _versions() -> dict:
    import torch
    import transformers

    from prunekit import __version__

    return {
        "prunekit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def save(model, tokenizer, out: str | Path, manifest: dict | None = None, overwrite: bool = False) -> Path:
    out = check_output(out, overwrite)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if getattr(getattr(model, "config", None), "prunekit_layer_sizes", None) is not None:
            from prunekit.structure.saved import mark_config_file

            mark_config_file(tmp)  # per-layer sizes: stock loaders must refuse it, prunekit.load rebuilds it
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        data = {"versions": _versions(), **(manifest or {})}
        (tmp / MANIFEST).write_text(json.dumps(data, indent=2, default=str))
    return out


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out`` (an existing one is moved
    aside first, then deleted), on any exception (Ctrl-C included) it is removed and ``out`` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(path: str | Path) -> dict | None:
    p = Path(path) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def load(path: str | Path):
    """``(model, tokenizer, manifest)`` from a directory written by :func:`save` (or any HF directory).

    A structured-pruning output whose layers differ in size (``prunekit_layer_sizes`` in its config.json) is
    rebuilt layer by layer (stock ``from_pretrained`` cannot build it).
    """
    model, tok = load_any(path)
    return model, tok, read_manifest(path)


def load_any(name_or_path: str | Path):
    """``(model, tokenizer)`` like ``zoo.load_model``, and also for per-layer-sized structured outputs."""
    from prunekit.structure.saved import is_structured_dir, load_structured
    from prunekit.zoo.models import load_model

    if Path(name_or_path).is_dir() and is_structured_dir(name_or_path):
        return load_structured(name_or_path)
    return load_model(str(name_or_path))

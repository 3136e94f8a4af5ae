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
from dataclasses import dataclass
from pathlib import Path

from prunekit.errors import PruneError

MANIFEST = "prunekit.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(out: Path, what: str = "--out") -> None:
    """``out`` (which need not exist) can be created: its nearest existing ancestor is a directory we may write."""
    anc = _nearest_existing(out.parent)  # the output is written beside its final place, then renamed
    if not anc.is_dir():
        raise PruneError(f"Cannot create {what} {out}: {anc} is a file, not a directory.")
    try:
        probe = tempfile.mkdtemp(prefix=".prunekit-probe-", dir=anc)
    except OSError as e:
        raise PruneError(f"Cannot write {what} {out}: {anc} is not writable ({e.strerror or e}).") from None
    os.rmdir(probe)


def is_prunekit_output(p: Path) -> bool:
    return (p / MANIFEST).is_file()


def check_output(out: str | Path, overwrite: bool, inputs: tuple | list = ()) -> Path:
    """Fail early (before any work) when ``out`` cannot or must not be written.

    Refused: an existing ``out`` without ``overwrite``; a file; with ``overwrite``, a non-empty directory that
    prunekit did not write (no ``prunekit.json``); the current directory or one above it; any of ``inputs``
    (or a directory holding one); a place that cannot be written.
    """
    out = Path(out)
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise PruneError(f"--out {out} is the current directory or one above it; write to a new directory.")
    for inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        ip = Path(inp).resolve()
        if ip == resolved or resolved in ip.parents:
            raise PruneError(f"--out {out} is (or holds) the input {inp}; write the result to another directory.")
    if out.exists():
        if not overwrite:
            raise PruneError(f"Output {out} already exists; choose another --out or pass --overwrite.")
        if not out.is_dir():
            raise PruneError(f"Output {out} is a file; give a directory path for --out.")
        if any(out.iterdir()) and not is_prunekit_output(out):
            raise PruneError(
                f"Output {out} is a directory prunekit did not write (no {MANIFEST}); --overwrite only replaces "
                "prunekit outputs, so choose another --out."
            )
    check_writable(out)
    return out


def check_output_file(out: str | Path, overwrite: bool, suffix: str, is_ours=None) -> Path:
    """Like :func:`check_output` for a single output file with ``suffix``; ``is_ours(path)`` says whether an
    existing file was written by prunekit (only those are overwritten)."""
    out = Path(out)
    if out.suffix != suffix:
        raise PruneError(f"--out must end in {suffix}, got {out.name}.")
    if out.is_dir():
        raise PruneError(f"--out {out} is a directory; give a {suffix} file path.")
    if out.exists():
        if not overwrite:
            raise PruneError(f"Output {out} already exists; choose another --out or pass --overwrite.")
        if is_ours is not None and not is_ours(out):
            raise PruneError(f"Output {out} is not a file prunekit wrote; --overwrite only replaces prunekit outputs.")
    check_writable(out)
    return out


def _finite_json(obj):
    """JSON-ready copy: non-finite floats become None (``prunekit.json`` stays valid JSON)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    try:  # numpy / torch scalars
        return _finite_json(obj.item())
    except (AttributeError, ValueError):
        return str(obj)


def dumps(obj, indent: int | None = 2) -> str:
    """Strict JSON (never a bare NaN or Infinity)."""
    return json.dumps(_finite_json(obj), indent=indent, allow_nan=False)


def _versions() -> dict:
    import sys

    import torch

    from prunekit import __version__

    out = {"prunekit": __version__, "torch": torch.__version__, "python": platform.python_version()}
    if "transformers" in sys.modules:  # only what the run used: a data run does not import transformers
        out["transformers"] = sys.modules["transformers"].__version__
    return out


SCHEMA = 1
RUN_KINDS = ("llm", "vision", "data-score", "data-subset", "data-train", "tokens", "context", "context-scorer",
             "diffusion")


def record(kind: str, recipe: dict | None = None, *, metrics: dict | None = None, timings: dict | None = None,
           layers=None, **extra) -> dict:
    """The ``prunekit.json`` every command writes (also the metadata of data files): ``schema``, ``kind`` (one of
    :data:`RUN_KINDS`), ``recipe`` (what was actually used), ``versions``, ``metrics``, ``timings`` (seconds),
    ``layers`` (the per-layer table: one row per layer, ``name`` first) and the family's own fields.

    ``layers`` may be a list of rows or a ``{name: {field: value}}`` mapping. A manifest of an earlier release
    (``times`` instead of ``timings``, ``layers`` as a mapping) is read as this schema."""
    if kind not in RUN_KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    if "times" in extra:
        timings = {**extra.pop("times"), **(timings or {})}
    if isinstance(layers, dict):
        layers = [{"name": k, **v} for k, v in layers.items()]
    extra.pop("schema", None)
    extra.pop("versions", None)
    return {"schema": SCHEMA, "kind": kind, "recipe": recipe or {}, "versions": _versions(), "metrics": metrics or {},
            "timings": timings or {}, "layers": layers or [], **extra}


def atomic_file(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path``, then move it into place: a file is never left
    half-written (on any exception the temporary is removed and ``path`` is untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | Path, obj) -> Path:
    """Strict JSON written atomically."""
    return atomic_file(path, lambda t: Path(t).write_text(dumps(obj)))


def save(model, tokenizer, out: str | Path, manifest: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (+ tokenizer + ``prunekit.json``) to ``out`` atomically; weights must be finite."""
    from prunekit.checks import check_finite

    out = check_output(out, overwrite)
    check_finite(model, "The model to save")
    with atomic_dir(out) as tmp:
        cfg = getattr(model, "config", None)
        if getattr(cfg, "prunekit_expert_counts", None) is not None:
            # expert counts that differ per layer: the fused expert tensors are written as they are (transformers
            # would split them into its legacy per-expert names, which only a stock-sized model reads back)
            had = "_weight_conversions" in model.__dict__
            old = model.__dict__.get("_weight_conversions")
            model._weight_conversions = []
            try:
                model.save_pretrained(tmp, safe_serialization=True)
            finally:
                if had:
                    model._weight_conversions = old
                else:
                    del model._weight_conversions
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if getattr(cfg, "prunekit_layer_sizes", None) is not None or getattr(cfg, "prunekit_expert_counts", None) is not None:
            from prunekit.structure.saved import mark_config_file

            mark_config_file(tmp)  # per-layer sizes or expert counts: stock loaders must refuse it, prunekit.load rebuilds it
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        man = dict(manifest or {})
        (tmp / MANIFEST).write_text(dumps(record(man.pop("kind", "llm"), man.pop("recipe", None),
                                                 metrics=man.pop("metrics", None), timings=man.pop("timings", None),
                                                 layers=man.pop("layers", None), **man)))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, name: str) -> None:
    """Remove ``.{name}.tmp-<pid>-*`` / ``.{name}.old-<pid>-*`` left by runs that were killed (their pid is gone)."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if not p.name.startswith(f".{name}."):
            continue
        kind, _, rest = p.name[len(name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out`` (an existing one is moved
    aside first, then deleted), on any exception (Ctrl-C included) it is removed and ``out`` is untouched.

    The directory gets the permissions the umask gives (not ``mkdtemp``'s 0700). Temporary siblings left by a
    killed run are removed on the next write to the same place.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
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
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PruneError(f"{p} is not valid JSON; the directory is not an intact prunekit output.") from None
    if not isinstance(data, dict):
        raise PruneError(f"{p} must hold a JSON object; the directory is not an intact prunekit output.")
    return data


@dataclass
class Run:
    """What :func:`load` opened. ``kind``: ``llm`` (a model directory), ``vision`` (a train-prune run directory),
    ``data-score`` / ``data-subset`` (a Parquet file of ``prunekit data``), ``tokens`` (a model saved patched by
    ``prunekit.tokens.save``), ``context-scorer`` (the cross-encoder of ``prunekit context train``: ``model`` is
    a ``CrossScorer``). Unpacking gives ``(model, tokenizer, manifest)`` for an LLM, ``(model, masks,
    manifest)`` for a vision run, ``(model, handle, manifest)`` for tokens, ``(columns, None, metadata)`` for data."""

    kind: str
    manifest: dict | None
    model: object = None
    tokenizer: object = None
    masks: object = None
    columns: dict | None = None
    handle: object = None  # tokens: the prunekit.tokens handle re-applied on load

    def __iter__(self):
        if self.kind == "tokens":
            return iter((self.model, self.handle, self.manifest))
        if self.kind == "llm":
            return iter((self.model, self.tokenizer, self.manifest))
        if self.kind == "vision":
            return iter((self.model, self.masks, self.manifest))
        return iter((self.columns, None, self.manifest))

    def __getitem__(self, i):
        return tuple(self)[i]

    def __len__(self):
        return 3


def load(path: str | Path, trust_remote_code: bool = False) -> Run:
    """Open any prunekit output: an LLM model directory written by :func:`save` (or any Hugging Face directory;
    per-layer-sized structured outputs are rebuilt), a vision run directory of ``prunekit train-prune``, a
    score / subset file of ``prunekit data``, or a model saved by ``prunekit.tokens.save`` (patched again)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".parquet":
        from prunekit.data.files import _read

        for kind in ("score", "subset"):
            try:
                cols, meta = _read(p, kind)
                return Run(f"data-{kind}", meta, columns=cols)
            except PruneError:
                continue
        raise PruneError(f"{p} is not a score or subset file of prunekit data.")
    manifest = read_manifest(p) if p.is_dir() else None
    if manifest is not None and manifest.get("kind") in ("vision", "prunekit-vision"):  # the latter: before schema 1
        from prunekit.vision.train import load_run

        model, masks, manifest = load_run(p)
        return Run("vision", manifest, model=model, masks=masks)
    if manifest is not None and manifest.get("kind") == "context-scorer":
        from prunekit.context.scorers import CrossScorer

        return Run("context-scorer", manifest, model=CrossScorer.load(p))
    if manifest is not None and manifest.get("kind") == "tokens":
        from prunekit.tokens import load as load_tokens

        model, handle = load_tokens(p)
        return Run("tokens", manifest, model=model, handle=handle)
    model, tok = load_any(path, trust_remote_code)
    return Run("llm", manifest, model=model, tokenizer=tok)


def load_any(name_or_path: str | Path, trust_remote_code: bool = False):
    """``(model, tokenizer)`` like ``zoo.load_model``, and also for per-layer-sized structured outputs.

    A local directory is checked first (no code of its own unless ``trust_remote_code``, valid config, safetensors
    weights that are complete, a tokenizer), so a broken one is one sentence naming the file.
    """
    from prunekit.structure.saved import is_structured_dir, load_structured
    from prunekit.zoo.models import check_model_dir, load_model, resolve_model

    where = resolve_model(str(name_or_path))
    if Path(where).is_dir():
        check_model_dir(where, trust_remote_code)
        if is_structured_dir(where):
            return load_structured(where)
        from prunekit.stream.export import is_sparse_compressed, load_compressed

        if is_sparse_compressed(json.loads((Path(where) / "config.json").read_text())):
            return load_compressed(where)
    return load_model(str(name_or_path), trust_remote_code=trust_remote_code)

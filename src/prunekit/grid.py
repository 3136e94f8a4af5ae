"""Benchmark grids (``prunekit bench GRID.yaml``): many LLM pruning runs from one file, side by side.

A grid file (YAML/JSON, :class:`Grid`) names a ``model``, a ``base`` (a partial recipe every run shares), ``axes``
(recipe field -> list of values; the runs are their cartesian product) and ``runs`` (more partial recipes, appended
after the product), plus the evaluation every run gets: perplexity / agreement / generations (``evaluation``), task
scores (``tasks``), measured speed (``speed``).

Every entry is validated before anything runs (:func:`expand`: a mistake is one sentence naming the entry); the
same recipe twice is run once. Each run is :func:`prunekit.api.prune_run` (what ``prunekit prune`` does) into
``OUT/<name>``, then its tasks (:func:`prunekit.evaluate.tasks.run_tasks`) and speed; a run that raises is recorded
there as a failed run (``"status": "failed"``, ``"error"``) and the grid goes on. ``OUT/grid.json`` and
``OUT/grid.md`` hold one row per run, ``OUT/report.html`` the report (:mod:`prunekit.evaluate.html_report`).

Engines: ``local`` runs one entry at a time in this process; ``ray`` makes each entry one Ray task
(``num_cpus = threads``) and collects the rows in grid order. Both run :func:`run_entry` with the same torch
thread count, so the same seeds give the same numbers. A run directory whose run is complete is skipped on the
next call (resume) unless ``overwrite``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from prunekit.core.config import Config, read_mapping
from prunekit.errors import PruneError
from prunekit.recipe import (Allocation, Calibration, Count, Distill, Experts, PositiveInt, Recipe, Recovery,
                             Structure, parse_pattern)

GRID_JSON = "grid.json"
GRID_MD = "grid.md"
REPORT = "report.html"
SCHEMA = 1

SECTIONS = {"allocation": Allocation, "calibration": Calibration, "recovery": Recovery, "structure": Structure,
            "experts": Experts, "distill": Distill}
OPTIONAL = ("recovery", "structure", "experts", "distill")  # sections a run may leave out ("none" / null)
SHORTHAND = {"allocation": "kind", "recovery": "method", "experts": "method"}  # `owl` = {kind: owl}, `lora` = {method: lora}


def _one_line(x) -> str:
    return " ".join(str(x).split())


class Evaluation(Config):
    """How every run of a grid is evaluated (the ``prunekit prune`` flags of the same names)."""

    what = "grid evaluation"
    text: str | None = Field(None, description="--eval-text: the text whose evaluation split is scored (default: "
                             "the calibration text's; after recovery the training text's); 'none' skips")
    windows: PositiveInt = Field(16, description="--eval-windows: evaluation windows of calibration.seqlen tokens")
    generations: Count = Field(3, description="--generations: greedy generations dense vs pruned")
    ood_text: str | None = Field(None, description="--ood-text: after recovery or distillation, a text the training "
                                 "never saw (default: pydoc after shakespeare, else shakespeare); 'none' skips")


class Grid(Config):
    """A benchmark grid: the runs are ``base`` + each combination of ``axes`` (their cartesian product), then
    ``base`` + each entry of ``runs``."""

    what = "grid"
    model: str = Field(description="zoo name (smollm2-135m), model directory or hub id; every run prunes it")
    out: str | None = Field(None, description="the grid's directory (--out overrides it)")
    base: dict = Field(default_factory=dict, description="a partial LLM recipe every run shares (calibration, ...)")
    axes: dict[str, list] = Field(default_factory=dict, description="recipe field (or section.field) -> the values "
                                  "it takes; the runs are the cartesian product")
    runs: list[dict] = Field(default_factory=list, description="more partial recipes (merged over base), run after "
                             "the product; 'name' sets a run's directory name")
    evaluation: Evaluation = Field(default_factory=Evaluation)
    tasks: list[str] = Field(default_factory=list, description="task names for the lm-evaluation-harness "
                             "(prunekit.evaluate.tasks): scores in metrics.tasks")
    task_limit: float | None = Field(None, description="at most this many documents per task (a fraction when < 1)")
    speed: bool = Field(False, description="measure prefill tokens/s of the pruned and the dense model "
                        "(metrics.tokens_per_s, tokens_per_s_dense)")
    keep_models: bool = Field(True, description="false: delete each run's weights once it is evaluated "
                              "(prunekit.json, config and tokenizer stay)")
    threads: PositiveInt | None = Field(None, description="torch threads per run (default: this process's); Ray "
                                        "gives each run as many CPUs")
    device: str = Field("cpu", description="cpu or cuda")

    @field_validator("axes")
    @classmethod
    def _axes_known(cls, v: dict) -> dict:
        for key, values in v.items():
            if not values:
                raise ValueError(f"axis {key!r} has no values; give a list of one or more")
            head, _, sub = key.partition(".")
            if head not in Recipe.model_fields:
                raise ValueError(f"axis {key!r} is not a recipe field ({', '.join(Recipe.model_fields)})")
            if sub:
                model = SECTIONS.get(head)
                if head != "options" and model is None:
                    raise ValueError(f"axis {key!r}: {head} is not a section (give {head}: [...])")
                if model is not None and sub not in model.model_fields:
                    raise ValueError(f"axis {key!r}: {sub!r} is not a field of {head} ({', '.join(model.model_fields)})")
        return v

    @field_validator("task_limit")
    @classmethod
    def _limit(cls, v):
        if v is not None and not v > 0:
            raise ValueError(f"must be positive, got {v}")
        return int(v) if v is not None and v >= 1 and float(v).is_integer() else v

    @model_validator(mode="after")
    def _run_names(self) -> Grid:
        names = set()
        for i, r in enumerate(self.runs):
            name = r.get("name")
            if name is not None and (not isinstance(name, str) or not name or _safe(name) != name):
                raise ValueError(f"runs[{i}] name {name!r} must be a plain directory name (letters, digits, . _ -)")
            if name in names:
                raise ValueError(f"runs[{i}] name {name!r} is given twice")
            if name is not None:
                names.add(name)
        return self


def load_grid(path: str | Path) -> Grid:
    """The grid in a YAML/JSON file (the one recipe-file reader), validated; one sentence on a mistake."""
    return Grid.make(**read_mapping(path, "Grid file"))


# ---------------------------------------------------------------------------------------------------- entries


@dataclass
class Entry:
    """One run of a grid: ``index`` (1-based, in file order: the product, then ``runs``), ``fields`` (what this entry
    sets: its axis values or its ``runs`` item), ``recipe`` (validated), ``name`` (its directory under OUT)."""

    index: int
    fields: dict
    recipe: Recipe
    name: str = ""
    where: str = ""  # how messages name it: "grid entry 3 (method=wanda, sparsity=0.5)"
    shown: dict = field(default_factory=dict)  # the fields its name is made of
    from_runs: bool = False  # an item of the grid's runs (not of the product)


def _merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``: nested mappings merged, anything else replaced."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _value(key: str, v):
    """An axis value as a recipe value: ``none`` / null drops an optional section, a word stands for a section's
    kind or method (``allocation: owl``, ``recovery: lora``)."""
    if key in OPTIONAL and (v is None or (isinstance(v, str) and v.lower() == "none")):
        return None
    if key in SHORTHAND and isinstance(v, str):
        return {SHORTHAND[key]: v}
    return v


def _apply(request: dict, key: str, v) -> dict:
    head, _, sub = key.partition(".")
    if sub:
        return _merge(request, {head: {sub: v}})
    return _merge(request, {head: _value(head, v)})


def _flow(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(", ", ": "), default=str)
    return str(v) if v is not None else "none"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:80]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:6]


def _g(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _token(key: str, v) -> str:
    """The part of a run's name that says ``key: v`` (e.g. method wanda -> ``wanda``, sparsity 0.5 -> ``s0.5``,
    pattern 2:4 -> ``2of4``, allocation owl -> ``owl``, recovery none -> nothing)."""
    head, _, sub = key.partition(".")
    leaf = sub or head
    if key == "sparsity" and isinstance(v, (int, float)):
        return f"s{v:g}"
    if key == "pattern" and isinstance(v, str):
        try:
            nm = parse_pattern(v)
        except PruneError:
            return v
        return "" if nm is None else f"{nm[0]}of{nm[1]}"
    if not sub and head in SECTIONS:
        v = _value(head, v)
        if v is None:
            return ""
        if isinstance(v, dict):
            lead = v.get(SHORTHAND.get(head, ""), "")
            rest = [f"{k}{_g(x)}" for k, x in v.items() if k != SHORTHAND.get(head) and isinstance(x, (int, float, str))
                    and not isinstance(x, bool)]
            return "-".join(([str(lead)] if lead else []) + rest[:2]) or head  # the same name twice gets -2
    if isinstance(v, bool):
        return f"{leaf}-{'on' if v else 'off'}"
    if isinstance(v, (int, float)):
        return f"{leaf}{v:g}"
    if isinstance(v, str):
        return v if key in ("method",) else f"{leaf}-{v}" if sub else v
    if v is None:
        return f"no-{leaf}"
    return f"{leaf}-{_hash(v)}"


def _check_keys(d: dict, where: str) -> None:
    unknown = [k for k in d if k not in Recipe.model_fields]
    if unknown:
        raise PruneError(f"{where}: unknown recipe field {unknown[0]!r}; a recipe takes {', '.join(Recipe.model_fields)}.")


def expand(grid: Grid, notes: list[str] | None = None) -> list[Entry]:
    """Every run of ``grid``, validated, in order, each with its directory name; the first mistake is a
    :class:`PruneError` naming the entry (``grid entry 3 (method=wandaa, sparsity=0.5): ...``). A recipe that equals
    an earlier entry's is dropped (a note in ``notes``). In product entries with an N:M pattern, the sparsity and
    allocation do not apply (N:M fixes every layer at N/M): they are left out, so such entries collapse into one."""
    notes = notes if notes is not None else []
    _check_keys(grid.base, "grid base")
    raw: list[tuple[dict, str | None, str]] = []  # (fields, explicit name, origin: "" or "runs[i]")
    keys = list(grid.axes)
    if keys:
        for combo in itertools.product(*grid.axes.values()):
            fields = dict(zip(keys, combo))
            raw.append((fields, None, ""))
    elif not grid.runs:
        raw.append(({}, None, ""))
    for i, r in enumerate(grid.runs):
        r = dict(r)
        name = r.pop("name", None)
        _check_keys(r, f"grid runs[{i}]")
        raw.append((r, name, f"runs[{i}]"))

    entries: list[Entry] = []
    explicit: dict[int, str] = {}
    seen: dict[str, Entry] = {}
    dups: list[tuple[str, Entry]] = []
    for n, (fields, name, origin) in enumerate(raw, 1):
        desc = ", ".join(f"{k}={_flow(v)}" for k, v in fields.items())
        where = f"grid entry {n} ({(origin + ': ') if origin else ''}{desc or 'base'})"
        request = copy.deepcopy(grid.base)
        for k, v in fields.items():
            request = _apply(request, k, v)
        shown = dict(fields)
        if not origin:  # a product entry
            try:
                nm = parse_pattern(str(request.get("pattern", "unstructured")))
            except PruneError as e:
                raise PruneError(f"{where}: {e}") from None
            if nm is not None:  # N:M fixes the sparsity of every layer
                for k in ("sparsity", "allocation"):
                    request.pop(k, None)
                shown = {k: v for k, v in shown.items() if k.partition(".")[0] not in ("sparsity", "allocation")}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # old spellings are said once, when the run starts
                recipe = Recipe.make(**request)
        except PruneError as e:
            raise PruneError(f"{where}: {e}") from None
        key = json.dumps(recipe.model_dump(), sort_keys=True, default=str)
        if key in seen:
            dups.append((where, seen[key]))
            continue
        e = Entry(n, fields, recipe, where=where, shown=shown, from_runs=bool(origin))
        seen[key] = e
        if name:
            explicit[id(e)] = name
        entries.append(e)
    _name(entries, explicit, grid.axes)
    notes += [f"{where} is the same run as grid entry {e.index} ({e.name}); it is run once" for where, e in dups]
    return entries


def _name(entries: list[Entry], explicit: dict[int, str], axes: dict) -> None:
    """A stable, readable directory name per entry from the fields that vary (``wanda-s0.5``, ``sparsegpt-2of4``);
    the same name twice gets ``-2``, ``-3``."""
    varying = {k for k, vals in axes.items() if len(vals) > 1}
    taken: set[str] = set(explicit.values())
    for e in entries:
        if id(e) in explicit:
            e.name = explicit[id(e)]
            continue
        keys = [k for k in e.shown if e.from_runs or k in varying]
        base = _safe("-".join(t for t in (_token(k, e.shown[k]) for k in keys) if t))
        if not base:  # nothing varies: the method and sparsity say what it is
            r = e.recipe
            base = _safe(f"{r.method}-" + (f"{r.nm[0]}of{r.nm[1]}" if r.nm else f"s{r.sparsity:g}"))
        name, k = base, 2
        while name in taken:
            name, k = f"{base}-{k}", k + 1
        taken.add(name)
        e.name = name


# ---------------------------------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What :func:`run_grid` will do: ``entries`` (validated, named), ``todo`` (their indices to run), ``done``
    (index -> the ``prunekit.json`` of a complete earlier run, skipped), ``notes`` (dropped duplicates)."""

    grid: Grid
    out: Path
    entries: list[Entry]
    todo: list[int]
    done: dict[int, dict]
    notes: list[str]
    threads: int
    fingerprints: list[str]


def fingerprint(grid: Grid, entry: Entry) -> str:
    """What a run's numbers depend on: the model, the recipe, the evaluation, tasks and speed settings. A complete
    run directory with another fingerprint was made by another grid entry."""
    from prunekit.zoo.models import MODELS

    model = grid.model if grid.model in MODELS or not Path(grid.model).is_dir() else str(Path(grid.model).resolve())
    what = {"model": model, "recipe": entry.recipe.model_dump(), "evaluation": grid.evaluation.model_dump(),
            "tasks": grid.tasks, "task_limit": grid.task_limit, "speed": grid.speed}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _complete(man: dict | None) -> bool:
    return bool(man) and man.get("status") == "ok" and bool((man.get("grid") or {}).get("done"))


def _check_out(out: Path, model: str) -> None:
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise PruneError(f"--out {out} is the current directory or one above it; give the grid its own directory.")
    mp = Path(model)
    if mp.exists() and (mp.resolve() == resolved or resolved in mp.resolve().parents or mp.resolve() in resolved.parents):
        raise PruneError(f"--out {out} is, holds or is inside the model {model}; give the grid another directory.")
    if out.exists():
        if not out.is_dir():
            raise PruneError(f"--out {out} is a file; give a directory for the grid.")
        if any(out.iterdir()) and not (out / GRID_JSON).is_file():
            raise PruneError(f"--out {out} is a directory prunekit bench did not write (no {GRID_JSON}); choose another "
                             "--out.")
    from prunekit.io import check_writable

    check_writable(out)


def _check_texts(grid: Grid, entries: list[Entry]) -> None:
    from prunekit.zoo import load_text

    checked: set = set()

    def need(text, split, e, what):
        if text is None or text == "none" or (text, split) in checked:
            return
        try:
            load_text(text, split)
        except PruneError as err:
            raise PruneError(f"{e.where}: {what}: {err}") from None
        checked.add((text, split))

    ev = grid.evaluation
    for e in entries:
        r = e.recipe
        if r.needs_data:
            need(r.calibration.text, "calibration", e, "calibration text")
        train = r.recovery.text if r.recovery is not None else r.distill.text if r.distill is not None else None
        need(train, "calibration", e, "training text")
        ev_text = ev.text if ev.text is not None else (train or r.calibration.text)
        need(ev_text, "evaluation", e, "evaluation text")
        if train is not None:
            need(ev.ood_text, "evaluation", e, "out-of-domain text")


def plan(grid: Grid, out: str | Path | None = None, *, overwrite: bool = False, engine: str = "local",
         notes: list[str] | None = None) -> Plan:
    """Validate everything before any work (one sentence on a mistake, nothing written): the entries and their
    texts, the model, the device, the tasks, ``out`` (a new directory or one this command wrote) and each run
    directory (a complete run of the same entry is skipped unless ``overwrite``; one of another entry is refused)."""
    import torch

    from prunekit import io
    from prunekit.zoo.models import resolve_model

    if engine not in ("local", "ray"):
        raise PruneError(f"Unknown engine {engine!r}; use local or ray.")
    out = Path(out) if out is not None else Path(grid.out) if grid.out else None
    if out is None:
        raise PruneError("Give the grid's directory: --out DIR, or out: in the grid file.")
    notes = notes if notes is not None else []
    entries = expand(grid, notes)
    resolve_model(grid.model)
    if engine == "local":
        from prunekit.checks import check_device

        check_device(grid.device)
    _check_texts(grid, entries)
    if grid.tasks:
        from prunekit.evaluate.tasks import parse_tasks, task_manager

        try:
            task_manager(parse_tasks(grid.tasks))  # an unknown task fails here; the task folder is built once
        except PruneError as e:
            raise PruneError(f"grid tasks: {e}") from None
    _check_out(out, grid.model)
    prints = [fingerprint(grid, e) for e in entries]
    todo, done = [], {}
    for i, e in enumerate(entries):
        d = out / e.name
        if not d.exists():
            todo.append(i)
            continue
        if not d.is_dir() or (any(d.iterdir()) and not io.is_prunekit_output(d)):
            raise PruneError(f"{d} is in the way of grid entry {e.index} ({e.name}) and prunekit did not write it; "
                             "move it or choose another --out.")
        man = io.read_manifest(d)
        info = (man or {}).get("grid")
        same = isinstance(info, dict) and info.get("fingerprint") == prints[i]
        if _complete(man) and not overwrite:
            if not same:
                raise PruneError(f"{d} holds a run of another grid entry (its model, recipe or evaluation differ from "
                                 f"grid entry {e.index}); pass --overwrite to redo it, or choose another --out.")
            done[i] = man
        else:
            todo.append(i)
    return Plan(grid, out, entries, todo, done, notes, grid.threads or torch.get_num_threads(), prints)


# ---------------------------------------------------------------------------------------------------- one run


def spec_of(plan: Plan, i: int) -> dict:
    """Everything :func:`run_entry` needs, as plain data (what a Ray task receives)."""
    g, e = plan.grid, plan.entries[i]
    return {"model": g.model, "dir": str(plan.out / e.name), "recipe": e.recipe.model_dump(),
            "evaluation": g.evaluation.model_dump(), "tasks": list(g.tasks), "task_limit": g.task_limit,
            "speed": g.speed, "keep_models": g.keep_models, "device": g.device, "threads": plan.threads,
            "grid": {"name": e.name, "entry": e.index, "fields": e.shown, "fingerprint": plan.fingerprints[i]}}


def _error_sentence(e: BaseException) -> str:
    text = _one_line(e) if isinstance(e, PruneError) else f"{type(e).__name__}: {_one_line(e)}"
    return text if len(text) <= 600 else text[:597] + "..."


def failed_record(spec: dict, error: BaseException | str, seconds: float, write: bool = True) -> dict:
    """The ``prunekit.json`` of a run that raised: ``status: failed``, ``error`` (one sentence; a bug's traceback
    beside it), written as the run directory's only file (atomically) when ``write``."""
    import traceback

    from prunekit import io

    msg = error if isinstance(error, str) else _error_sentence(error)
    extra = {}
    if isinstance(error, BaseException) and not isinstance(error, PruneError):
        extra["traceback"] = "".join(traceback.format_exception(error))[-4000:]
    man = io.record("llm", spec["recipe"], timings={"total_s": seconds}, status="failed", error=msg,
                    source=spec["model"], grid={**spec["grid"], "done": True, "seconds": seconds}, **extra)
    if write:
        with io.atomic_dir(Path(spec["dir"])) as tmp:
            (Path(tmp) / io.MANIFEST).write_text(io.dumps(man))
    return man


def _delete_weights(d: Path) -> None:
    for p in list(d.glob("*.safetensors")) + list(d.glob("*.safetensors.index.json")):
        p.unlink()


def _run(spec: dict, t0: float) -> dict:
    import torch

    from prunekit import api, io

    out = Path(spec["dir"])
    rec = Recipe.make(**spec["recipe"])
    ev = spec["evaluation"]
    torch.manual_seed(0)  # anything that draws from torch's global generator draws the same on every engine
    info = {**spec["grid"], "done": False}
    res = api.prune_run(spec["model"], out, rec, eval_text=ev["text"], eval_windows=ev["windows"],
                        generations=ev["generations"], ood_text=ev["ood_text"], device=spec["device"], overwrite=True,
                        extra={"status": "ok", "grid": info})
    m, tok = res.model, res.tokenizer
    if spec["tasks"]:
        from prunekit.evaluate.tasks import record_tasks, run_tasks

        t1 = time.perf_counter()
        scores = run_tasks(m, tok, spec["tasks"], limit=spec["task_limit"], seed=0, device=spec["device"])
        record_tasks(out, scores, {"limit": spec["task_limit"], "fewshot": None, "seed": 0})
        info["tasks_s"] = time.perf_counter() - t1
    man = io.read_manifest(out)
    if spec["speed"]:
        from prunekit.evaluate.speed import paired_prefill

        dense, _ = io.load_any(spec["model"])
        dense.to(next(m.parameters()).device)
        sp = paired_prefill(dense, m, batch=1, seqlen=rec.calibration.seqlen)
        del dense
        man["metrics"].update(tokens_per_s=sp["tokens_per_s"], tokens_per_s_dense=sp["tokens_per_s_dense"],
                              speedup=sp["speedup"],
                              speed={k: sp[k] for k in ("batch", "seqlen", "runs")} | {"threads": torch.get_num_threads()})
    if not spec["keep_models"]:
        _delete_weights(out)
        info["kept_model"] = False
    info.update(done=True, seconds=time.perf_counter() - t0)
    man["grid"] = info
    io.write_json(out / io.MANIFEST, man)
    return man


def run_entry(spec: dict) -> dict:
    """One grid run (both engines): :func:`prunekit.api.prune_run` into ``spec["dir"]``, then the tasks and the
    speed; with ``spec["threads"]`` torch threads. Returns the run's ``prunekit.json``; any exception becomes a
    failed run (its record written, returned)."""
    import gc

    import torch

    t0 = time.perf_counter()
    old = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        try:
            return _run(spec, t0)
        except Exception as e:  # noqa: BLE001  (a failed run is recorded and the grid goes on)
            try:
                return failed_record(spec, e, time.perf_counter() - t0)
            except Exception:  # noqa: BLE001  (not even the record could be written)
                return failed_record(spec, e, time.perf_counter() - t0, write=False)
    finally:
        torch.set_num_threads(old)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _ray_entry(spec: dict) -> dict:
    from prunekit.core.progress import set_quiet

    set_quiet(True)
    return run_entry(spec)


# ---------------------------------------------------------------------------------------------------- results


def row_of(entry: Entry, man: dict) -> dict:
    """One row of ``grid.json``: the run's name, the fields it sets, status, perplexity (and dense), agreement,
    achieved sparsity, task values, tokens/s, seconds, error."""
    met = man.get("metrics") if isinstance(man.get("metrics"), dict) else {}
    info = man.get("grid") if isinstance(man.get("grid"), dict) else {}
    tasks = {t: v.get("value") for t, v in (met.get("tasks") or {}).items() if isinstance(v, dict)}
    row = {"name": entry.name, "entry": entry.index, "fields": entry.shown,
           "status": "failed" if man.get("status") == "failed" else "ok",
           "perplexity": met.get("perplexity"), "perplexity_dense": met.get("perplexity_dense"),
           "agreement": met.get("agreement"), "achieved_sparsity": (man.get("summary") or {}).get("target_sparsity"),
           "tasks": tasks, "tokens_per_s": met.get("tokens_per_s"), "tokens_per_s_dense": met.get("tokens_per_s_dense"),
           "seconds": info.get("seconds"), "error": man.get("error")}
    return row


def _pending(entry: Entry) -> dict:
    return {"name": entry.name, "entry": entry.index, "fields": entry.shown, "status": "pending"}


def _cell(x, fmt: str = "") -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return format(x, fmt or ".4g")
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict], title: str = "grid") -> str:
    """``grid.md``: one table row per run (the fields that vary, status, perplexity, agreement, sparsity, tasks,
    tokens/s, seconds), then the errors of failed runs."""
    fields = list(dict.fromkeys(k for r in rows for k in (r.get("fields") or {})))
    tasks = list(dict.fromkeys(t for r in rows for t in (r.get("tasks") or {})))
    speed = any(r.get("tokens_per_s") is not None for r in rows)
    dense = next((r["perplexity_dense"] for r in rows if r.get("perplexity_dense") is not None), None)
    head = ["run", *fields, "status", "perplexity", "agreement", "achieved sparsity", *tasks]
    head += ["tokens/s", "dense tokens/s"] if speed else []
    head += ["seconds"]
    lines = [f"# {title}", ""]
    if dense is not None:
        lines += [f"dense perplexity {dense:.3f}", ""]
    lines += ["| " + " | ".join(_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = r.get("fields") or {}
        cells = [_cell(r["name"]), *[_cell(_flow(f[k])) if k in f else "" for k in fields], _cell(r["status"]),
                 _cell(r.get("perplexity"), ".3f"), _cell(r.get("agreement"), ".3f"), _cell(r.get("achieved_sparsity"), ".4f"),
                 *[_cell((r.get("tasks") or {}).get(t), ".3f") for t in tasks]]
        if speed:
            cells += [_cell(r.get("tokens_per_s"), ".0f"), _cell(r.get("tokens_per_s_dense"), ".0f")]
        cells += [_cell(r.get("seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## failed runs", ""]
        lines += [f"* {r['name']}: {_cell(r.get('error'))}" for r in failed]
    return "\n".join(lines) + "\n"


def write_results(plan: Plan, rows: list[dict], engine: str, seconds: float | None = None,
                  source: str | None = None) -> tuple[Path, Path]:
    """``grid.json`` and ``grid.md`` in the grid's directory, each written atomically."""
    from prunekit import io

    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "pending")}
    data = {"schema": SCHEMA, "kind": "grid", "file": source, "grid": plan.grid.model_dump(), "engine": engine,
            "threads": plan.threads, "notes": plan.notes, "runs": len(rows), **counts,
            "skipped": sorted(plan.entries[i].name for i in plan.done), "seconds": seconds, "rows": rows}
    j = io.write_json(plan.out / GRID_JSON, data)
    title = f"grid {Path(source).name if source else plan.out.name}: {plan.grid.model}"
    md = io.atomic_file(plan.out / GRID_MD, lambda t: Path(t).write_text(markdown(rows, title)))
    return j, md


@dataclass
class GridResult:
    """What :func:`run_grid` did: the rows (grid order), where it wrote, and the counts."""

    out: Path
    rows: list[dict]
    notes: list[str]
    json_path: Path
    md_path: Path
    report_path: Path | None
    skipped: int

    @property
    def failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.rows)

    @property
    def ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.rows)


def progress_line(k: int, n: int, row: dict, skipped: bool = False) -> str:
    """``run 3/8 wanda-s0.5: perplexity 31.20, agreement 0.812 (42 s)``."""
    head = f"run {k}/{n} {row['name']}:"
    secs = f" ({row['seconds']:.0f} s)" if isinstance(row.get("seconds"), (int, float)) else ""
    if row["status"] == "failed":
        return f"{head} failed: {row.get('error')}{secs}"
    parts = []
    if row.get("perplexity") is not None:
        parts.append(f"perplexity {row['perplexity']:.2f}")
    if row.get("agreement") is not None:
        parts.append(f"agreement {row['agreement']:.3f}")
    parts += [f"{t} {v:.3f}" for t, v in (row.get("tasks") or {}).items() if isinstance(v, (int, float))]
    if row.get("tokens_per_s") is not None:
        parts.append(f"{row['tokens_per_s']:.0f} tokens/s")
    words = ", ".join(parts) or "done"
    if skipped:
        return f"{head} done before, skipped ({words}; --overwrite redoes it)"
    return f"{head} {words}{secs}"


# ---------------------------------------------------------------------------------------------------- the grid


def _ray(address: str | None, threads: int, device: str):
    from prunekit.data.engine import RayEngine

    eng = RayEngine(address)  # local Ray (all CPUs) unless an address; one sentence on a missing Ray
    ray = eng.ray
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < threads:
        raise PruneError(f"Each run asks Ray for {threads} CPUs (threads) but the cluster has {cpus:g}; lower "
                         "threads: in the grid file.")
    gpus = 1 if device.startswith("cuda") else 0
    if gpus and ray.cluster_resources().get("GPU", 0) < 1:
        raise PruneError("The grid's device is cuda but the Ray cluster has no GPU; use device: cpu.")
    return ray, ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=0)(_ray_entry)


def run_grid(grid: Grid, out: str | Path | None = None, *, engine: str = "local", address: str | None = None,
             overwrite: bool = False, report: bool = True, source: str | Path | None = None,
             echo: Callable[[str], Any] | None = None) -> GridResult:
    """Run every entry of ``grid`` into ``out`` (default ``grid.out``): validated first (:func:`plan`; nothing is
    written on a mistake), complete runs skipped (unless ``overwrite``), the rest run locally one at a time or as
    Ray tasks (``engine="ray"``, ``address``: a cluster, else local Ray); ``grid.json`` / ``grid.md`` rewritten
    after each run; with ``report``, ``report.html`` of every run. ``echo`` gets one progress line per run."""
    from prunekit.core.progress import say

    echo = echo or say
    notes: list[str] = []
    p = plan(grid, out, overwrite=overwrite, engine=engine, notes=notes)
    ray = task = None
    if engine == "ray" and p.todo:
        ray, task = _ray(address, p.threads, grid.device)
    t_all = time.perf_counter()
    source = str(source) if source is not None else None
    n = len(p.entries)
    for note in p.notes:
        echo(f"note: {note}")
    p.out.mkdir(parents=True, exist_ok=True)
    rows = [_pending(e) for e in p.entries]
    for i, man in p.done.items():
        rows[i] = row_of(p.entries[i], man)
        echo(progress_line(i + 1, n, rows[i], skipped=True))
    write_results(p, rows, engine, None, source)

    def finished(i: int, man: dict) -> None:
        rows[i] = row_of(p.entries[i], man)
        echo(progress_line(i + 1, n, rows[i]))
        write_results(p, rows, engine, None, source)

    specs = {i: spec_of(p, i) for i in p.todo}
    if engine == "local":
        for i in p.todo:
            say(f"run {i + 1}/{n} {p.entries[i].name}: {p.entries[i].where.split('(', 1)[-1].rstrip(')')} ...")
            finished(i, run_entry(specs[i]))
    elif p.todo:
        say(f"{len(p.todo)} run(s) as Ray tasks, {p.threads} CPU(s) each ...")
        started = time.perf_counter()
        refs = {task.remote(specs[i]): i for i in p.todo}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for r in ready:
                    i = refs[r]
                    try:
                        man = ray.get(r)
                    except Exception as e:  # noqa: BLE001  (the worker died: out of memory, a lost node)
                        man = failed_record(specs[i], e, time.perf_counter() - started)
                    finished(i, man)
        except BaseException:
            for r in pending:
                ray.cancel(r, force=True)
            raise
    seconds = time.perf_counter() - t_all
    j, md = write_results(p, rows, engine, seconds, source)
    rep = None
    if report:
        from prunekit.evaluate.html_report import build_report

        title = f"grid {Path(source).stem if source else p.out.name}: {grid.model}"
        rep = build_report([p.out / e.name for e in p.entries], p.out / REPORT, title=title)
    return GridResult(p.out, rows, p.notes, j, md, rep, len(p.done))

"""`prunekit report`: one self-contained HTML page that compares runs side by side.

A run is a directory with a ``prunekit.json`` (``prunekit prune --out DIR``; the benchmark grid also writes failed
runs: ``"status": "failed"`` with an ``"error"``) or a ``sensitivity.json`` (``prunekit sensitivity --out DIR``).
The page holds a table of the runs, plots made with matplotlib (inline PNGs, ``data:image/png;base64``), the greedy
generations dense vs pruned, and each run's exact recipe as YAML with the command that re-runs it. It needs no
network: no script, no external style sheet, font or image; its Content-Security-Policy forbids anything but inline
styles and ``data:`` images. Everything taken from the files is escaped. The file is written atomically.

Task scores are read from ``metrics.tasks``: ``{task: {"metric", "value", "stderr", "n", "scores"}}``. Training-time
runs (``prunekit train-prune``, or any run whose ``summary.journey`` holds
:meth:`prunekit.core.journey.Journey.summary`) show their average parameter count over training and its curve.
"""

from __future__ import annotations

import base64
import datetime
import html
import io as _io
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from prunekit.errors import PruneError

GENERATOR = "prunekit report"  # <meta name="generator">: how --overwrite knows the file is ours
SENSITIVITY = "sensitivity.json"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
:root { --fg: #1d2330; --muted: #5c6575; --line: #dde1e8; --bg: #fff; --head: #f4f6f9; --bad: #b42318;
        --badbg: #fef3f2; --accent: #2f5fd0; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1400px; padding: 24px 28px 64px; color: var(--fg); background: var(--bg);
       font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 4px;
  border-bottom: 1px solid var(--line); } h3 { font-size: 15px; margin: 20px 0 8px; }
.meta, figcaption, .note { color: var(--muted); font-size: 13px; }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { background: var(--head); font-weight: 600; white-space: nowrap; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:last-child td, tr:last-child th { border-bottom: 0; } tbody th { white-space: nowrap; }
tr.failed td, tr.failed th { background: var(--badbg); } .error { color: var(--bad); }
figure { margin: 0 0 28px; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line);
  border-radius: 6px; }
pre, code { font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--head); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
      overflow-x: auto; white-space: pre; }
table.gen td { white-space: pre-wrap; word-break: break-word; font: 12.5px/1.45 ui-monospace, Menlo, monospace; }
table.gen td:first-child { color: var(--muted); width: 28%; }
.run { border: 1px solid var(--line); border-radius: 6px; padding: 4px 16px 12px; margin-bottom: 16px; }
"""


@dataclass
class RunData:
    """One RUN: its name (the directory's), path, ``prunekit.json`` and/or ``sensitivity.json``."""

    name: str
    path: Path
    manifest: dict | None = None
    table: dict | None = None

    @property
    def failed(self) -> bool:
        return self.manifest is not None and self.manifest.get("status") == "failed"


# ---------------------------------------------------------------------------------------------------- reading


def load_runs(run_dirs) -> list[RunData]:
    """Read every RUN; one sentence naming the RUN when it is not a run directory or its JSON is broken."""
    from prunekit.io import MANIFEST, read_manifest

    runs = []
    for d in run_dirs:
        p = Path(d)
        if not p.is_dir():
            raise PruneError(f"Run {p} is not a directory; give directories written by prunekit prune --out "
                             f"(with {MANIFEST}) or prunekit sensitivity --out (with {SENSITIVITY}).")
        has_table = (p / SENSITIVITY).is_file()
        if not (p / MANIFEST).is_file() and not has_table:
            raise PruneError(f"Run {p} has neither {MANIFEST} nor {SENSITIVITY}; give directories written by "
                             "prunekit prune --out or prunekit sensitivity --out.")
        manifest = read_manifest(p)  # not valid JSON / not an object: one sentence naming the file
        table = None
        if has_table:
            from prunekit.evaluate.sensitivity import read_table

            table = read_table(p)
            if not isinstance(table.get("units"), dict) or not all(
                    isinstance(r, dict) and isinstance(r.get("perplexity"), dict) for r in table["units"].values()):
                raise PruneError(f"{p / SENSITIVITY} is not a sensitivity table (the sensitivity.json that prunekit "
                                 "sensitivity writes).")
        runs.append(RunData(p.resolve().name or str(p), p, manifest, table))
    names = [r.name for r in runs]
    for r in runs:  # the same directory name twice (a/wanda, b/wanda): say the parent too
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    return runs


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _text(x) -> str:
    """A value from a file as display text: C0 control characters shown as their Unicode pictures."""
    s = x if isinstance(x, str) else "" if x is None else str(x)
    return "".join(chr(0x2400 + ord(c)) if ord(c) < 32 and c not in "\n\t" else "\u2421" if c == "\x7f" else c
                   for c in s)


def _e(x) -> str:
    return html.escape(_text(x), quote=True)


# ------------------------------------------------------------------------------------------------- the values


def method_of(m: dict) -> str | None:
    r = m.get("recipe") if isinstance(m.get("recipe"), dict) else {}
    if m.get("kind") == "vision" and r.get("criterion") is not None:  # train-prune: criterion and schedule
        return f"{r['criterion']} ({r.get('schedule')})"
    if isinstance(r.get("experts"), dict):
        return f"experts {_text(r['experts'].get('method'))}"
    if isinstance(r.get("structure"), dict):
        s = r["structure"]
        kinds = ",".join(map(str, s.get("kinds") or [])) or "layers"
        return f"structure {kinds}" + (f" ({s['criterion']})" if s.get("criterion") and s.get("kinds") else "")
    return None if r.get("method") is None else str(r["method"])


def pattern_of(m: dict) -> str | None:
    """``unstructured`` / ``N:M``; ``structured`` or ``experts`` for runs that remove whole units."""
    r = _get(m, "recipe") if isinstance(_get(m, "recipe"), dict) else {}
    if isinstance(r.get("experts"), dict):
        return "experts"
    if isinstance(r.get("structure"), dict):
        return "structured"
    return None if r.get("pattern") is None else str(r["pattern"])


def series_of(m: dict) -> str:
    """The line a run belongs to in the plots: its method, N:M pattern and recovery (``sparsegpt 2:4 + lora``)."""
    label = method_of(m) or "?"
    pat = pattern_of(m)
    if pat and pat not in ("unstructured", "structured", "experts"):
        label += f" {pat}"
    r = _get(m, "recipe") if isinstance(_get(m, "recipe"), dict) else {}
    rec = (_get(r, "recovery", "method") or ("distill" if isinstance(r.get("distill"), dict) else None)
           or _get(m, "recovery", "recipe", "method"))
    return label + (f" + {rec}" if rec else "")


def requested_sparsity(m: dict) -> float | None:
    r = _get(m, "recipe") or {}
    for sec in ("experts", "structure"):
        if isinstance(r.get(sec), dict) and _num(r[sec].get("sparsity")) is not None:
            return _num(r[sec]["sparsity"])
    return _num(_get(r, "sparsity"))


def achieved_sparsity(m: dict) -> float | None:
    """Of the target weights (``summary.target_sparsity``); structured: the parameters removed."""
    s = _num(_get(m, "summary", "target_sparsity"))
    if s is None and _num(_get(m, "summary", "params_ratio")) is not None:
        s = 1.0 - _num(_get(m, "summary", "params_ratio"))
    return s


def final_metrics(m: dict) -> dict:
    """Perplexity and agreement of the model this run saved: after recovery for a ``prunekit recover`` output."""
    met = _get(m, "metrics") if isinstance(_get(m, "metrics"), dict) else {}
    rec = _get(m, "recovery", "metrics")
    out = {"perplexity_dense": _num(met.get("perplexity_dense")), "perplexity": _num(met.get("perplexity")),
           "agreement": _num(met.get("agreement"))}
    if isinstance(rec, dict) and _num(rec.get("perplexity_after")) is not None:
        out.update(perplexity=_num(rec["perplexity_after"]), agreement=_num(rec.get("agreement_after")))
        if _num(rec.get("perplexity_dense")) is not None:
            out["perplexity_dense"] = _num(rec["perplexity_dense"])
    return out


def tasks_of(m: dict) -> dict[str, dict]:
    """``metrics.tasks`` entries that carry a numeric value."""
    t = _get(m, "metrics", "tasks")
    if not isinstance(t, dict):
        return {}
    return {str(k): v for k, v in t.items() if isinstance(v, dict) and _num(v.get("value")) is not None}


def _recovery_words(m: dict) -> str | None:
    r = _get(m, "recipe") or {}
    for sec, word in (("recovery", None), ("distill", "distill")):
        v = r.get(sec) if isinstance(r, dict) else None
        if isinstance(v, dict):
            return f"{word or v.get('method')}" + (f", {v['steps']} steps" if v.get("steps") is not None else "")
    v = _get(m, "recovery", "recipe")
    if isinstance(v, dict):
        return f"{v.get('method')}" + (f", {v['steps']} steps" if v.get("steps") is not None else "")
    return None


def _allocation_words(m: dict) -> str | None:
    a = _get(m, "recipe", "allocation")
    if not isinstance(a, dict) or a.get("kind") is None:
        return None
    kind = str(a["kind"])
    if kind == "global" and _num(a.get("min_density")):
        return f"global, min density {a['min_density']:g}"
    if kind == "owl" and _num(a.get("owl_lambda")) is not None:
        return f"owl (M {a.get('owl_m')}, λ {a.get('owl_lambda')})"
    return kind


def journey_of(m: dict) -> dict | None:
    """``summary.journey`` (the live-parameter count over training) when it has a numeric ``average_params``."""
    j = _get(m, "summary", "journey")
    return j if isinstance(j, dict) and _num(j.get("average_params")) is not None else None


def timings_of(m: dict) -> dict[str, float]:
    t = _get(m, "timings")
    if not isinstance(t, dict):
        t = _get(m, "times")  # before schema 1
    return {str(k): _num(v) for k, v in (t or {}).items() if _num(v) is not None}


def split_timings(t: dict[str, float]) -> tuple[float | None, float | None, float | None]:
    """(pruning ``prune_s``, training ``recovery_s`` + ``distill_s`` (+ ``train_prune_s``, a training-time run), the
    rest: loading, evaluation, writing); ``prune_*_s`` are parts of ``prune_s`` and ``total_s`` the sum, so neither
    is counted again."""
    prune = t.get("prune_s")
    training = ("recovery_s", "distill_s", "train_prune_s")
    train = [v for k, v in t.items() if k in training]
    rest = [v for k, v in t.items() if not k.startswith("prune_") and k not in training + ("total_s",)]
    return prune, (sum(train) if train else None), (sum(rest) if rest else None)


# the formats of the table (the tests read them back)
def fmt_sparsity(x: float) -> str:
    return f"{x:.4f}"


def fmt_requested(x: float) -> str:
    return f"{x:g}"


def fmt_ppl(x: float) -> str:
    return f"{x:.2f}"


def fmt_agreement(x: float) -> str:
    return f"{x:.3f}"


def fmt_task(value: float, stderr: float | None) -> str:
    return f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")


def fmt_int(x: float) -> str:
    return f"{int(x):,}"


def fmt_rate(x: float) -> str:
    return f"{x:,.1f}"


def fmt_seconds(x: float) -> str:
    return f"{x:.2f} s"


# -------------------------------------------------------------------------------------------------- the table


def _columns(runs: list[RunData]) -> tuple[list[tuple[str, str]], list[dict]]:
    """(columns ``[(key, header)]``, one row ``{key: (text, title)}`` per run with a prunekit.json)."""
    rows, task_metrics = [], {}
    for r in runs:
        if r.manifest is None:
            continue
        m = r.manifest
        for name, t in tasks_of(m).items():
            task_metrics.setdefault(name, set()).add(str(t.get("metric")))
    cols = [("run", "run"), ("method", "method"), ("pattern", "pattern"), ("requested", "sparsity requested"),
            ("achieved", "sparsity achieved"), ("allocation", "allocation"), ("recovery", "recovery"),
            ("ppl_dense", "perplexity dense"), ("ppl", "perplexity pruned"), ("agreement", "top-1 agreement")]
    for name, metrics in task_metrics.items():
        cols.append((f"task:{name}", f"{name} ({next(iter(metrics))})" if len(metrics) == 1 else name))
    cols += [("params", "parameters"), ("nonzeros", "non-zeros"), ("avg_params", "average parameters"),
             ("tps_dense", "tokens/s dense"),
             ("tps", "tokens/s pruned"), ("speedup", "speed-up"), ("prune_s", "time to prune"),
             ("train_s", "time to train"), ("other_s", "load + eval")]
    for r in runs:
        if r.manifest is None:
            continue
        m, row = r.manifest, {"run": (r.name, str(r.path))}
        row["method"] = (method_of(m), None)
        row["pattern"] = (pattern_of(m), None)
        req = requested_sparsity(m)
        row["requested"] = (None if req is None else fmt_requested(req), None)
        if r.failed:
            row["error"] = str(m.get("error") or "failed (no error recorded)")
            rows.append(row)
            continue
        ach = achieved_sparsity(m)
        row["achieved"] = (None if ach is None else fmt_sparsity(ach),
                           None if _num(_get(m, "summary", "target_sparsity")) is not None or ach is None
                           else "structured: the fraction of the model's parameters removed")
        row["allocation"] = (_allocation_words(m), None)
        row["recovery"] = (_recovery_words(m), None)
        fm = final_metrics(m)
        row["ppl_dense"] = (None if fm["perplexity_dense"] is None else fmt_ppl(fm["perplexity_dense"]), None)
        row["ppl"] = (None if fm["perplexity"] is None else fmt_ppl(fm["perplexity"]), None)
        row["agreement"] = (None if fm["agreement"] is None else fmt_agreement(fm["agreement"]), None)
        for name, t in tasks_of(m).items():
            many = len(task_metrics[name]) > 1
            title = ", ".join(f"{k} {v:.4g}" for k, v in (t.get("scores") or {}).items() if _num(v) is not None)
            if _num(t.get("n")) is not None:
                title = f"n {int(t['n'])}" + (f"; {title}" if title else "")
            row[f"task:{name}"] = (fmt_task(_num(t["value"]), _num(t.get("stderr")))
                                   + (f" {t.get('metric')}" if many else ""), title or None)
        for key, field in (("params", "params"), ("nonzeros", "nonzeros")):
            v = _num(_get(m, "summary", field))
            row[key] = (None if v is None else fmt_int(v), None)
        j = journey_of(m)
        row["avg_params"] = (None, None) if j is None else (
            fmt_int(round(_num(j["average_params"]))),
            f"live parameters averaged over {j.get('steps')} training steps; initial {j.get('initial_params')}, "
            f"final {j.get('final_params')}")
        tps, tpd = _num(_get(m, "metrics", "tokens_per_s")), _num(_get(m, "metrics", "tokens_per_s_dense"))
        row["tps"] = (None if tps is None else fmt_rate(tps), None)
        row["tps_dense"] = (None if tpd is None else fmt_rate(tpd), None)
        row["speedup"] = (f"{tps / tpd:.2f}×" if tps and tpd else None, None)
        t = timings_of(m)
        every = ", ".join(f"{k} {v:.2f}" for k, v in t.items()) or None
        for key, v in zip(("prune_s", "train_s", "other_s"), split_timings(t)):
            row[key] = (None if v is None else fmt_seconds(v), every)
        rows.append(row)
    always = {"run", "method", "pattern", "requested", "achieved"}
    cols = [(k, h) for k, h in cols if k in always or any(row.get(k, (None,))[0] is not None for row in rows)]
    return cols, rows


NUMERIC = {"requested", "achieved", "ppl_dense", "ppl", "agreement", "params", "nonzeros", "avg_params", "tps_dense",
           "tps", "speedup", "prune_s", "train_s", "other_s"}


def _table_html(runs: list[RunData]) -> str:
    cols, rows = _columns(runs)
    if not rows:
        return ""
    head = "".join(f'<th scope="col" data-key="{_e(k)}">{_e(h)}</th>' for k, h in cols)
    body = []
    lead = {"run", "method", "pattern", "requested"}  # what a failed run still shows before its error
    for row in rows:
        cells, failed = [], "error" in row
        for i, (k, _h) in enumerate(cols):
            if failed and k not in lead:
                cells.append(f'<td class="error" colspan="{len(cols) - i}">failed: {_e(row["error"])}</td>')
                break
            text, title = row.get(k, (None, None))
            cls = ' class="num"' if k in NUMERIC or k.startswith("task:") else ""
            tip = f' title="{_e(title)}"' if title else ""
            tag = "th" if k == "run" else "td"
            scope = ' scope="row"' if k == "run" else ""
            cells.append(f"<{tag}{scope}{cls}{tip}>{'' if text is None else _e(text)}</{tag}>")
        body.append(f'<tr class="{"failed" if failed else "ok"}">' + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="runs-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


# ---------------------------------------------------------------------------------------------------- the plots


def _png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # the object API: no pyplot state, renders with Agg

    return Figure(figsize=(w, h), layout="constrained")


def _colors(n: int, name: str = "tab10"):
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return [cmap(i % cmap.N) if name.startswith("tab") else cmap(i / max(n - 1, 1)) for i in range(n)]


def _by_series(runs: list[RunData]) -> dict[str, list[RunData]]:
    out: dict[str, list[RunData]] = {}
    for r in runs:
        if r.manifest is not None and not r.failed:
            out.setdefault(series_of(r.manifest), []).append(r)
    return out


def plot_quality(runs: list[RunData]) -> bytes | None:
    """Perplexity vs achieved sparsity, one line per method (and N:M pattern, recovery); the dense perplexities at
    sparsity 0."""
    series, dense = {}, set()
    for method, rs in _by_series(runs).items():
        pts = []
        for r in rs:
            fm, x = final_metrics(r.manifest), achieved_sparsity(r.manifest)
            if fm["perplexity"] is not None and x is not None:
                pts.append((x, fm["perplexity"], r.name))
            if fm["perplexity_dense"] is not None:
                dense.add(round(fm["perplexity_dense"], 6))
        if pts:
            series[method] = sorted(pts)
    if not series:
        return None
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    n_pts = sum(len(p) for p in series.values())
    for (method, pts), c in zip(series.items(), _colors(len(series))):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=c, label=_text(method), lw=1.5, ms=6)
        if n_pts <= 12:
            for x, y, name in pts:
                ax.annotate(_text(name), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7, color=c)
    if dense:
        ax.plot([0.0] * len(dense), sorted(dense), "*", color="0.35", ms=11, label="dense")
    ys = [p[1] for pts in series.values() for p in pts] + list(dense)
    if min(ys) > 0 and max(ys) / min(ys) > 10:
        ax.set_yscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("achieved sparsity")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("quality vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_tasks(runs: list[RunData]) -> bytes | None:
    """One panel per task: its score (± stderr) vs achieved sparsity, one line per method."""
    names: list[str] = []
    for r in runs:
        if r.manifest is not None and not r.failed:
            names += [n for n in tasks_of(r.manifest) if n not in names]
    by_method = _by_series(runs)
    panels = {}
    for name in names:
        lines = {}
        for method, rs in by_method.items():
            pts = []
            for r in rs:
                t, x = tasks_of(r.manifest).get(name), achieved_sparsity(r.manifest)
                if t is not None and x is not None:
                    pts.append((x, _num(t["value"]), _num(t.get("stderr")) or 0.0, str(t.get("metric"))))
            if pts:
                lines[method] = sorted(pts)
        if lines:
            panels[name] = lines
    if not panels:
        return None
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = _figure(3.6 * ncol + 0.6, 3.0 * nrow + 0.3)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    colors = dict(zip(by_method, _colors(len(by_method))))
    for ax, (name, lines) in zip(axes, panels.items()):
        metrics = set()
        for i, (method, pts) in enumerate(lines.items()):
            dodge = (i - (len(lines) - 1) / 2) * 0.004  # runs at the same sparsity side by side, not on top
            ax.errorbar([p[0] + dodge for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="-o", ms=5,
                        capsize=3, color=colors[method], label=_text(method))
            metrics |= {p[3] for p in pts}
        ax.set_title(_text(name), fontsize=10)
        ax.set_xlabel("achieved sparsity", fontsize=8)
        ax.set_ylabel(_text(", ".join(sorted(metrics))), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.suptitle("task scores vs sparsity (± standard error)", fontsize=11)
    return _png(fig)


def _short_layer(name: str) -> str:
    return re.sub(r"^(model\.|transformer\.|gpt_neox\.)?(decoder\.)?(layers|h|blocks)\.", "", name)


def layer_table(runs: list[RunData]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(run names, layer names in first-seen order, sparsity per run and layer) from the ``layers`` rows."""
    names, layers, per_run = [], [], []
    for r in runs:
        if r.manifest is None or r.failed or not isinstance(r.manifest.get("layers"), (list, dict)):
            continue
        rows = r.manifest["layers"]
        if isinstance(rows, dict):  # before schema 1: {name: {...}}
            rows = [{"name": k, **v} for k, v in rows.items() if isinstance(v, dict)]
        vals = {str(row["name"]): _num(row.get("sparsity")) for row in rows
                if isinstance(row, dict) and "name" in row and _num(row.get("sparsity")) is not None}
        if not vals:
            continue
        layers += [k for k in vals if k not in layers]
        names.append(r.name)
        per_run.append(vals)
    return names, layers, [[vals.get(k) for k in layers] for vals in per_run]


def plot_layers(runs: list[RunData]) -> bytes | None:
    """Heat map: runs x layers, each cell the layer's achieved sparsity."""
    import numpy as np

    names, layers, grid = layer_table(runs)
    if not names:
        return None
    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig = _figure(min(12.0, 4.0 + 0.12 * len(layers)), 1.6 + 0.38 * len(names) + (1.2 if len(layers) <= 40 else 0.3))
    ax = fig.subplots()
    cmap = _cmap_with_bad("viridis")
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(names)), [_text(n) for n in names], fontsize=8)
    if len(layers) <= 40:
        ax.set_xticks(range(len(layers)), [_text(_short_layer(n)) for n in layers], rotation=90, fontsize=6)
    else:  # one tick per block (the first number in the name), at most ~30
        blocks, ticks = [], []
        for i, n in enumerate(layers):
            b = re.search(r"\.(\d+)\.", n)
            if b and (not blocks or blocks[-1] != b.group(1)):
                blocks.append(b.group(1))
                ticks.append(i)
        step = max(1, math.ceil(len(ticks) / 30))
        ax.set_xticks(ticks[::step], [f"{b}" for b in blocks[::step]], fontsize=7)
        ax.set_xlabel("decoder block (first layer of each)", fontsize=8)
    fig.colorbar(im, ax=ax, label="sparsity", fraction=0.04, pad=0.02)
    ax.set_title(f"per-layer sparsity ({len(layers)} layers; grey: not in the run)", fontsize=10)
    return _png(fig)


def _cmap_with_bad(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="0.85")


def plot_sensitivity(table: dict, name: str) -> bytes | None:
    """Perplexity vs the grid sparsity of the one pruned unit, one line per unit (as `prunekit sensitivity`'s plot,
    in perplexity rather than normalised)."""
    dense = _num(table.get("perplexity_dense"))
    units = {k: r for k, r in table["units"].items() if isinstance(r, dict) and isinstance(r.get("perplexity"), dict)}
    if not units:
        return None
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    colors = _colors(len(units), "viridis")
    ys_all = []
    for (unit, r), c in zip(units.items(), colors):
        pts = sorted((float(k), _num(v)) for k, v in r["perplexity"].items() if _is_float(k) and _num(v) is not None)
        if dense is not None:
            pts = [(0.0, dense)] + pts
        ys_all += [p[1] for p in pts]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, lw=1, color=c,
                label=_text(str(unit).rsplit(".", 1)[-1]) if len(units) <= 12 else None)
    if dense is not None:
        ax.axhline(dense, color="0.4", ls="--", lw=0.8)
    if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("sparsity of the one pruned unit (everything else dense)")
    ax.set_ylabel("perplexity")
    ax.set_title(_text(f"{name}: {table.get('method')} sensitivity per {table.get('unit')}"
                       + (f" (dense ppl {dense:.2f}, dashed; dark = first)" if dense is not None else "")), fontsize=10)
    ax.grid(alpha=0.3)
    if len(units) <= 12:
        ax.legend(fontsize=7, ncol=2, title=_text(table.get("unit")), title_fontsize=7)
    return _png(fig)


def _is_float(k) -> bool:
    try:
        return math.isfinite(float(k))
    except (TypeError, ValueError):
        return False


def plot_speed(runs: list[RunData]) -> bytes | None:
    """Tokens per second of each run, dense beside pruned."""
    rows = []
    for r in runs:
        if r.manifest is None or r.failed:
            continue
        tps = _num(_get(r.manifest, "metrics", "tokens_per_s"))
        if tps is not None:
            rows.append((r.name, _num(_get(r.manifest, "metrics", "tokens_per_s_dense")), tps))
    if not rows:
        return None
    import numpy as np

    fig = _figure(min(12.0, 3.0 + 1.1 * len(rows)), 3.8)
    ax = fig.subplots()
    x = np.arange(len(rows))
    w = 0.38
    dense = [d if d is not None else 0.0 for _, d, _ in rows]
    ax.bar(x - w / 2, dense, w, color="0.7", label="dense")
    bars = ax.bar(x + w / 2, [t for *_, t in rows], w, color="#2f5fd0", label="pruned")
    for b, (_, d, t) in zip(bars, rows):
        if d:
            ax.annotate(f"{t / d:.2f}×", (b.get_x() + b.get_width() / 2, b.get_height()), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(x, [_text(n) for n, *_ in rows], rotation=20 if len(rows) > 4 else 0, ha="right" if len(rows) > 4
                  else "center", fontsize=8)
    ax.set_ylabel("tokens / s (higher is better)")
    ax.set_title("measured speed")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_journey(runs: list[RunData]) -> bytes | None:
    """Live parameters vs optimizer step (``summary.journey.curve``, a step function), one line per run; dotted:
    each run's average."""
    lines = []
    for r in runs:
        j = None if r.manifest is None or r.failed else journey_of(r.manifest)
        pts = [(p[0], p[1]) for p in (j or {}).get("curve") or []
               if isinstance(p, (list, tuple)) and len(p) == 2 and _num(p[0]) is not None and _num(p[1]) is not None]
        if pts:
            end = _num(j.get("steps"))
            lines.append((r.name, pts, end if end is not None and end > pts[-1][0] else pts[-1][0] + 1,
                          _num(j["average_params"])))
    if not lines:
        return None
    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    for (name, pts, end, avg), c in zip(lines, _colors(len(lines))):
        xs, ys = [p[0] for p in pts] + [end], [p[1] for p in pts] + [pts[-1][1]]
        ax.step(xs, ys, where="post", color=c, lw=1.5, label=_text(f"{name} (average {avg:,.0f})"))
        ax.plot([0, end], [avg, avg], ":", color=c, lw=1)
    ax.set_xlabel("optimizer step (every phase and round, in order)")
    ax.set_ylabel("live parameters")
    ax.set_title("parameter count over training (dotted: its average)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _figure_html(png: bytes, alt: str, caption: str, fid: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{_e(fid)}"><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def plots(runs: list[RunData]) -> list[tuple[str, str, bytes]]:
    """``[(id, caption, png)]``: each plot only when its data exists."""
    out = []
    for fid, fn, caption in (
        ("plot-quality", plot_quality, "Perplexity on the evaluation split vs the achieved sparsity, one line per "
                                       "method (with its N:M pattern and recovery); stars: the dense models."),
        ("plot-tasks", plot_tasks, "Task scores (metrics.tasks) vs the achieved sparsity, error bars one standard "
                                   "error."),
        ("plot-layers", plot_layers, "Achieved sparsity of every target layer (the layers rows of prunekit.json)."),
        ("plot-speed", plot_speed, "Measured tokens per second (metrics.tokens_per_s and tokens_per_s_dense)."),
        ("plot-journey", plot_journey, "Live (unmasked) parameters at every optimizer step of training "
                                       "(summary.journey); runs with the same average reach about the same loss "
                                       "(Jin et al. 2025)."),
    ):
        png = fn(runs)
        if png is not None:
            out.append((fid, caption, png))
    for i, r in enumerate(runs):
        if r.table is not None:
            png = plot_sensitivity(r.table, r.name)
            if png is not None:
                out.append((f"plot-sensitivity-{i}", f"Sensitivity table of {r.name} (sensitivity.json): perplexity "
                            f"with one {r.table.get('unit')} pruned to each grid sparsity, everything else dense.",
                            png))
    return out


# ------------------------------------------------------------------------------------------- the other sections


def _generations_html(runs: list[RunData]) -> str:
    parts = []
    for r in runs:
        gens = _get(r.manifest, "generations")
        if not isinstance(gens, list) or not gens:
            continue
        rows = "".join(f"<tr><td>{_e(g.get('prompt'))}</td><td>{_e(g.get('dense'))}</td><td>{_e(g.get('pruned'))}</td>"
                       "</tr>" for g in gens if isinstance(g, dict))
        parts.append(f'<h3>{_e(r.name)}</h3><div class="scroll"><table class="gen"><thead><tr><th>prompt</th>'
                     f"<th>dense</th><th>pruned</th></tr></thead><tbody>{rows}</tbody></table></div>")
    return "".join(parts)


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(obj)), sort_keys=False, allow_unicode=True, default_flow_style=False)


def rerun_command(r: RunData) -> str | None:
    """The command that re-runs ``r`` from its saved recipe (``recipe.yaml``)."""
    m = r.manifest
    if m is not None and isinstance(_get(m, "recovery", "recipe"), dict):
        src = _get(m, "recovery", "input")
        return (f"prunekit recover {shlex.quote(str(src)) if src else 'PRUNED'} --recipe recovery.yaml "
                f"--out {shlex.quote(r.name.replace('/', '-') + '-rerun')}")
    if m is not None and m.get("kind") == "vision" and isinstance(m.get("recipe"), dict) and m["recipe"]:
        return f"prunekit train-prune --recipe recipe.yaml --out {shlex.quote(r.name.replace('/', '-') + '-rerun')}"
    if m is not None and isinstance(m.get("recipe"), dict) and m["recipe"]:
        src = m.get("source")
        return (f"prunekit prune {shlex.quote(str(src)) if src else 'MODEL'} --recipe recipe.yaml "
                f"--out {shlex.quote(r.name.replace('/', '-') + '-rerun')}")
    return None


def _sensitivity_command(r: RunData) -> str:
    t = r.table
    args = ["prunekit", "sensitivity", str(t.get("model") or "MODEL"), "--method", str(t.get("method") or "wanda")]
    if isinstance(t.get("grid"), list):
        args += ["--grid", ",".join(f"{g:g}" for g in t["grid"] if _num(g) is not None)]
    if t.get("unit"):
        args += ["--unit", str(t["unit"])]
    cal = t.get("calibration") if isinstance(t.get("calibration"), dict) else {}
    for flag, key in (("--calib", "text"), ("--calib-samples", "samples"), ("--seqlen", "seqlen"), ("--seed", "seed")):
        if cal.get(key) is not None:
            args += [flag, str(cal[key])]
    if t.get("eval_text") and t.get("eval_text") != cal.get("text"):
        args += ["--eval-text", str(t["eval_text"])]
    if isinstance(t.get("windows"), list) and t["windows"]:
        args += ["--eval-windows", str(t["windows"][0])]
    return " ".join(shlex.quote(a) for a in args + ["--out", r.name.replace("/", "-") + "-rerun"])


def _versions(m: dict | None) -> str:
    v = _get(m, "versions")
    return " · ".join(f"{k} {v[k]}" for k in v) if isinstance(v, dict) and v else ""


def _recipes_html(runs: list[RunData]) -> str:
    parts = []
    for r in runs:
        m, body = r.manifest, []
        if m is not None and r.failed:
            body.append(f'<p class="error">failed: {_e(m.get("error") or "no error recorded")}</p>')
        rec = _get(m, "recipe")
        if isinstance(rec, dict) and rec:
            body.append(f"<pre class=\"recipe\">{_e(_yaml(rec))}</pre>")
            if isinstance(_get(m, "recovery", "recipe"), dict):
                body.append("<p>This run is a recovery of the pruned model above; its recovery recipe:</p>"
                            f"<pre class=\"recipe\">{_e(_yaml(m['recovery']['recipe']))}</pre>"
                            "<p>Save this as <code>recovery.yaml</code>, then:</p>")
            else:
                body.append("<p>Save this as <code>recipe.yaml</code>, then:</p>")
            cmd = rerun_command(r)
            body.append(f'<pre class="command">{_e(cmd)}</pre>')
        if r.table is not None:
            body.append(f"<p>Sensitivity table: {_e(r.table.get('method'))} per {_e(r.table.get('unit'))}, grid "
                        f"{_e(', '.join(map(str, r.table.get('grid') or [])))}, {len(r.table['units'])} units. "
                        "Measure it again with:</p>"
                        f'<pre class="command">{_e(_sensitivity_command(r))}</pre>')
        v = _versions(m)
        if v:
            body.append(f'<p class="note">versions: {_e(v)}</p>')
        if body:
            parts.append(f'<div class="run"><h3>{_e(r.name)}</h3>{"".join(body)}</div>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------------------- page


def render(runs: list[RunData], title: str | None = None) -> str:
    """The page for ``runs`` (a string; :func:`build_report` writes it)."""
    from prunekit import __version__

    title = title or "prunekit report: " + ", ".join(r.name for r in runs)
    figs = plots(runs)
    n_failed = sum(r.failed for r in runs)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sections = [f"<header><h1>{_e(title)}</h1><p class=\"meta\">{len(runs)} run(s)"
                + (f", {n_failed} failed" if n_failed else "")
                + f"; made by prunekit {_e(__version__)} on {_e(when)}. Self-contained: it loads nothing from the "
                "network.</p></header>"]
    table = _table_html(runs)
    if table:
        sections.append(f'<section id="runs"><h2>Runs</h2>{table}<p class="note">Sparsity achieved: of the target '
                        "weights (structured runs: of the model's parameters). Perplexity on the run's evaluation "
                        "split; top-1 agreement with the dense model. Hover a time or a task score for its parts."
                        "</p></section>")
    if figs:
        sections.append('<section id="plots"><h2>Plots</h2>'
                        + "".join(_figure_html(png, cap, cap, fid) for fid, cap, png in figs) + "</section>")
    gens = _generations_html(runs)
    if gens:
        sections.append(f'<section id="generations"><h2>Greedy generations, dense vs pruned</h2>{gens}</section>')
    recipes = _recipes_html(runs)
    if recipes:
        sections.append(f'<section id="recipes"><h2>Recipes, commands and versions</h2>{recipes}</section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="{GENERATOR}">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def is_report(path: str | Path) -> bool:
    """Whether ``path`` is a page this module wrote (``--overwrite`` replaces only those)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f'<meta name="generator" content="{GENERATOR}">' in f.read(4096)
    except OSError:
        return False


def build_report(run_dirs, out_path: str | Path, title: str | None = None) -> Path:
    """Compare ``run_dirs`` on one self-contained HTML page written atomically to ``out_path``; returns its path.

    A RUN that is not a run directory, or whose JSON is broken, is a :class:`PruneError` naming it."""
    from prunekit.io import atomic_file

    runs = load_runs(run_dirs)
    if not runs:
        raise PruneError("Give at least one run directory to report on.")
    page = render(runs, title).encode("utf-8", errors="replace")  # a lone surrogate from a file cannot break it
    return atomic_file(out_path, lambda tmp: Path(tmp).write_bytes(page))

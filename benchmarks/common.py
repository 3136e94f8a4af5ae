"""What every benchmark script shares: the machine line its results quote, its JSON results file read back."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def load_json(path: Path) -> dict:
    """The results a previous run wrote (parts run again replace theirs), or nothing."""
    return json.loads(path.read_text()) if path.exists() else {}


def parts_md(title: str, res: dict, parts) -> str:
    """The markdown of a results file made of parts (llm_methods, vision_methods): each part's setup, its rows as a
    table, its targets met/missed and its findings."""
    lines = [f"# {title}", "", f"Machine: {res['machine']}. Last command: `{res['command']}` (each part names its "
             "own run where it was recorded).", ""]
    for name in parts:
        part = res.get("parts", {}).get(name)
        if not part:
            continue
        lines += [f"## {name}", "", part.get("setup", ""), ""]
        rows = part.get("rows", [])
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
            lines.append("")
        for t in part.get("targets", []):
            lines.append(f"- **{'met' if t['met'] else 'missed'}**: {t['target']} — {t['detail']}")
        for f in part.get("findings", []):
            lines.append(f"- finding: {f}")
        run = f"; `{part['command']}`" if part.get("command") else ""
        lines += ["", f"({part.get('seconds', 0):.0f} s{run})", ""]
    return "\n".join(lines) + "\n"


def plot_parts(res: dict, parts, path, default_key: str) -> None:
    """One bar panel per part: each row's main figure (the part's ``plot`` key, else ``default_key``), with
    ``<key>_std`` as error bars where a row has it."""
    from matplotlib.figure import Figure

    parts = [p for p in parts if res.get("parts", {}).get(p, {}).get("rows")]
    if not parts:
        return
    fig = Figure(figsize=(4.2 * len(parts), 3.6))
    for i, name in enumerate(parts):
        part = res["parts"][name]
        key = part.get("plot", default_key)
        rows = [r for r in part["rows"] if isinstance(r.get(key), (int, float))]
        ax = fig.add_subplot(1, len(parts), i + 1)
        ax.bar(range(len(rows)), [r[key] for r in rows], color="tab:blue",
               yerr=[r.get(key + "_std", 0) for r in rows])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([str(r.get("label", r.get("method", i))) for r in rows], rotation=60, ha="right",
                           fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(key, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_parts(stem: str, title: str, parts, make_ctx, plot_key: str, doc: str, add_args=None) -> None:
    """The command line of a benchmark made of parts (``benchmarks/<stem>_parts/<name>.py``, each ``run(ctx) ->
    dict``): ``--parts a,b`` (default all), ``--quick`` (a smoke run; nothing written). Each part's rows and
    targets are printed; results go to ``benchmarks/results/<stem>.{json,md,png}``, a part run again replacing only
    its own entry. ``make_ctx(args)`` builds the shared context; ``add_args(parser)`` adds a script's own flags. An
    unknown part is one sentence and exit code 2."""
    import argparse
    import importlib
    import sys
    import time

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--parts", default=",".join(parts))
    ap.add_argument("--quick", action="store_true", help="a smoke run (tiny settings); results not written")
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args()
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in names if p not in parts]
    if unknown:
        print(f"error: unknown part {unknown[0]!r}; choose from {', '.join(parts)}.", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    ctx = make_ctx(args)
    results = Path(__file__).resolve().parent / "results"
    res = {} if args.quick else load_json(results / f"{stem}.json")
    res.update({"machine": machine(), "command": f"python benchmarks/{stem}.py " + " ".join(sys.argv[1:])})
    res.setdefault("parts", {})
    for name in names:
        mod = importlib.import_module(f"{stem}_parts.{name}")
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        part = mod.run(ctx)
        part["seconds"] = round(time.perf_counter() - t0, 1)
        part["command"] = f"python benchmarks/{stem}.py " + " ".join(sys.argv[1:])
        res["parts"][name] = part
        for r in part.get("rows", []):
            print("  ", json.dumps(r, default=str), flush=True)
        for t in part.get("targets", []):
            print(f"   {'MET' if t['met'] else 'MISSED'}: {t['target']} — {t['detail']}", flush=True)
        if not args.quick:
            results.mkdir(exist_ok=True)
            # read again: another run of other parts may have written since this one started
            cur = load_json(results / f"{stem}.json")
            cur.setdefault("parts", {}).update({name: part})
            cur.update(part.get("top_level", {}))  # a part's headline figures, also at the top of the file
            cur.update({k: res[k] for k in ("machine", "command")})
            res = cur
            tmp = results / f".{stem}.{os.getpid()}.json.tmp"
            tmp.write_text(json.dumps(res, indent=1, default=str))
            tmp.replace(results / f"{stem}.json")
            (results / f"{stem}.md").write_text(parts_md(title, res, parts))
            plot_parts(res, parts, results / f"{stem}.png", plot_key)

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
    lines = [f"# {title}", "", f"Machine: {res['machine']}. Command: `{res['command']}`.", ""]
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
        lines += ["", f"({part.get('seconds', 0):.0f} s)", ""]
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

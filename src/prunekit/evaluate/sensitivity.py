"""Sensitivity analysis (SparseML's / NNI's): prune one unit at a time over a sparsity grid, everything else
dense, and record what it costs in perplexity; then allocate a target sparsity over the units from that table.

* :func:`sensitivity`: the recipe's method (its statistics from one pass over the dense model, the engine's
  one-pass mode) prunes one unit (a decoder block's target layers, or one layer) to each sparsity of the grid;
  the held-out perplexity is measured and the unit's weights are restored before the next. The table holds, per
  unit, its parameter count and the perplexity at each grid point (plus the dense perplexity).
* With ``measure="distortion"`` the table holds the output distortion instead (the mean squared change of the
  logits against the dense model): the curves of the rate-distortion allocation ``rd`` (:func:`rd_curves`, solved
  by :func:`prunekit.core.allocate.rd_sparsities`).
* :func:`allocate_from_table`: per-unit sparsities whose parameter-weighted mean is the target and whose summed
  perplexity increase (read off the table, linear between grid points, 0 at sparsity 0) is as small as a greedy
  search over 0.01 steps finds: the unit with the cheapest next step per removed weight goes next (NNI's
  SensitivityPruner ranks the same way), every unit within ``max_deviation`` (default 0.2) of the target, since
  the table measures each unit alone and errors compound when all are pruned. The result is an allocation ``list`` (one sparsity per decoder block);
  the recipe's ``allocation: {kind: sensitivity, table: PATH}`` does this inside ``prunekit prune``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from prunekit.errors import PruneError

TABLE_VERSION = 1
# how far a block's sparsity may stray from the target by default: single-block costs ignore that errors compound
# when every block is pruned; chosen on held-out windows of the calibration plays (benchmarks/llm_sensitivity.py),
# never on the evaluation plays
DEFAULT_DEVIATION = 0.2


def _grid(grid) -> list[float]:
    out = sorted({float(g) for g in grid})
    if not out or any(not (0.0 <= g < 1.0) or not math.isfinite(g) for g in out):
        raise PruneError(f"The sensitivity grid must be sparsities in [0, 1), got {list(grid)}.")
    return out


def output_distortion(model, windows: torch.Tensor, reference: torch.Tensor | None = None, batch_size: int = 2):
    """The mean squared change of the logits on ``windows`` against ``reference`` (the dense logits; None: return
    the logits themselves, to be the reference) — the output distortion of the rate-distortion allocation."""
    outs, total, count = [], 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i:i + batch_size]
            logits = model(input_ids=ids.to(model.device), use_cache=False).logits.float().cpu()
            if reference is None:
                outs.append(logits)
            else:
                total += float((logits - reference[i:i + batch_size]).pow(2).sum())
                count += logits.numel()
    return torch.cat(outs) if reference is None else total / max(count, 1)


def sensitivity(model, recipe, calibration_batches: torch.Tensor | None, windows: torch.Tensor, grid, *,
                unit: str = "block", device: str = "cpu", progress: bool = True, measure: str = "perplexity") -> dict:
    """The sensitivity table of ``model`` (see the module doc); ``recipe`` gives the method, its options, the
    excluded layers and the calibration settings (its sparsity and allocation are not used).

    ``measure``: ``perplexity`` on ``windows`` (the sensitivity allocation), or ``distortion``, the mean squared
    change of the logits on ``windows`` against the dense model's (the rate-distortion allocation ``rd``); the
    table's rows then hold ``distortion`` instead of ``perplexity``."""
    from prunekit.arch import adapter_for, target_layers
    from prunekit.calibrate import run_sequential
    from prunekit.core.masks import kept_total
    from prunekit.core.progress import bar
    from prunekit.evaluate.perplexity import perplexity
    from prunekit.linear import weight_matrix
    from prunekit.methods import get_method

    grid = _grid(grid)
    if measure not in ("perplexity", "distortion"):
        raise PruneError(f"The sensitivity measure must be 'perplexity' or 'distortion', got {measure!r}.")
    if unit not in ("block", "layer"):
        raise PruneError(f"The sensitivity unit must be 'block' or 'layer', got {unit!r}.")
    if recipe.nm is not None:
        raise PruneError("Sensitivity analysis sweeps unstructured sparsities; drop the N:M pattern.")
    adapter = adapter_for(model)
    per_block = target_layers(model, adapter, recipe.exclude)
    method = get_method(recipe.method, recipe.options)
    if method.statistic is not None and not (isinstance(calibration_batches, torch.Tensor) and calibration_batches.dim() == 2):
        raise PruneError(f"Method {recipe.method} needs calibration data: pass token ids [samples, seqlen].")
    flat = [t for block in per_block for t in block]
    method.prepare(model, calibration_batches, flat, progress)
    groups: list[tuple[int, list[tuple[str, torch.nn.Module]], torch.Tensor | None]] = []
    if method.statistic is None:
        groups = [(bi, [t], None) for bi, block in enumerate(per_block) for t in block]
    else:
        run_sequential(model, adapter.blocks(model), per_block, calibration_batches, method.statistic,
                       lambda bi, group, stat: groups.append((bi, list(group), stat.clone())),
                       batch_size=recipe.calibration.batch_size, device=device, progress=progress,
                       desc="sensitivity statistics", propagate=False, precision=recipe.calibration.precision)
    if unit == "block":
        units = {f"{adapter.blocks_path}.{bi}": [g for g in groups if g[0] == bi] for bi in range(len(per_block))}
    else:
        units = {}
        for bi, group, stat in groups:
            for t in group:  # one layer of a group pruned alone, with the group's statistic
                units[t[0]] = [(bi, [t], stat)]
    units = {k: v for k, v in units.items() if v}
    if measure == "perplexity":
        dense = float(perplexity(model, windows))

        def score() -> float:
            return float(perplexity(model, windows))
    else:
        reference = output_distortion(model, windows)

        def score() -> float:
            return output_distortion(model, windows, reference)
    table: dict[str, dict] = {}
    with torch.no_grad():
        for name, members in bar(list(units.items()), desc="sensitivity", unit=unit, enabled=progress):
            layers = [t for _, group, _ in members for t in group]
            saved = {n: weight_matrix(m).detach().clone() for n, m in layers}
            row = {"params": sum(w.numel() for w in saved.values()), measure: {}}
            for s in grid:
                for _, group, stat in members:
                    ws = [weight_matrix(m) for _, m in group]
                    removed = [w.numel() - kept_total(w.numel(), s) for w in ws]
                    method.prune_group(ws, None if stat is None else stat.clone(), removed, None, [n for n, _ in group])
                row[measure][f"{s:g}"] = score()
                for n, m in layers:
                    weight_matrix(m).copy_(saved[n])
            table[name] = row
    out = {"version": TABLE_VERSION, "method": recipe.method, "options": recipe.options, "unit": unit, "grid": grid,
           "measure": measure, "windows": list(windows.shape), "units": table}
    if measure == "perplexity":
        out["perplexity_dense"] = dense
    return out


def _cost(row: dict, dense: float, s: float) -> float:
    """Perplexity increase of one unit at sparsity ``s``: linear between grid points, 0 at 0, flat past the last."""
    pts = [(0.0, 0.0)] + sorted((float(k), v - dense) for k, v in row["perplexity"].items())
    if s >= pts[-1][0]:
        return pts[-1][1] if s == pts[-1][0] else math.inf
    for (a, ca), (b, cb) in zip(pts, pts[1:]):
        if a <= s <= b:
            return ca + (cb - ca) * (s - a) / (b - a)
    return math.inf


def allocate_from_table(table: dict, target: float, step: float = 0.01, max_deviation: float | None = None) -> dict[str, float]:
    """Per-unit sparsities (``{unit: s}``) with parameter-weighted mean ``target``, greedily cheapest first (see the
    module doc); no unit goes past the table's largest grid sparsity, nor further than ``max_deviation`` from the
    target when given (every unit starts at ``target - max_deviation``)."""
    units = table["units"]
    dense = float(table["perplexity_dense"])
    top = max(table["grid"])
    if not 0.0 < target < 1.0:
        raise PruneError(f"The target sparsity must be in (0, 1), got {target}.")
    total = sum(r["params"] for r in units.values())
    if target > top + 1e-12:
        raise PruneError(f"The sensitivity table goes up to sparsity {top:g}, below the target {target:g}; measure a "
                         "grid that reaches it.")
    low = 0.0 if max_deviation is None else max(0.0, target - max_deviation)
    if max_deviation is not None:
        top = min(top, target + max_deviation)
    s = {k: low for k in units}
    need = target * total
    done = low * total
    while done < need - 1e-9:
        best, best_rate = None, math.inf
        for k, r in units.items():
            nxt = min(round(s[k] + step, 10), top)
            if nxt <= s[k]:
                continue
            rate = (_cost(r, dense, nxt) - _cost(r, dense, s[k])) / (r["params"] * (nxt - s[k]))
            if rate < best_rate:
                best, best_rate = k, rate
        if best is None:
            break
        nxt = min(round(s[best] + step, 10), top)
        gain = units[best]["params"] * (nxt - s[best])
        if done + gain > need:  # the last step: just what is missing
            nxt = s[best] + (need - done) / units[best]["params"]
            gain = need - done
        s[best] = nxt
        done += gain
    return s


def rd_curves(table: dict, n_blocks: int, blocks_path: str, layer_names: list[str]) -> tuple[dict, list[float], str]:
    """The rate-distortion curves of a ``distortion`` table for this model: ``({group: [D per grid point]}, grid,
    unit)``, groups being block indices (unit block) or layer names (unit layer)."""
    if table.get("measure") != "distortion":
        raise PruneError("Allocation rd needs a table of output distortion (prunekit sensitivity --measure distortion), "
                         "not one of perplexity.")
    grid = [float(g) for g in table["grid"]]
    keys = [f"{g:g}" for g in grid]
    unit = table.get("unit")
    names = [f"{blocks_path}.{i}" for i in range(n_blocks)] if unit == "block" else list(layer_names)
    if set(table["units"]) != set(names):
        raise PruneError(f"The distortion table lists {len(table['units'])} {unit}s that are not this model's "
                         f"{len(names)}; measure it on this model.")
    curves = {(i if unit == "block" else n): [float(table["units"][n]["distortion"][k]) for k in keys]
              for i, n in enumerate(names)}
    return curves, grid, unit


def read_table(path: str | Path) -> dict:
    """A table written by ``prunekit sensitivity`` (``sensitivity.json``), checked; one sentence when it is not one."""
    p = Path(path)
    if p.is_dir():
        p = p / "sensitivity.json"
    try:
        t = json.loads(p.read_text())
    except (OSError, ValueError):
        raise PruneError(f"{p} is not a sensitivity table (the sensitivity.json that prunekit sensitivity writes).") from None
    if not isinstance(t, dict) or t.get("version") != TABLE_VERSION or not isinstance(t.get("units"), dict) or not t["units"]:
        raise PruneError(f"{p} is not a sensitivity table of this prunekit version; measure it again with prunekit sensitivity.")
    return t


def block_sparsities(table: dict, n_blocks: int, blocks_path: str, target: float,
                     max_deviation: float | None = DEFAULT_DEVIATION) -> list[float]:
    """The allocation ``list`` (one sparsity per decoder block) for ``target`` from a block-unit table."""
    if table.get("unit") != "block":
        raise PruneError("Allocating from a sensitivity table needs one measured per block (--unit block).")
    if table.get("measure", "perplexity") != "perplexity":
        raise PruneError("This table measures output distortion: use it with allocation rd, not sensitivity.")
    names = [f"{blocks_path}.{i}" for i in range(n_blocks)]
    if set(table["units"]) != set(names):
        raise PruneError(f"The sensitivity table lists {len(table['units'])} blocks that are not this model's {n_blocks}; "
                         "measure it on this model.")
    s = allocate_from_table(table, target, max_deviation=max_deviation)
    return [s[n] for n in names]

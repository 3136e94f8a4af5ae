"""Structured pruning of a whole model, as a recipe's ``structure`` section says: depth first (whole blocks or
sublayers), then width (heads / MLP channels scored, selected, optionally bias-compensated, shrunk), then the
config is rewritten (stock when it can be, see :mod:`prunekit.structure.saved`)."""

from __future__ import annotations

import time

import torch
from torch import nn

from prunekit.arch import adapter_for
from prunekit.arch.base import Adapter, _get
from prunekit.errors import PruneError
from prunekit.recipe import Recipe, Structure
from prunekit.report import Report
from prunekit.structure import hidden as hid
from prunekit.structure import importance as imp
from prunekit.structure.compensate import compensate, normalize_bias_flags
from prunekit.structure.layers import greedy_sublayers, influences, lowest_blocks, lowest_sublayers, sublayer_candidates
from prunekit.structure.plan import build_units, kept_heads, make_plan, nearest_count, removed_params, select
from prunekit.structure.saved import finalize_config, why_not_stock
from prunekit.structure.shrink import (
    attention_removed,
    block_heads,
    block_width,
    count_params,
    layer_sizes,
    mlp_removed,
    remove_attention,
    remove_blocks,
    remove_mlp,
    shrink_heads,
    shrink_mlp,
)


def _unique_params(modules: list[nn.Module]) -> int:
    seen, n = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


PER_BLOCK = ("cfsp",)  # criteria that also set every block's own ratio (LayerScores.ratio)


def scores_for(adapter: Adapter, model: nn.Module, st: Structure, batches, stats, batch_size: int, progress: bool,
               device="cpu"):
    if st.criterion == "magnitude":
        return imp.magnitude(adapter, model, p=2)
    if st.criterion == "magnitude-l1":
        return imp.magnitude(adapter, model, p=1)
    if st.criterion == "random":
        return imp.random_scores(adapter, model, st.seed)
    if st.criterion == "fluctuation":
        return imp.fluctuation(adapter, model, stats)
    if st.criterion == "cfsp":
        from prunekit.structure.cfsp import cfsp_scores

        return cfsp_scores(adapter, model, batches, st.sparsity, st.width_kinds, batch_size, device, progress)[0]
    if st.criterion == "loraprune":  # one LoRA scoring segment (a caller that prunes in parts of its own)
        from prunekit.structure.loraprune import segment_scores

        return segment_scores(adapter, model, st, batches, progress)
    modules = []
    for block in adapter.blocks(model):
        if not attention_removed(adapter, block):
            modules += list(adapter.attn_parts(block).values())
        if not mlp_removed(adapter, block):
            ins, o = adapter.mlp_parts(block)
            modules += [*ins, o]
    grads = imp.gradient_sums(model, batches, modules, batch_size, progress)
    return imp.taylor(adapter, model, grads)


def _zero_scores(adapter: Adapter, model: nn.Module) -> list[imp.LayerScores]:
    out = []
    for block in adapter.blocks(model):
        h, k = block_heads(adapter, model, block)
        w = block_width(adapter, block)
        out.append(imp.LayerScores(torch.zeros(h) if h else None, torch.zeros(k) if h else None, torch.zeros(w) if w else None))
    return out


def check(adapter: Adapter, model: nn.Module, st: Structure) -> None:
    """Everything about the request that can be wrong, checked before any work."""
    adapter.require_layout()
    n = len(adapter.blocks(model))
    if st.remove_layers >= n:
        raise PruneError(f"--remove-layers {st.remove_layers} is not less than the model's {n} layers; remove fewer layers.")
    if st.remove_layers:
        lay = adapter.layout
        if lay.layer_index_key and getattr(model.config, lay.layer_index_key, False):
            raise PruneError(f"This model sets {lay.layer_index_key}, so its blocks depend on their position; layers cannot be removed.")
    if st.remove_sublayers:
        cands = sublayer_candidates(adapter, model)
        if st.remove_sublayers >= len(cands):
            raise PruneError(
                f"--remove-sublayers {st.remove_sublayers} is not less than the model's {len(cands)} attention and MLP "
                "sublayers; remove fewer."
            )
        if not adapter.pre_norm(model):
            raise PruneError(f"This {adapter.family} model is post-norm, so single sublayers cannot be removed; use --remove-layers.")
    if "hidden" in st.kinds:
        hid.check_hidden(adapter, model, st.sparsity)
    if st.width_kinds:
        zeros = _zero_scores(adapter, model)
        for kind in st.width_kinds:
            select(build_units(adapter, model, zeros, kind, "random", st.gqa), st.sparsity,
                   st.global_rank or st.criterion in PER_BLOCK, kind)


AMOUNT_KINDS = ("layers", "sublayers", "heads", "mlp", "hidden")


def target_amounts(adapter: Adapter, model: nn.Module, st: Structure, pooled: bool = False) -> dict[str, int]:
    """What ``st`` removes from ``model`` in one shot, as counts: whole ``layers`` / ``sublayers``, ``hidden``
    channels, and for ``heads`` / ``mlp`` the units each layer loses (uniform) or all layers lose together
    (global rank, per-block ratios; ``pooled``: the uniform counts summed over the layers, for a schedule that
    shares every part out itself, Adapt-Pruner). An iterative schedule splits these counts into parts
    (:func:`split_amounts`)."""
    check(adapter, model, st)
    out = {"layers": st.remove_layers, "sublayers": st.remove_sublayers, "heads": 0, "mlp": 0, "hidden": 0}
    if "hidden" in st.kinds:
        out["hidden"] = hid.check_hidden(adapter, model, st.sparsity)
    if st.width_kinds:
        sizes = layer_sizes(adapter, model)
        if any(s != sizes[0] for s in sizes):
            raise PruneError("An iterative schedule needs every block of the source model to have the same sizes; "
                             "prune this model in one part (distill iterations 1).")
        if st.remove_sublayers:
            raise PruneError("An iterative schedule cannot split sublayer removal together with heads or MLP "
                             "pruning (which blocks keep attention is decided on the way); use remove_layers, or "
                             "one part (distill iterations 1).")
        zeros = _zero_scores(adapter, model)
        kept_blocks = len(zeros) - st.remove_layers
        for kind in st.width_kinds:
            units = build_units(adapter, model, zeros, kind, "random", st.gqa)
            if st.global_rank or st.criterion in PER_BLOCK:  # as one shot: over the blocks left after depth
                out[kind] = nearest_count(st.sparsity, kept_blocks / units[0].share)
            else:
                out[kind] = len(select(units, st.sparsity, False, kind)[0]) * (kept_blocks if pooled else 1)
    return out


def unit_table(adapter: Adapter, model: nn.Module, st: Structure) -> dict[str, list[tuple[int, float, int] | None]]:
    """Per kind of ``st.width_kinds`` and layer: (the removable units the layer has now, one unit's share of the
    sublayer's weights, the sublayer's size: query + kv heads, or MLP channels); None where the sublayer is gone."""
    zeros = _zero_scores(adapter, model)
    blocks = adapter.blocks(model)
    out = {}
    for kind in st.width_kinds:
        units = build_units(adapter, model, zeros, kind, "random", st.gqa)
        size = [sum(block_heads(adapter, model, b)) if kind == "heads" else block_width(adapter, b) for b in blocks]
        out[kind] = [None if u is None else (u.scores.numel(), u.share, n) for u, n in zip(units, size)]
    return out


def _some(amount) -> bool:
    """Whether a step's amount removes anything: a count, or per-layer counts (a list)."""
    return any(amount) if isinstance(amount, list) else bool(amount)


def split_amounts(target: dict[str, int], parts: int) -> list[dict[str, int]]:
    """``target`` in ``parts`` steps whose sums are exactly ``target``: step j removes round(t j / parts) -
    round(t (j - 1) / parts) (halves rounded up)."""
    def cum(t: int, j: int) -> int:
        return (2 * t * j + parts) // (2 * parts)

    return [{k: cum(t, j) - cum(t, j - 1) for k, t in target.items()} for j in range(1, parts + 1)]


def prune_structured(
    model: nn.Module, recipe: Recipe, calibration_batches: torch.Tensor | None = None, *, device: str = "cpu",
    progress: bool = True, amounts: dict[str, int] | None = None, scores: list[imp.LayerScores] | None = None,
) -> tuple[nn.Module, Report]:
    """Remove what ``recipe.structure`` says; ``amounts`` (one step of an iterative schedule, see
    :func:`target_amounts`) replaces its sizes by counts, scored and selected the same way. The report's summary
    says which blocks went (``removed_layers``, indices before the removal) and, for hidden pruning, the kept
    residual channels (``hidden_kept``), so a caller can map the result back to the source model. ``scores``:
    the heads / MLP scores to use instead of the criterion's (LoRAPrune's rounds hand theirs in)."""
    st = recipe.structure
    if amounts is None and scores is None and (st.learn or st.criterion == "loraprune"):  # trained, not one-shot
        from prunekit.structure import compresso, loraprune

        run = compresso.prune_compresso if st.learn else loraprune.prune_loraprune
        return run(model, recipe, calibration_batches, device=device, progress=progress)
    adapter = adapter_for(model)
    if amounts is None:
        check(adapter, model, st)
    else:
        adapter.require_layout()
        st = st.model_copy(update={"remove_layers": amounts.get("layers", 0), "remove_sublayers": amounts.get("sublayers", 0),
                                   "kinds": [k for k in st.kinds if _some(amounts.get(k, 0))]})
    if st.needs_data:
        if calibration_batches is None:
            raise PruneError("This structured pruning needs calibration data; pass calibration_batches (token ids).")
        if not (isinstance(calibration_batches, torch.Tensor) and calibration_batches.dim() == 2):
            raise PruneError("calibration_batches must be a 2-D tensor of token ids [samples, seqlen].")
    bs = recipe.calibration.batch_size
    lay = adapter.layout
    before = count_params(model)
    expected = before
    summary: dict = {"params_before": before}
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    # ---- depth
    if st.remove_layers:
        t0 = time.perf_counter()
        inf = influences(adapter, model, calibration_batches, bs, device, progress)
        drop = lowest_blocks(inf["block"], st.remove_layers)
        blocks = adapter.blocks(model)
        expected -= _unique_params([blocks[i] for i in drop])
        remove_blocks(adapter, model, drop)
        summary.update(removed_layers=drop, block_influence=inf["block"])
        times["layers_s"] = time.perf_counter() - t0
    if st.remove_sublayers:
        t0 = time.perf_counter()
        if st.sublayer_method == "greedy":
            chosen = greedy_sublayers(adapter, model, calibration_batches, st.remove_sublayers, bs, progress=progress)
        else:
            inf = influences(adapter, model, calibration_batches, bs, device, progress, sublayers=True)
            chosen = lowest_sublayers(inf, sublayer_candidates(adapter, model), st.remove_sublayers)
            summary["sublayer_influence"] = {"attn": inf["attn"], "mlp": inf["mlp"]}
        blocks = adapter.blocks(model)
        for i, kind in chosen:
            block = blocks[i]
            if kind == "attn":
                expected -= _unique_params([adapter.attention(block), _get(block, lay.attn_norm)])
                remove_attention(adapter, model, i)
            else:
                parts = [adapter.mlp_parent(block)] if lay.mlp else [_get(block, p) for p in (*lay.mlp_in, lay.mlp_out)]
                expected -= _unique_params([*parts, _get(block, lay.mlp_norm)])
                remove_mlp(adapter, model, i)
        empty = [i for i, b in enumerate(blocks) if attention_removed(adapter, b) and mlp_removed(adapter, b)]
        expected -= _unique_params([blocks[i] for i in empty])
        remove_blocks(adapter, model, empty)
        summary.update(removed_sublayers=[f"{i}.{k}" for i, k in sorted(chosen)], removed_layers=empty)
        times["sublayers_s"] = time.perf_counter() - t0

    # ---- width
    if st.width_kinds:
        t0 = time.perf_counter()
        if amounts is None:
            check(adapter, model, Structure(kinds=st.width_kinds, sparsity=st.sparsity, gqa=st.gqa,
                                            global_rank=st.global_rank, criterion=st.criterion))
        stats = None
        if st.criterion == "fluctuation" or st.bias_compensation:
            stats = imp.collect_meanvar(adapter, model, calibration_batches, bs, device, progress)
        if scores is None:
            scores = scores_for(adapter, model, st, calibration_batches, stats, bs, progress, device=device)
        ratios = [s.ratio for s in scores] if any(s.ratio is not None for s in scores) else None
        if ratios is not None:
            summary["block_ratios"] = [None if r is None else round(r, 4) for r in ratios]
        units = {k: build_units(adapter, model, scores, k, st.criterion, st.gqa) for k in st.width_kinds}
        removed = {k: select(units[k], st.sparsity, st.global_rank, k, None if amounts is None else amounts[k], ratios)
                   for k in st.width_kinds}
        plan = make_plan(adapter, model, units, removed)
        expected -= removed_params(adapter, model, plan)
        times["score_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        heads_before = sum(block_heads(adapter, model, b)[0] for b in adapter.blocks(model))
        width_before = sum(block_width(adapter, b) for b in adapter.blocks(model))
        if st.bias_compensation:
            expected += compensate(adapter, model, plan, stats)
        with torch.no_grad():
            for i, lp in sorted(plan.items()):
                if lp.heads:
                    shrink_heads(adapter, model, i, kept_heads(adapter, model, i, lp))
                if lp.channels:
                    gone = set(lp.channels)
                    shrink_mlp(adapter, model, i, [c for c in range(block_width(adapter, adapter.blocks(model)[i])) if c not in gone])
            expected += normalize_bias_flags(adapter, model)
        summary["plan"] = {str(i): {"heads": lp.heads, "kv_heads": lp.kv_heads, "channels": len(lp.channels)} for i, lp in plan.items()}
        if "heads" in st.kinds:
            gone = sum(len(lp.heads) for lp in plan.values())
            summary["heads_removed"] = f"{gone}/{heads_before}"
            summary["heads_ratio"] = gone / max(heads_before, 1)
        if "mlp" in st.kinds:
            gone = sum(len(lp.channels) for lp in plan.values())
            summary["mlp_removed"] = f"{gone}/{width_before}"
            summary["mlp_ratio"] = gone / max(width_before, 1)
        times["shrink_s"] = time.perf_counter() - t0

    # ---- hidden size (after heads/MLP, scored on the model as it now is)
    if "hidden" in st.kinds:
        t0 = time.perf_counter()
        d = model.config.hidden_size
        n = hid.check_hidden(adapter, model, st.sparsity if amounts is None else amounts["hidden"] / d)
        sc = hid.scores(adapter, model, st.criterion, calibration_batches, bs, st.seed, progress)
        keep = sorted(torch.argsort(sc, descending=True, stable=True)[: d - n].tolist())
        expected -= hid.removed_params(adapter, model, n)
        hid.shrink_hidden(adapter, model, keep)
        summary["hidden_removed"] = f"{n}/{d}"
        summary["hidden_kept"] = keep
        times["hidden_s"] = time.perf_counter() - t0

    reason = why_not_stock(adapter, model)  # before finalize_config writes the new sizes
    summary["format"] = finalize_config(adapter, model)
    if summary["format"] == "prunekit":
        summary["format_reason"] = reason
    summary["params"] = count_params(model)
    summary["params_expected"] = expected
    summary["params_ratio"] = summary["params"] / before
    summary["num_layers"] = len(adapter.blocks(model))
    sizes = layer_sizes(adapter, model)
    layers = {f"{adapter.blocks_path}.{i}": s for i, s in enumerate(sizes)}
    times["prune_s"] = time.perf_counter() - t_all
    if summary["params"] != expected:  # the shapes say what was removed; a mismatch is a bug, never silent
        raise RuntimeError(f"structured pruning left {summary['params']} parameters, the plan says {expected}")
    return model, Report(recipe=recipe.model_dump(), layers=layers, summary=summary, times=times)


def summary_lines(report: Report) -> list[str]:
    s, r = report.summary, report.recipe.get("structure") or {}
    what = []
    if r.get("kinds"):
        what.append(f"{','.join(r['kinds'])} sparsity {r.get('sparsity', r.get('ratio', 0)):g} by "
                    + (f"learned masks ({r['learn']})" if r.get("learn") else r["criterion"])
                    + (" (global rank)" if r.get("global_rank") else "") + (" + bias compensation" if r.get("bias_compensation") else ""))
    if r.get("remove_layers"):
        what.append(f"{r['remove_layers']} layer(s) by block influence")
    if r.get("remove_sublayers"):
        what.append(f"{r['remove_sublayers']} sublayer(s) by {r['sublayer_method']}")
    out = [f"structured: {'; '.join(what)}"]
    detail = []
    if "heads_removed" in s:
        detail.append(f"heads removed {s['heads_removed']}")
    if "mlp_removed" in s:
        detail.append(f"MLP channels removed {s['mlp_removed']}")
    if "hidden_removed" in s:
        detail.append(f"hidden channels removed {s['hidden_removed']}")
    if s.get("removed_sublayers"):
        detail.append(f"sublayers removed {', '.join(s['removed_sublayers'])}")
    if s.get("removed_layers"):
        detail.append(f"layers removed {s['removed_layers']}")
    if detail:
        out.append("  ".join(detail))
    out.append(f"params {s['params_before']:,} -> {s['params']:,} ({s['params_ratio']:.3f}x), {s['num_layers']} layers")
    return out + report.tail_lines()

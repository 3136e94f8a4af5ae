"""Which heads and channels go: removable units, uniform or global selection, the plan and its parameter count.

Units are the smallest groups whose removal keeps the model expressible:

* MLP: one channel.
* attention without GQA (kv heads == heads): one head with its q, k, v rows and o columns.
* GQA, ``gqa='kv'``: one kv group (its k/v head and all its query heads); ``gqa='query'`` (default): one query
  head from every kv group (the least important of each), so every group keeps the same number of query heads.

``ratio`` is the fraction of each sublayer's weights removed (as FLAP and LLM-Pruner count pruning ratios). For
MLP channels, heads without GQA and whole kv groups that is the fraction of units; a GQA slice of query heads
keeps its key/value heads, so it holds less: in SmolLM2 (9 query heads, 3 kv heads) one slice of 3 query heads
is 3/12 of the attention weights and ratio 0.5 removes two slices (6 of 9 query heads). Uniform: each layer loses
the whole number of units nearest to ratio / (a unit's share of the weights), ties removing fewer. Global (FLAP):
unit scores are standardized within each layer ((s - mean) / std), then the lowest ones over all layers go,
as many as the ratio asks for in total, every layer keeping at least its best unit. Per layer (a criterion that
sets each block's ratio, CFSP; or a schedule's per-layer counts, Adapt-Pruner): as many units in total as global
ranking removes, shared out by the layers' own ratios (:func:`layer_counts`), each layer's lowest scores going.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.arch.base import Adapter
from prunekit.errors import PruneError
from prunekit.structure.importance import LayerScores, finish
from prunekit.structure.shrink import attention_removed, block_heads, mlp_removed, out_in


@dataclass
class LayerPlan:
    heads: list[int] = field(default_factory=list)  # query heads removed (current indices)
    kv_heads: list[int] = field(default_factory=list)  # kv heads removed
    channels: list[int] = field(default_factory=list)  # MLP channels removed


@dataclass
class Units:
    """The removable units of one kind in one layer: scores and, for heads, their (query heads, kv heads)."""

    scores: torch.Tensor
    members: list[tuple[list[int], list[int]]] | None = None  # heads only
    share: float = 0.0  # the fraction of the sublayer's weights one unit holds

    def __post_init__(self):
        if not self.share:
            self.share = 1.0 / self.scores.numel()


def nearest_count(ratio: float, n: float) -> int:
    """The whole number nearest to ratio * n; ties go down (remove fewer)."""
    return max(0, math.ceil(ratio * n - 0.5 - 1e-9))


def head_units(criterion: str, s: LayerScores, heads: int, kv_heads: int, gqa: str) -> Units:
    per_group = heads // kv_heads
    hs, kv = s.heads.float().cpu(), s.kv.float().cpu()
    # a query head (q rows + o columns) and a kv head (k + v rows) hold the same number of weights, 2 * hidden * hd
    if gqa == "kv" or per_group == 1:
        members = [(list(range(g * per_group, (g + 1) * per_group)), [g]) for g in range(kv_heads)]
        sums = torch.stack([hs[q].sum() + kv[k].sum() for q, k in members])
        return Units(finish(criterion, sums), members, (per_group + 1) / (heads + kv_heads))
    order = hs.view(kv_heads, per_group).argsort(dim=1, stable=True)  # least important first, per group
    members = [([g * per_group + int(order[g, j]) for g in range(kv_heads)], []) for j in range(per_group)]
    sums = torch.stack([hs[q].sum() for q, _ in members])
    return Units(finish(criterion, sums), members, kv_heads / (heads + kv_heads))


def build_units(adapter: Adapter, model: nn.Module, scores: list[LayerScores], kind: str, criterion: str, gqa: str) -> list[Units | None]:
    out: list[Units | None] = []
    for block, s in zip(adapter.blocks(model), scores):
        if kind == "heads":
            if attention_removed(adapter, block):
                out.append(None)
                continue
            h, k = block_heads(adapter, model, block)
            out.append(head_units(criterion, s, h, k, gqa))
        else:
            out.append(None if mlp_removed(adapter, block) else Units(finish(criterion, s.mlp.float().cpu())))
    return out


def _what(kind: str, units: Units) -> str:
    if kind == "mlp":
        return "MLP channels"
    q, kv = units.members[0]
    if kv and len(q) > 1:
        return f"kv groups (each {len(q)} query heads with their key/value head)"
    if not kv:
        return f"slices of {len(q)} query heads (one from each kv group, as grouped-query attention requires)"
    return "attention heads"


def layer_counts(per_layer: list[Units | None], ratios: list[float | None], total: int | None = None,
                 ratio: float = 0.0) -> list[int]:
    """Units each layer loses when every layer has its own ratio (a criterion's block ratios, see
    ``LayerScores.ratio``): layer i's target ratio_i / (a unit's share), scaled to add up to ``total`` (default: as
    many units as ``ratio`` removes over all layers, as global ranking counts them), rounded by
    :func:`~prunekit.core.masks.round_to_total` with every layer keeping at least one unit."""
    from prunekit.core.masks import round_to_total

    layers = [i for i, u in enumerate(per_layer) if u is not None]
    if total is None:
        total = nearest_count(ratio, sum(1 / per_layer[i].share for i in layers))
    targets = [float(ratios[i] or 0.0) / per_layer[i].share for i in layers]
    s = sum(targets)
    targets = [t * total / s for t in targets] if s > 0 else [total / max(len(layers), 1)] * len(layers)
    caps = [per_layer[i].scores.numel() - 1 for i in layers]
    counts = [0] * len(per_layer)
    for i, c in zip(layers, round_to_total(targets, total, caps)):
        counts[i] = c
    return counts


def select(per_layer: list[Units | None], ratio: float, global_rank: bool, kind: str,
           count: int | list[int] | None = None, ratios: list[float | None] | None = None) -> list[list[int]]:
    """Indices of the units removed in each layer. ``count`` (a step of an iterative schedule) replaces the ratio:
    the number of units each layer loses (uniform) or all layers together lose (global); 0 removes nothing; a
    list gives every layer its own count (uniform only). ``ratios`` (uniform only): every layer's own ratio,
    turned into counts by :func:`layer_counts` (their total: ``count``, or what ``ratio`` removes in all)."""
    layers = [i for i, u in enumerate(per_layer) if u is not None]
    removed: list[list[int]] = [[] for _ in per_layer]
    if not layers or count == 0:
        return removed
    label = "attention head" if kind == "heads" else "MLP channel"
    if ratios is not None and not isinstance(count, list):
        if global_rank:
            raise PruneError("Per-layer ratios (criterion cfsp) decide each layer's share; drop --global-rank.")
        count = layer_counts(per_layer, ratios, count, ratio)
        if not sum(count):
            raise PruneError(f"Ratio {ratio:g} removes no {label} (the model has "
                             f"{sum(per_layer[i].scores.numel() for i in layers)} {_what(kind, per_layer[layers[0]])}); "
                             "use a larger --sparsity.")
    if isinstance(count, list):
        if global_rank:
            raise PruneError("Per-layer counts are for uniform selection; drop --global-rank.")
        for i in layers:
            u, k = per_layer[i], int(count[i])
            if k >= u.scores.numel():
                raise PruneError(f"The schedule removes every {label} of layer {i} ({u.scores.numel()} "
                                 f"{_what(kind, u)}); use a smaller --sparsity.")
            removed[i] = u.scores.argsort(stable=True)[:k].tolist() if k > 0 else []
        return removed
    if not global_rank:
        for i in layers:
            u = per_layer[i]
            n = u.scores.numel()
            k = nearest_count(ratio, 1 / u.share) if count is None else count
            if k >= n:
                raise PruneError(
                    f"Ratio {ratio:g} removes every {label} of layer {i} ({n} {_what(kind, u)}, each "
                    f"{u.share:.3g} of its weights); use a smaller --ratio."
                )
            if k == 0:
                step = u.share
                raise PruneError(
                    f"Ratio {ratio:g} removes no {label}: layer {i} has {n} {_what(kind, u)}, each {step:.3g} of its "
                    f"weights, so the smallest step is {step:.3g}; use --ratio {step / 2 + 1e-3:.2f} or more"
                    + (" (or --gqa kv)." if kind == "heads" and u.members and not u.members[0][1] else ".")
                )
            removed[i] = u.scores.argsort(stable=True)[:k].tolist()
        return removed
    zs, owner = [], []
    for i in layers:
        s = per_layer[i].scores.double()
        z = s - s.mean()
        if s.numel() > 1 and float(s.std()) > 0:
            z = z / s.std()
        z[int(s.argmax())] = math.inf  # every layer keeps its best unit
        zs.append(z)
        owner += [(i, j) for j in range(s.numel())]
    z = torch.cat(zs)
    total = z.numel()
    k = nearest_count(ratio, sum(1 / per_layer[i].share for i in layers)) if count is None else count
    if k == 0:
        raise PruneError(f"Ratio {ratio:g} removes no {label} (the model has {total} {_what(kind, per_layer[layers[0]])}); use a larger --ratio.")
    if k > total - len(layers):
        raise PruneError(f"Ratio {ratio:g} would remove every {label} of some layers; use a smaller --ratio.")
    for flat in z.argsort(stable=True)[:k].tolist():
        i, j = owner[flat]
        removed[i].append(j)
    return removed


def make_plan(adapter: Adapter, model: nn.Module, unit_sets: dict[str, list[Units | None]], removed: dict[str, list[list[int]]]) -> dict[int, LayerPlan]:
    plan: dict[int, LayerPlan] = {}
    for kind, per_layer in removed.items():
        for i, idx in enumerate(per_layer):
            if not idx:
                continue
            lp = plan.setdefault(i, LayerPlan())
            if kind == "mlp":
                lp.channels = sorted(idx)
            else:
                members = unit_sets[kind][i].members
                lp.heads = sorted(h for j in idx for h in members[j][0])
                lp.kv_heads = sorted(g for j in idx for g in members[j][1])
    return plan


def removed_params(adapter: Adapter, model: nn.Module, plan: dict[int, LayerPlan]) -> int:
    """Parameters the plan removes, counted from the shapes of the coupled matrices (and their biases)."""
    hd = adapter.head_dim(model)
    blocks = adapter.blocks(model)

    def rows(m, n):
        inp = out_in(m)[1]
        return n * inp + (n if getattr(m, "bias", None) is not None else 0)

    def cols(m, n):
        return n * out_in(m)[0]

    total = 0
    for i, lp in plan.items():
        block = blocks[i]
        if lp.heads:
            parts = adapter.attn_parts(block)
            nq, nkv = len(lp.heads) * hd, len(lp.kv_heads) * hd
            if "qkv" in parts:
                total += rows(parts["qkv"], nq + 2 * nkv)
            else:
                total += rows(parts["q"], nq) + rows(parts["k"], nkv) + rows(parts["v"], nkv)
            total += cols(parts["o"], nq)
        if lp.channels:
            ins, o = adapter.mlp_parts(block)
            total += sum(rows(m, len(lp.channels)) for m in ins) + cols(o, len(lp.channels))
    return total


def kept_heads(adapter: Adapter, model: nn.Module, layer: int, lp: LayerPlan) -> list[int]:
    h, _ = block_heads(adapter, model, adapter.blocks(model)[layer])
    gone = set(lp.heads)
    return [x for x in range(h) if x not in gone]

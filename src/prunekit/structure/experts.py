"""Mixture-of-experts: remove or merge whole experts per layer, so the model really has fewer of them.

transformers 5 keeps a layer's experts fused as 3-D parameters (``gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I]) and its router as a raw ``weight`` [E, H]: removing experts is index selection on dim 0 of those three
tensors plus the expert count in the modules and the config (:func:`keep_experts`). There are no per-expert
modules to hook, so one expert's output is computed here by hand (:func:`expert_forward`, the same math as the
model's own forward) and the routing by :func:`route` (softmax, top-k, renormalised where the family does).

The calibration engine (:func:`prunekit.calibrate.run_sequential`) hands each MoE layer its input rows (the
``rows`` statistic on the MoE module); :func:`layer_stats` turns them into what the methods read:

* ``frequency``: how many calibration tokens the router sends to each expert.
* ``reap`` (Lasby et al. 2025, REAP): per expert, the mean over the tokens routed to it of its top-k gate
  weight (renormalised over the top-k, also in families that route with the raw probabilities) times the L2
  norm of its output.
* ``enumerate`` (Lu et al. 2024, "Not All Experts are Equal"): every subset of experts to keep is tried on the
  layer's cached inputs and the one whose routed output is closest to the full layer's is kept; when there are
  more than ``max_subsets`` subsets, backward greedy elimination with the same error.
* ``merge`` (MC-SMoE / UNCURL style, task-specific when calibrated on the task): the ``keep`` most used experts
  become the centres, every other expert joins the centre whose router logits over the calibration tokens are
  most similar (cosine), its hidden neurons are permuted to the centre's (weight matching: a linear assignment
  on the neurons' gate, up and down weights), and each group is averaged with usage-frequency weights; the
  router keeps the centres' rows.

Shared experts (Qwen2-MoE's ``shared_expert``) are never touched. Per layer the kept count never goes below the
router's top-k. ``allocation: global`` spreads one budget over the layers by each expert's share of its layer's
score (frequency or REAP), with every layer keeping at least top-k. Equal counts in every layer give a stock
config (``num_experts`` / ``num_local_experts``); different counts are written as ``prunekit_expert_counts``
and rebuilt by :func:`prunekit.structure.saved.rebuild`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.arch import adapter_for
from prunekit.arch.base import Adapter
from prunekit.core.masks import keep_highest
from prunekit.core.registry import Registry
from prunekit.errors import PruneError
from prunekit.report import Report
from prunekit.structure.saved import EXPERTS_KEY

EXPERT_METHODS = Registry("expert method")
EXPERT_METHODS.register_names((
    ("frequency", "how often the router selects each expert on the calibration data"),
    ("reap", "router-weighted expert activation: mean over routed tokens of gate weight x ||expert output|| (REAP)"),
    ("enumerate", "every subset of kept experts tried on cached inputs, least output error (Lu et al.); greedy when too many"),
    ("merge", "experts clustered by router logits, neurons aligned by weight matching, averaged by usage (MC-SMoE)"),
))
SCORED = ("frequency", "reap", "merge")  # methods with one score per expert (a global budget ranks them)


# ---------------------------------------------------------------- the layer's math, by hand
def _check_experts(experts: nn.Module) -> None:
    names = {n for n, _ in experts.named_parameters(recurse=False)}
    if names != {"gate_up_proj", "down_proj"} or getattr(experts, "is_transposed", False):
        raise PruneError(
            f"These experts hold {sorted(names)}; prunekit prunes fused experts with exactly gate_up_proj [E, 2I, H] "
            "and down_proj [E, H, I] (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)."
        )


def expert_forward(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s output for rows ``x`` [T, H] (before its gate weight), as the model computes it."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def renormalises(router: nn.Module) -> bool:
    """Whether the family divides the top-k probabilities by their sum (Mixtral always; the others by flag)."""
    return bool(getattr(router, "norm_topk_prob", True))


def route(router: nn.Module, x: torch.Tensor, keep: list[int] | None = None, top_k: int | None = None):
    """``(logits [T, E'], weights [T, k], index [T, k])`` of rows ``x`` when only the experts ``keep`` exist
    (``index`` counts within ``keep``); ``keep=None``: all of them, as the router's own forward."""
    w = router.weight if keep is None else router.weight[keep]
    logits = F.linear(x, w)
    bias = getattr(router, "bias", None)
    if isinstance(bias, torch.Tensor):
        logits = logits + (bias if keep is None else bias[keep])
    probs = torch.softmax(logits.float(), dim=-1)
    k = min(int(top_k or router.top_k), probs.shape[-1])
    top_w, top_i = torch.topk(probs, k, dim=-1)
    if renormalises(router):
        top_w = top_w / top_w.sum(-1, keepdim=True)
    return logits, top_w.to(x.dtype), top_i


def routed_output(weights: torch.Tensor, index: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
    """Σ_k weight[t, k] · outs[index[t, k], t] for per-expert outputs ``outs`` [E', T, H]."""
    t = torch.arange(outs.shape[1])
    return sum(weights[:, j, None] * outs[index[:, j], t] for j in range(index.shape[1]))


@dataclass
class LayerStats:
    """What one MoE layer's calibration tokens say (the methods read only this)."""

    frequency: torch.Tensor  # [E] tokens routed to each expert
    reap: torch.Tensor  # [E] mean gate weight x output norm over each expert's routed tokens (0 when none)
    tokens: int
    x: torch.Tensor | None = None  # [T', H] subsampled input rows (enumerate, merge, router re-calibration)
    logits: torch.Tensor | None = None  # [T', E] router logits of those rows (merge)
    extra: dict = field(default_factory=dict)


def layer_stats(adapter: Adapter, moe: nn.Module, rows: torch.Tensor, max_tokens: int, seed: int = 0,
                keep_rows: bool = True) -> LayerStats:
    """Frequency and REAP over every row; the first ``max_tokens`` rows of a seeded shuffle kept for the methods
    that read the layer again."""
    router, experts = adapter.router(moe), adapter.experts(moe)
    x = rows.reshape(-1, rows.shape[-1]).to(router.weight.dtype)
    n_exp = router.weight.shape[0]
    freq = torch.zeros(n_exp, dtype=torch.float64)
    reap = torch.zeros(n_exp, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, x.shape[0], 4096):
            xb = x[s:s + 4096]
            _, w, idx = route(router, xb)
            if not renormalises(router):  # REAP weighs by the top-k gate weights renormalised, in every family
                w = w / w.sum(-1, keepdim=True)
            for e in idx.unique().tolist():
                tok, slot = torch.where(idx == e)
                out = expert_forward(experts, e, xb[tok])
                freq[e] += tok.numel()
                reap[e] += (w[tok, slot].double() * out.double().norm(dim=-1)).sum()
        reap = torch.where(freq > 0, reap / freq.clamp_min(1), torch.zeros_like(reap))
        sub = logits = None
        if keep_rows:
            g = torch.Generator().manual_seed(seed)
            pick = torch.randperm(x.shape[0], generator=g)[:max_tokens].sort().values
            sub = x[pick].clone()
            logits = route(router, sub)[0].float()
    return LayerStats(freq.float(), reap.float(), int(x.shape[0]), sub, logits)


# ---------------------------------------------------------------- choosing what to keep
def reconstruction_error(router: nn.Module, outs: torch.Tensor, x: torch.Tensor, keep: list[int],
                         target: torch.Tensor) -> float:
    """Mean squared error of the routed output with only ``keep`` against ``target`` (the full layer's)."""
    _, w, idx = route(router, x, keep)
    return float((routed_output(w, idx, outs[keep]) - target).pow(2).mean())


def enumerate_keep(adapter: Adapter, moe: nn.Module, stats: LayerStats, keep: int, max_subsets: int) -> tuple[list[int], dict]:
    """Lu et al.'s enumeration: the subset of ``keep`` experts with the least output error on the cached rows;
    backward greedy (drop, one at a time, the expert whose removal hurts least) when C(E, keep) > ``max_subsets``."""
    router, experts = adapter.router(moe), adapter.experts(moe)
    x = stats.x
    n = router.weight.shape[0]
    with torch.no_grad():
        outs = torch.stack([expert_forward(experts, e, x) for e in range(n)])
        _, w, idx = route(router, x)
        target = routed_output(w, idx, outs)
        subsets = math.comb(n, keep)
        if subsets <= max_subsets:
            best, err = None, float("inf")
            for cand in itertools.combinations(range(n), keep):
                e = reconstruction_error(router, outs, x, list(cand), target)
                if e < err:
                    best, err = list(cand), e
            return best, {"search": "exhaustive", "subsets": subsets, "error": err}
        cur = list(range(n))
        while len(cur) > keep:
            trials = [(reconstruction_error(router, outs, x, [c for c in cur if c != d], target), d) for d in cur]
            err, drop = min(trials)
            cur.remove(drop)
        return cur, {"search": "greedy", "subsets": subsets, "error": err}


def merge_groups(stats: LayerStats, keep: int) -> dict[int, list[int]]:
    """``{centre: [members]}``: the ``keep`` most used experts are the centres (ties: the lower index); every other
    expert joins the centre whose router-logit column over the calibration tokens has the highest cosine with its own."""
    n = stats.frequency.numel()
    centres = sorted(keep_highest(stats.frequency, keep).nonzero().squeeze(1).tolist())
    cols = F.normalize(stats.logits.t().float(), dim=1)  # [E, T']
    sim = cols @ cols.t()
    groups: dict[int, list[int]] = {c: [] for c in centres}
    for e in range(n):
        if e not in groups:
            groups[max(centres, key=lambda c: (float(sim[e, c]), -c))].append(e)
    return groups


def _neuron_features(experts: nn.Module, e: int) -> torch.Tensor:
    """Per hidden neuron of expert ``e``: its gate row, up row and down column, concatenated [I, 3H]."""
    gu = experts.gate_up_proj[e]
    inter = gu.shape[0] // 2
    return torch.cat([gu[:inter], gu[inter:], experts.down_proj[e].t()], dim=1)


def align(experts: nn.Module, centre: int, member: int) -> torch.Tensor:
    """The permutation of ``member``'s hidden neurons that best matches ``centre``'s (weight matching: maximise
    the summed inner products of matched neurons' weights); ``perm[j]`` = the member's neuron matched to the
    centre's neuron j."""
    from scipy.optimize import linear_sum_assignment

    a, b = (_neuron_features(experts, e).detach().double() for e in (centre, member))
    rows, cols = linear_sum_assignment((a @ b.t()).numpy(), maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def merge_into_centres(experts: nn.Module, groups: dict[int, list[int]], frequency: torch.Tensor,
                       aligned: bool = True) -> None:
    """Each centre's weights become the usage-weighted mean of its group's (members permuted to it first)."""
    inter = experts.gate_up_proj.shape[1] // 2
    with torch.no_grad():
        for c, members in groups.items():
            if not members:
                continue
            group = [c, *members]
            f = frequency[group].double()
            w = (f / f.sum()) if f.sum() > 0 else torch.full((len(group),), 1.0 / len(group), dtype=torch.float64)
            gu = torch.zeros_like(experts.gate_up_proj[c], dtype=torch.float64)
            dn = torch.zeros_like(experts.down_proj[c], dtype=torch.float64)
            for e, we in zip(group, w.tolist()):
                perm = align(experts, c, e) if aligned and e != c else torch.arange(inter)
                g_e = experts.gate_up_proj[e].double()
                gu += we * torch.cat([g_e[:inter][perm], g_e[inter:][perm]])
                dn += we * experts.down_proj[e].double()[:, perm]
            experts.gate_up_proj[c].copy_(gu.to(experts.gate_up_proj.dtype))
            experts.down_proj[c].copy_(dn.to(experts.down_proj.dtype))


# ---------------------------------------------------------------- removing them
def keep_experts(adapter: Adapter, moe: nn.Module, keep: list[int]) -> None:
    """Keep only experts ``keep`` (old indices, ascending) in this MoE layer: dim 0 of the fused expert weights
    and of the router, and the counts the modules cached."""
    router, experts = adapter.router(moe), adapter.experts(moe)
    idx = torch.as_tensor(sorted(keep), dtype=torch.long)
    with torch.no_grad():
        for mod, name in ((experts, "gate_up_proj"), (experts, "down_proj"), (router, "weight"), (router, "bias")):
            p = getattr(mod, name, None)
            if isinstance(p, nn.Parameter):
                setattr(mod, name, nn.Parameter(p.data[idx].clone(), requires_grad=p.requires_grad))
    for mod in (experts, router, moe):
        if isinstance(getattr(mod, "num_experts", None), int):
            mod.num_experts = len(idx)


def recalibrate_router(adapter: Adapter, moe: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int,
                       lr: float = 1e-3) -> tuple[float, float]:
    """Fit the router's rows so that the pruned layer's routed output on the rows ``x`` comes closer to the full
    layer's ``target`` (Adam on the mean squared error; the top-k choice is not differentiable, the gate weights
    are). Returns the error before and after; the rows are kept only when the error fell."""
    router, experts = adapter.router(moe), adapter.experts(moe)
    n = router.weight.shape[0]
    with torch.no_grad():
        outs = torch.stack([expert_forward(experts, e, x) for e in range(n)])
    start = router.weight.detach().clone()
    w = router.weight.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    t_idx = torch.arange(x.shape[0])

    def loss_of(weight):
        probs = torch.softmax(F.linear(x, weight).float(), dim=-1)
        top_w, top_i = torch.topk(probs, min(router.top_k, n), dim=-1)
        if renormalises(router):
            top_w = top_w / top_w.sum(-1, keepdim=True)
        y = sum(top_w[:, j, None] * outs[top_i[:, j], t_idx] for j in range(top_i.shape[1]))
        return (y - target).pow(2).mean()

    with torch.no_grad():
        before = float(loss_of(start))
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(w)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_of(w))
        if after < before:
            router.weight.copy_(w.detach())
        else:
            after = before
    return before, after


# ---------------------------------------------------------------- the whole run
def _top_k(adapter: Adapter, moe: nn.Module) -> int:
    return int(adapter.router(moe).top_k)


def target_counts(adapter: Adapter, model: nn.Module, ex) -> dict[int, int]:
    """Experts kept per MoE layer for a uniform allocation (``ex.keep``, or the count that removes
    ``ex.sparsity`` of them), checked against each layer's top-k; one sentence when impossible."""
    out = {}
    for i, moe in adapter.moe_layers(model):
        n = adapter.router(moe).weight.shape[0]
        keep = ex.keep if ex.keep is not None else n - int(round(ex.sparsity * n))
        k = _top_k(adapter, moe)
        if keep < k:
            raise PruneError(
                f"Keeping {keep} expert{'s' if keep != 1 else ''} in layer {i} is fewer than the router's top-k ({k}): every token needs {k} "
                f"experts; keep at least {k}."
            )
        if keep > n:
            raise PruneError(f"Layer {i} has {n} experts, fewer than the {keep} to keep; keep at most {n}.")
        out[i] = keep
    return out


def check(adapter: Adapter, model: nn.Module, ex) -> None:
    """Everything about the request that can be wrong, checked before any work."""
    layers = adapter.moe_layers(model)
    for _, moe in layers:
        _check_experts(adapter.experts(moe))
    target_counts(adapter, model, ex)
    if ex.allocation == "global" and ex.method not in SCORED:
        raise PruneError(f"A global expert budget ranks one score per expert; {ex.method} has none: use frequency, "
                         "reap or merge, or allocation uniform.")


def global_counts(adapter: Adapter, model: nn.Module, scores: dict[int, torch.Tensor], ex) -> dict[int, int]:
    """One budget (the uniform counts' sum) spread by each expert's share of its layer's score, every layer keeping
    at least its top-k (the core allocator's global ranking with a per-layer floor)."""
    from prunekit.core.allocate import _ranked

    uniform = target_counts(adapter, model, ex)
    layers = dict(adapter.moe_layers(model))
    shares = {str(i): s.double() / s.double().sum().clamp_min(1e-30) for i, s in scores.items()}
    reserve = {str(i): _top_k(adapter, layers[i]) for i in scores}
    counts = _ranked(shares, sum(uniform.values()), reserve)
    return {int(k): v for k, v in counts.items()}


def prune_experts(model: nn.Module, recipe, calibration_batches: torch.Tensor, *, device: str = "cpu",
                  progress: bool = True) -> tuple[nn.Module, Report]:
    """Remove or merge experts as ``recipe.experts`` says; the report's summary lists the kept experts per layer
    (old indices), the groups merged, the scores, the parameter counts and the config format."""
    from prunekit.calibrate import run_sequential
    from prunekit.structure.shrink import count_params

    ex = recipe.experts
    adapter = adapter_for(model)
    check(adapter, model, ex)
    if not (isinstance(calibration_batches, torch.Tensor) and calibration_batches.dim() == 2):
        raise PruneError("Expert pruning needs calibration data: pass calibration_batches, token ids [samples, seqlen].")
    layers = adapter.moe_layers(model)
    moe_of = dict(layers)
    blocks = adapter.blocks(model)
    name_of = {i: f"{adapter.blocks_path}.{i}.{adapter.moe.block}" for i, _ in layers}
    targets = [[(name_of[i], moe_of[i])] if i in moe_of else [] for i in range(len(blocks))]
    uniform = target_counts(adapter, model, ex)
    before = count_params(model)
    experts_before = {i: int(adapter.router(m).weight.shape[0]) for i, m in layers}
    summary: dict = {"params_before": before, "method": ex.method, "experts_before": experts_before}
    kept: dict[int, list[int]] = {}
    merged: dict[int, dict[int, list[int]]] = {}
    scores: dict[int, torch.Tensor] = {}
    details: dict[int, dict] = {}
    recal: dict[int, tuple[float, float]] = {}
    collected: dict[int, LayerStats] = {}
    needs_rows = ex.method in ("enumerate", "merge") or ex.recalibrate_steps > 0

    def decide(i: int, moe: nn.Module, st: LayerStats, n_keep: int) -> None:
        if ex.method == "enumerate":
            kept[i], details[i] = enumerate_keep(adapter, moe, st, n_keep, ex.max_subsets)
        elif ex.method == "merge":
            groups = merge_groups(st, n_keep)
            merge_into_centres(adapter.experts(moe), groups, st.frequency, aligned=ex.align)
            kept[i], merged[i] = sorted(groups), {c: m for c, m in groups.items() if m}
        else:
            kept[i] = sorted(keep_highest(scores[i], n_keep).nonzero().squeeze(1).tolist())

    def apply(i: int, moe: nn.Module, st: LayerStats) -> None:
        target = None
        if ex.recalibrate_steps > 0:
            router, experts = adapter.router(moe), adapter.experts(moe)
            with torch.no_grad():  # the full layer's routed output (before a merge changes the centres)
                _, w, idx = route(router, st.x)
                outs = torch.stack([expert_forward(experts, e, st.x) for e in range(router.weight.shape[0])])
                target = routed_output(w, idx, outs)
                del outs
        decide(i, moe, st, n_keep=counts[i])
        keep_experts(adapter, moe, kept[i])
        if target is not None:
            with torch.enable_grad():
                recal[i] = recalibrate_router(adapter, moe, st.x, target, ex.recalibrate_steps, ex.recalibrate_lr)

    counts = uniform
    t0 = time.perf_counter()
    if ex.allocation == "uniform" and recipe.calibration.mode == "sequential":
        # each layer chosen on the outputs of the layers already pruned before it
        def on_group(bi, group, rows):
            moe = group[0][1]
            st = layer_stats(adapter, moe, rows, ex.max_tokens, recipe.calibration.seed, keep_rows=needs_rows)
            scores[bi] = st.reap if ex.method == "reap" else st.frequency
            summary.setdefault("frequency", {})[str(bi)] = st.frequency.tolist()
            summary.setdefault("reap", {})[str(bi)] = st.reap.tolist()
            apply(bi, moe, st)

        times = run_sequential(model, blocks, targets, calibration_batches, "rows", on_group,
                               batch_size=recipe.calibration.batch_size, device=device, progress=progress,
                               desc=f"experts {ex.method}")
    else:
        # one pass over the dense model, then the choice (a global budget needs every layer's scores first)
        def on_group(bi, group, rows):
            st = layer_stats(adapter, group[0][1], rows, ex.max_tokens, recipe.calibration.seed, keep_rows=needs_rows)
            collected[bi] = st
            scores[bi] = st.reap if ex.method == "reap" else st.frequency
            summary.setdefault("frequency", {})[str(bi)] = st.frequency.tolist()
            summary.setdefault("reap", {})[str(bi)] = st.reap.tolist()

        times = run_sequential(model, blocks, targets, calibration_batches, "rows", on_group,
                               batch_size=recipe.calibration.batch_size, device=device, progress=progress,
                               desc=f"experts {ex.method}", propagate=False)
        if ex.allocation == "global":
            counts = global_counts(adapter, model, scores, ex)
        for i, moe in layers:
            apply(i, moe, collected.pop(i))
    times = {**times, "prune_s": time.perf_counter() - t0}

    fmt = finalize_expert_config(adapter, model)
    after = count_params(model)
    summary.update({
        "kept": {str(i): v for i, v in sorted(kept.items())},
        "experts_after": {str(i): len(v) for i, v in sorted(kept.items())},
        "experts_removed": f"{sum(experts_before.values()) - sum(len(v) for v in kept.values())}/{sum(experts_before.values())}",
        "params": after, "params_ratio": after / before, "format": fmt, "allocation": ex.allocation,
    })
    if merged:
        summary["merged"] = {str(i): {str(c): m for c, m in g.items()} for i, g in sorted(merged.items())}
    if details:
        summary["search"] = {str(i): d for i, d in sorted(details.items())}
    if recal:
        summary["router_recalibration"] = {str(i): {"error_before": a, "error_after": b} for i, (a, b) in sorted(recal.items())}
    layer_rows = {name_of[i]: {"experts": len(v), "kept": v} for i, v in sorted(kept.items())}
    return model, Report(recipe=recipe.model_dump(), layers=layer_rows, summary=summary, times=times)


def finalize_expert_config(adapter: Adapter, model: nn.Module) -> str:
    """Write the expert count into the config: ``"stock"`` when every MoE layer has the same count, else
    ``"prunekit"`` (the source's count stays, ``prunekit_expert_counts`` lists each block's, ``None`` for dense
    blocks; :func:`prunekit.structure.saved.rebuild` builds it)."""
    layers = adapter.moe_layers(model)
    counts = {i: int(adapter.router(m).weight.shape[0]) for i, m in layers}
    cfg = model.config
    if len(set(counts.values())) == 1:
        adapter.set_expert_count(model, next(iter(counts.values())))
        if hasattr(cfg, EXPERTS_KEY):
            delattr(cfg, EXPERTS_KEY)
        return "stock"
    n = len(adapter.blocks(model))
    setattr(cfg, EXPERTS_KEY, [counts.get(i) for i in range(n)])
    return "prunekit"


def resize_experts(model: nn.Module, counts: list) -> None:
    """Shrink a freshly built model's MoE layers to ``counts`` (per block; weights are loaded afterwards)."""
    adapter = adapter_for(model)
    moe_of = dict(adapter.moe_layers(model))
    for i, c in enumerate(counts):
        if c is None:
            continue
        if i not in moe_of or c > adapter.router(moe_of[i]).weight.shape[0]:
            raise PruneError(f"config.{EXPERTS_KEY} asks layer {i} for {c} experts, which its config cannot hold; the files are inconsistent.")
        keep_experts(adapter, moe_of[i], list(range(c)))


def summary_lines(report: Report) -> list[str]:
    s, r = report.summary, report.recipe.get("experts") or {}
    keep = r.get("keep")
    amount = f"keep {keep}" if keep is not None else f"remove {r.get('sparsity', 0):g} of them"
    what = f"experts: {s['method']}, {amount} per layer ({s['allocation']} allocation)"
    out = [what, f"experts removed {s['experts_removed']}  kept per layer {s['experts_after']}"]
    if "merged" in s:
        out.append(f"merged groups {s['merged']}")
    out.append(f"params {s['params_before']:,} -> {s['params']:,} ({s['params_ratio']:.3f}x)")
    return out + report.tail_lines()

"""How much each attention head and MLP channel matters, by one of five criteria.

Scores are additive per component: per query head (its q rows and o columns), per kv head (its k and v rows)
and per MLP channel (its rows of every input projection and its column of the output projection); the
groups that are removed together (a kv group, one query head in every kv group, a channel) sum them.

* ``magnitude``: L2 norm of the group's weights (biases included); ``magnitude-l1``: their L1 norm.
* ``fluctuation`` (FLAP, An et al. 2024): for each input channel j of o_proj / down_proj, the variance of
  x_j over calibration tokens times ||W[:, j]||^2; a head sums its channels. k/v rows score nothing: FLAP
  judges a head by what it writes into the residual stream.
* ``taylor`` (first order, as LLM-Pruner's element-wise score): sum over the group of |w * dL/dw|, with the
  gradient of the LM loss summed over the calibration set.
* ``random``: seeded uniform scores (the baseline every criterion should beat).
* ``cfsp`` (Wang et al. 2024, :mod:`prunekit.structure.cfsp`): each block's pruning ratio from its angular
  distance (``LayerScores.ratio``), then RIA-style relative weight importance x activation norm within it.

Statistics come from the shared engine (``calibrate.run_sequential`` with ``propagate=False`` and the
``meanvar`` statistic); gradients from batched backward passes like GBLM's gradient pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.arch.base import Adapter
from prunekit.core.registry import Registry
from prunekit.calibrate import run_sequential
from prunekit.linear import weight_matrix
from prunekit.structure.shrink import attention_removed, block_heads, mlp_removed
from prunekit.core.gradients import gradient_pass

CRITERIA = Registry("structured criterion")
CRITERIA.register_names((
    ("magnitude", "L2 norm of the group's weights"),
    ("magnitude-l1", "L1 norm of the group's weights"),
    ("fluctuation", "FLAP: input variance x squared column norm (hidden: Minitron's activation score)"),
    ("taylor", "LLM-Pruner's first-order |w * dL/dw| summed over the group"),
    ("random", "seeded uniform scores (the baseline)"),
    ("cfsp", "CFSP: block ratios from angular distance, then relative weight importance x activation norm"),
    ("loraprune", "LoRAPrune: |(W + BA) * (LoRA-estimated gradient)| moving-averaged over LoRA steps, iterative"),
))


@dataclass
class LayerScores:
    heads: torch.Tensor | None  # [query heads], additive
    kv: torch.Tensor | None  # [kv heads], additive (k and v rows)
    mlp: torch.Tensor | None  # [channels], additive
    ratio: float | None = None  # the block's own pruning ratio, from a criterion that sets one per block (cfsp)


def finish(criterion: str, group_sums: torch.Tensor) -> torch.Tensor:
    """From a group's summed components to its score (the square root for the L2 norm)."""
    return group_sums.clamp_min(0).sqrt() if criterion == "magnitude" else group_sums


ElemFn = Callable[[nn.Module], tuple[torch.Tensor, "torch.Tensor | None"]]


def _row_sums(module: nn.Module, elem: ElemFn) -> torch.Tensor:
    e, eb = elem(module)
    rows = e.sum(1)
    return rows + eb if eb is not None else rows


def _col_sums(module: nn.Module, elem: ElemFn) -> torch.Tensor:
    return elem(module)[0].sum(0)


def elementwise(adapter: Adapter, model: nn.Module, elem: ElemFn) -> list[LayerScores]:
    """Per block, group components from an element-wise score ``elem(module) -> ([out, in], [out] or None)``."""
    hd = adapter.head_dim(model)
    out = []
    for block in adapter.blocks(model):
        heads = kv = mlp = None
        if not attention_removed(adapter, block):
            h, k = block_heads(adapter, model, block)
            parts = adapter.attn_parts(block)
            if "qkv" in parts:
                rows = _row_sums(parts["qkv"], elem)
                q_rows, k_rows, v_rows = rows[: h * hd], rows[h * hd : (h + k) * hd], rows[(h + k) * hd :]
            else:
                q_rows, k_rows, v_rows = (_row_sums(parts[r], elem) for r in ("q", "k", "v"))
            heads = q_rows.view(h, hd).sum(1) + _col_sums(parts["o"], elem).view(h, hd).sum(1)
            kv = k_rows.view(k, hd).sum(1) + v_rows.view(k, hd).sum(1)
        if not mlp_removed(adapter, block):
            ins, o = adapter.mlp_parts(block)
            mlp = sum(_row_sums(m, elem) for m in ins) + _col_sums(o, elem)
        out.append(LayerScores(heads, kv, mlp))
    return out


def _bias(m: nn.Module) -> torch.Tensor | None:
    return None if getattr(m, "bias", None) is None else m.bias.detach().float()


def magnitude(adapter: Adapter, model: nn.Module, p: int = 2) -> list[LayerScores]:
    def elem(m):
        w, b = weight_matrix(m).float(), _bias(m)
        return (w.pow(2), None if b is None else b.pow(2)) if p == 2 else (w.abs(), None if b is None else b.abs())

    with torch.no_grad():
        return elementwise(adapter, model, elem)


def taylor(adapter: Adapter, model: nn.Module, grads: dict[int, torch.Tensor]) -> list[LayerScores]:
    """``grads``: id(parameter) -> summed gradient, from :func:`gradient_sums`."""

    def elem(m):
        w = m.weight
        g = grads[id(w)]
        e = (w.detach().float() * g.float()).abs()
        e = e.t() if type(m).__name__ == "Conv1D" else e
        eb = None
        if getattr(m, "bias", None) is not None and id(m.bias) in grads:
            eb = (m.bias.detach().float() * grads[id(m.bias)].float()).abs()
        return e, eb

    with torch.no_grad():
        return elementwise(adapter, model, elem)


def random_scores(adapter: Adapter, model: nn.Module, seed: int) -> list[LayerScores]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for block in adapter.blocks(model):
        heads = kv = mlp = None
        if not attention_removed(adapter, block):
            h, k = block_heads(adapter, model, block)
            heads, kv = torch.rand(h, generator=g), torch.zeros(k)
        if not mlp_removed(adapter, block):
            ins, _ = adapter.mlp_parts(block)
            mlp = torch.rand(weight_matrix(ins[0]).shape[0], generator=g)
        out.append(LayerScores(heads, kv, mlp))
    return out


def fluctuation(adapter: Adapter, model: nn.Module, stats: dict[tuple[int, str], torch.Tensor]) -> list[LayerScores]:
    """``stats[(layer, 'attn' | 'mlp')]``: mean/variance of the o_proj / down_proj input, from :func:`collect_meanvar`."""
    hd = adapter.head_dim(model)
    out = []
    with torch.no_grad():
        for i, block in enumerate(adapter.blocks(model)):
            heads = kv = mlp = None
            if not attention_removed(adapter, block):
                h, k = block_heads(adapter, model, block)
                o = weight_matrix(adapter.attn_parts(block)["o"]).float()
                per_channel = stats[(i, "attn")][1].to(o.device) * o.pow(2).sum(0)
                heads, kv = per_channel.view(h, hd).sum(1), torch.zeros(k, device=o.device)
            if not mlp_removed(adapter, block):
                down = weight_matrix(adapter.mlp_parts(block)[1]).float()
                mlp = stats[(i, "mlp")][1].to(down.device) * down.pow(2).sum(0)
            out.append(LayerScores(heads, kv, mlp))
    return out


def output_projections(adapter: Adapter, model: nn.Module):
    """Per block, the (name, module) of its o_proj and down_proj that are still there (the engine's targets),
    and name -> (block index, "attn" | "mlp")."""
    targets, where = [], {}
    for i, block in enumerate(adapter.blocks(model)):
        t = []
        if not attention_removed(adapter, block):
            name = adapter.attn_name(i, "o")
            t.append((name, adapter.attn_parts(block)["o"]))
            where[name] = (i, "attn")
        if not mlp_removed(adapter, block):
            name = adapter.mlp_name(i, adapter.require_layout().mlp_out)
            t.append((name, adapter.mlp_parts(block)[1]))
            where[name] = (i, "mlp")
        targets.append(t)
    return targets, where


def collect_meanvar(
    adapter: Adapter, model: nn.Module, batches: torch.Tensor, batch_size: int = 8, device="cpu", progress: bool = False
) -> dict[tuple[int, str], torch.Tensor]:
    """Mean and variance over calibration tokens of every input channel of o_proj and down_proj (dense model,
    one forward pass per block through the shared engine)."""
    blocks = adapter.blocks(model)
    targets, where = output_projections(adapter, model)
    out: dict[tuple[int, str], torch.Tensor] = {}

    def record(_bi, group, stat):
        for name, _m in group:
            out[where[name]] = stat.detach().cpu().clone()

    run_sequential(model, blocks, targets, batches, "meanvar", record, batch_size=batch_size, device=device,
                   progress=progress, desc="structure statistics", propagate=False)
    return out


def gradient_sums(
    model: nn.Module, batches: torch.Tensor, modules: list[nn.Module], batch_size: int = 8, progress: bool = False
) -> dict[int, torch.Tensor]:
    """Sum over calibration sequences of d(LM loss of the sequence)/d(param) for the weights and biases of
    ``modules``; keyed by ``id(param)``. Batched (the sum of per-sequence gradients is the gradient of the sum)."""
    params = [p for m in modules for p in (m.weight, getattr(m, "bias", None)) if p is not None]
    device = params[0].device
    acc: dict[int, torch.Tensor] = {}

    def loss(model, chunk):
        chunk = chunk.to(device)
        return model(input_ids=chunk, labels=chunk, use_cache=False).loss * chunk.shape[0]

    def add(i, p, g):
        if id(p) in acc:
            acc[id(p)].add_(g)
        else:
            acc[id(p)] = g.detach().clone()

    gradient_pass(model, params, batches.split(batch_size), loss, add, desc="taylor gradients", progress=progress)
    return acc

"""CFSP (Wang et al. 2024, "An Efficient Structured Pruning Framework for LLMs with Coarse-to-Fine Activation
Information"): each block's pruning ratio from its coarse importance, then its heads / MLP channels by a fine score.

Coarse: a block's importance is its angular distance ``d_l`` (:mod:`prunekit.structure.similarity`: the mean over
calibration tokens of arccos(cos(input, output)) / pi). As in the paper's code, importances become
``g_l = sigmoid((d_l - mean d) / mean d)`` (means weighted by the blocks' prunable parameters) and each block
*keeps* a share proportional to it:
``keep_l = (1 - s) g_l / mean_w(g)``, ``mean_w`` weighted by the block's prunable parameters, so the
parameter-weighted mean ratio ``1 - keep_l`` is exactly the requested sparsity ``s`` and a less important block
(its output more like its input) is pruned more. A ratio outside [0, 0.9] shrinks every block's deviation from
``s`` by one factor (the paper's rescaling) until the farthest block sits on the bound: the mean and the order
stay. (The paper centres the token *sums* and divides by 1e4, a scale tied to its 128 x 2048 calibration tokens;
the relative deviation used here is the same map without that dependence.)

Fine: RIA-style relative importance times the activation norm. For MLP channel j, every weight w of the
channel (its row of gate/up, its column of down) counts ``|w| / (the total |.| of the weights at w's hidden
index over all channels) + |w| / (the channel's own total in that matrix)``; the sum over the channel's weights
is multiplied by ``||X_j||``, the norm of down_proj's input j over the calibration tokens. A head sums its
channels the same way over its q rows and o_proj columns (with o_proj's input norms); k/v rows score nothing,
as in FLAP. The statistics and the block distances come from one pass of the shared engine (``propagate=False``).

The paper's importance-guided LoRA recovery (IG-LoRA: per-block adapter ranks from the coarse importance) is not
part of this criterion; any prunekit recovery or distillation can follow.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.arch.base import Adapter
from prunekit.errors import PruneError
from prunekit.linear import weight_matrix
from prunekit.structure.importance import output_projections
from prunekit.structure.similarity import block_distances, block_importance
from prunekit.structure.shrink import attention_removed, block_heads, mlp_removed

LOW, HIGH = 0.0, 0.9  # the range of every block's pruning ratio


def relative_importance(w: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Per channel (the index along ``channel_dim`` of ``w``), the sum over its weights of |w| / (total |.| at
    the same position over all channels) + |w| / (the channel's own total)."""
    a = w.detach().float().abs()
    across = a.sum(channel_dim, keepdim=True).clamp_min(1e-30)  # the same hidden index, every channel
    own = a.sum(1 - channel_dim, keepdim=True).clamp_min(1e-30)  # the channel's own weights
    return (a / across + a / own).sum(1 - channel_dim)


def fine_scores(adapter: Adapter, model: nn.Module, norms: dict[tuple[int, str], torch.Tensor]):
    """CFSP's fine score per query head and MLP channel (``LayerScores``); ``norms[(block, 'attn' | 'mlp')]``:
    ||X_j|| of the o_proj / down_proj inputs."""
    from prunekit.structure.importance import LayerScores

    hd = adapter.head_dim(model)
    out = []
    with torch.no_grad():
        for i, block in enumerate(adapter.blocks(model)):
            heads = kv = mlp = None
            if not attention_removed(adapter, block):
                h, k = block_heads(adapter, model, block)
                parts = adapter.attn_parts(block)
                q = weight_matrix(parts["qkv"])[: h * hd] if "qkv" in parts else weight_matrix(parts["q"])
                o = weight_matrix(parts["o"])
                per_channel = relative_importance(o, 1) + relative_importance(q, 0)
                per_channel = per_channel * norms[(i, "attn")].to(per_channel.device)
                heads, kv = per_channel.view(h, hd).sum(1), torch.zeros(k, device=per_channel.device)
            if not mlp_removed(adapter, block):
                ins, o = adapter.mlp_parts(block)
                ri = relative_importance(weight_matrix(o), 1)
                ri = ri + sum(relative_importance(weight_matrix(m), 0) for m in ins)
                mlp = ri * norms[(i, "mlp")].to(ri.device)
            out.append(LayerScores(heads, kv, mlp))
    return out


def block_ratios(distances: list[float], sparsity: float, weights: list[float] | None = None,
                 low: float = LOW, high: float = HIGH) -> list[float]:
    """Each block's pruning ratio from its angular distance (see the module doc): the ``weights``-weighted mean
    is ``sparsity``, less distance -> a higher ratio, every ratio in [low, high]."""
    if not low <= sparsity <= high:
        raise PruneError(f"cfsp keeps every block's ratio within [{low:g}, {high:g}]; sparsity {sparsity:g} is "
                         "outside it, so use a sparsity in that range.")
    w = torch.ones(len(distances), dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    if float(w.sum()) <= 0:
        return [float(sparsity)] * len(distances)
    g = torch.tensor(block_importance(distances, w.tolist()), dtype=torch.float64)
    dev = g / ((g * w).sum() / w.sum()) - 1  # weighted mean 0
    keep = 1.0 - sparsity
    factor = 1.0
    for x in dev.tolist():  # the largest common factor that keeps every block in range
        bound = (1.0 - low) if x > 0 else (1.0 - high)
        if x != 0:
            factor = min(factor, (bound / keep - 1.0) / x)
    ratios = 1.0 - keep * (1.0 + max(factor, 0.0) * dev)
    return [min(max(float(r), low), high) for r in ratios]


def prunable_weights(adapter: Adapter, model: nn.Module, kinds: list[str]) -> list[float]:
    """Per block, the parameters of its sublayers of ``kinds`` (heads: attention, mlp: the MLP)."""
    out = []
    for block in adapter.blocks(model):
        n = 0
        if "heads" in kinds and not attention_removed(adapter, block):
            n += sum(weight_matrix(m).numel() for m in adapter.attn_parts(block).values())
        if "mlp" in kinds and not mlp_removed(adapter, block):
            ins, o = adapter.mlp_parts(block)
            n += sum(weight_matrix(m).numel() for m in (*ins, o))
        out.append(float(n))
    return out


def cfsp_scores(adapter: Adapter, model: nn.Module, batches: torch.Tensor, sparsity: float, kinds: list[str],
                batch_size: int = 8, device="cpu", progress: bool = False):
    """One engine pass: block distances and the o_proj / down_proj input norms; returns the fine
    ``LayerScores`` of every block with ``ratio`` = its coarse pruning ratio, and the distances."""
    targets, where = output_projections(adapter, model)
    norms: dict[tuple[int, str], torch.Tensor] = {}

    def record(_bi, group, stat):
        for name, _m in group:
            norms[where[name]] = stat.detach().float().clamp_min(0).sqrt().cpu()

    distances = block_distances(adapter, model, batches, batch_size, device, progress, targets=targets,
                                statistic="sqnorm", on_group=record, desc="cfsp statistics")
    scores = fine_scores(adapter, model, norms)
    ratios = block_ratios(distances, sparsity, prunable_weights(adapter, model, kinds))
    for s, r in zip(scores, ratios):
        s.ratio = r
    return scores, distances

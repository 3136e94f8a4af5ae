"""The token-reduction methods, one registry entry each: given a layer's output after attention (``x``), its keys,
optionally its attention probabilities, the :class:`~prunekit.tokens.merge.TokenState` and how many tokens to
remove, return the reduced ``x`` and state. ``needs_probs``: the layer must compute attention explicitly (eager)
when it reduces; ``merges``: rows stand for several tokens (sizes grow; proportional attention applies)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunekit.core.registry import Registry
from prunekit.tokens import merge as M

METHODS = Registry("token method")


@dataclass
class Step:
    x: torch.Tensor  # (B, T, D): the layer's hidden states after the attention residual
    keys: torch.Tensor  # (B, H, T, d)
    probs: torch.Tensor | None  # (B, H, T, T) attention probabilities, when the method needs them
    state: M.TokenState
    n: int  # tokens to remove in this layer
    layer: int  # index among the model's layers
    layers: int  # how many layers the model has
    recipe: object
    generator: torch.Generator | None = None
    rows: torch.Tensor | None = None  # (B,) real tokens each row removes (padded batches), or None: n each


def _drop(step: Step, keep_idx) -> tuple[torch.Tensor, M.TokenState]:
    if keep_idx is None:
        return step.x, step.state
    return M.keep_rows(step.x, keep_idx), M.keep_state(step.state, keep_idx)


@METHODS.register("none", description="no reduction (the reference row of a benchmark)", needs_probs=False,
                  merges=False)
def none(step: Step):
    return step.x, step.state


@METHODS.register("tome", description="ToMe: bipartite soft matching on the keys, size-weighted merges",
                  needs_probs=False, merges=True)
def tome(step: Step):
    m = M.bipartite_soft_matching(step.keys.mean(1), step.n, step.state, step.rows)
    if m is None:
        return step.x, step.state
    return m.wavg(step.x, step.state)


@METHODS.register("random", description="random token drop (a baseline)", needs_probs=False, merges=False)
def random_drop(step: Step):
    b, t = step.state.valid.shape
    scores = torch.rand(b, t, generator=step.generator).to(step.x.device)
    return _drop(step, M.keep_top(scores, step.n, step.state, step.rows))


@METHODS.register("cls-attention", description="EViT-style: keep the tokens the class token attends to most",
                  aliases=("evit",), needs_probs="cls", merges=False)
def cls_attention(step: Step):
    return _drop(step, M.keep_top(M.cls_attention(step.probs), step.n, step.state, step.rows))


TOL = 1e-6  # PageRank stops once no head's scores move by more than this (L1; the scores sum to 1)


def iterations_for(layer: int, layers: int, setting) -> int:
    """Zero-TPrune's PageRank steps: ``auto`` = 30 in the first three layers, 1 in the last three, 5 between."""
    if setting != "auto":
        return int(setting)
    if layer < 3:
        return 30
    if layer >= layers - 3:
        return 1
    return 5


def power_iteration(a: torch.Tensor, s: torch.Tensor, v: torch.Tensor, iterations: int, tol: float = 0.0,
                    chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """``iterations`` steps of s <- (A^T s) * v for each of the N graphs a (N, T, T), s and v (N, T); stops early
    once no graph's scores move by more than ``tol`` (L1; 0: never). Works on chunks of about ``chunk_bytes`` so
    each chunk's matrices stay in cache across the iterations (one pass over memory instead of one per step)."""
    n, t, _ = a.shape
    per = max(1, chunk_bytes // max(1, t * t * a.element_size()))
    out = []
    for i in range(0, n, per):
        ai, si, vi = a[i:i + per], s[i:i + per, None, :], v[i:i + per, None, :]
        for _ in range(int(iterations)):
            new = torch.bmm(si, ai) * vi
            done = tol > 0 and float((new - si).abs().sum(-1).max()) <= tol
            si = new
            if done:
                break
        out.append(si[:, 0])
    return torch.cat(out)


def wpr_importance(probs: torch.Tensor, state: M.TokenState, iterations: int,
                   head_variance: tuple[float, float] = (0.01, 0.7), alive: torch.Tensor | None = None,
                   tol: float = 0.0) -> torch.Tensor:
    """Zero-TPrune's I-stage: weighted PageRank per head (the class token, when protected at position 0, starts
    sqrt(T) times the others), the heads whose (T-normalised) score variance lies in ``head_variance`` kept (all
    heads when none is), combined by root mean square (emphasis on informative regions). (B, T). ``tol``: stop
    the iterations early once converged (see :func:`power_iteration`)."""
    b, h, t, _ = probs.shape
    a = probs.float().reshape(b * h, t, t)
    if alive is not None:  # only these tokens take part (the others were dropped in this layer)
        state = M.TokenState(state.size, state.valid & alive, state.protected, None)
    valid = state.valid.repeat_interleave(h, 0)
    v = valid.float()
    s0 = v.clone()
    cls = state.protected[:, 0].repeat_interleave(h, 0)
    s0[:, 0] = torch.where(cls, v[:, 0] * math.sqrt(t), v[:, 0])
    s = power_iteration(a, s0 / s0.sum(-1, keepdim=True), v, iterations, tol).reshape(b, h, t)
    n_real = state.valid.sum(-1, keepdim=True).float()  # (B, 1)
    mask = state.valid[:, None, :]
    norm = s * n_real[:, None, :]  # mean 1 over the real tokens
    mean = (norm * mask).sum(-1, keepdim=True) / n_real[:, None, :]
    var = (((norm - mean) * mask) ** 2).sum(-1) / n_real  # (B, H)
    lo, hi = head_variance
    eta = ((var >= lo) & (var <= hi)).float()
    eta = torch.where(eta.sum(-1, keepdim=True) > 0, eta, torch.ones_like(eta))
    return torch.sqrt((eta[..., None] * s**2).sum(1) / eta.sum(-1, keepdim=True))


def similarity_drop(keys: torch.Tensor, rank: torch.Tensor, n: int, state: M.TokenState) -> torch.Tensor | None:
    """Zero-TPrune's S-stage: the droppable tokens sorted by ``rank``; the less important half (A) each finds its
    most similar token (cosine of the head-averaged keys) in the more important half (B); the ``n`` A tokens most
    similar to B are dropped. Returns the rows kept (in order), or None."""
    b, t = rank.shape
    droppable = state.valid & ~state.protected
    n_drop = int(droppable.sum(-1).min())
    n = min(int(n), n_drop // 2)
    if n <= 0:
        return None
    r = rank.float().masked_fill(~droppable, float("inf"))
    order = r.argsort(dim=-1, stable=True)  # least important first; protected/padding last
    half = n_drop // 2
    a_idx = order[:, :half]
    k = keys.float().mean(1)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = M.keep_rows(k, a_idx) @ k.transpose(1, 2)  # (B, half, T)
    b_mask = torch.ones(b, t, dtype=torch.bool, device=k.device)
    b_mask.scatter_(1, a_idx, False)
    sim = sim.masked_fill(~(b_mask & state.valid)[:, None, :], float("-inf"))
    best = sim.amax(-1)  # (B, half)
    top = best.argsort(dim=-1, descending=True, stable=True)[:, :n]
    drop = a_idx.gather(1, top)
    keep = torch.ones(b, t, dtype=torch.bool, device=k.device)
    keep.scatter_(1, drop, False)
    return keep.nonzero()[:, 1].reshape(b, t - n)


@METHODS.register("zero-tprune", description="Zero-TPrune: weighted PageRank importance on the attention graph and "
                  "similarity-based pruning, no training", needs_probs=True, merges=False)
def zero_tprune(step: Step):
    """I' (one PageRank step, to partition) -> S (drop the unimportant tokens most similar to important ones) ->
    I (PageRank on the graph of the tokens left: the dropped tokens' scores held at zero, no re-normalisation, so
    the (B, H, T, T) probabilities are never copied)."""
    rec = step.recipe
    least = step.n if step.rows is None else int(step.rows.min())
    n_sim = int(round(least * rec.similarity))
    x, st, probs = step.x, step.state, step.probs
    removed, alive = 0, None
    if n_sim > 0:
        pre = wpr_importance(probs, st, 1, rec.head_variance)  # I': one cheap step to partition
        keep = similarity_drop(step.keys, pre, n_sim, st)
        if keep is not None:
            alive = torch.zeros_like(st.valid)
            alive.scatter_(1, keep, True)
            removed = st.tokens - keep.shape[1]
    left = step.n - removed
    its = iterations_for(step.layer, step.layers, rec.iterations)
    scores = wpr_importance(probs, st, its, rec.head_variance, alive, tol=TOL) if left > 0 else None
    if alive is not None:
        x, st = M.keep_rows(x, keep), M.keep_state(st, keep)
        scores = None if scores is None else M.keep_rows(scores, keep)
    if scores is None:
        return x, st
    rows = None if step.rows is None else (step.rows - removed).clamp_min(0)
    keep2 = M.keep_top(scores, left, st, rows)
    if keep2 is None:
        return x, st
    return M.keep_rows(x, keep2), M.keep_state(st, keep2)

"""Which recovery windows a recovery trains on (``Recovery.select`` / ``keep``); the steps stay as configured.

``all``: every candidate window. ``random``: a seeded uniform subset of ``round(keep * N)`` windows.
``paser`` (PASER, "Post-Training Data Selection for Efficient Pruned Large Language Model Recovery"): the subset
that targets what the pruning damaged most, in four steps:

1. every candidate window is decoded to text and embedded with MiniLM, and the embeddings are clustered by k-means
   into ``clusters`` groups (the data family's :func:`prunekit.data.embed.embed` and
   :func:`prunekit.data.clusters.kmeans`);
2. the **degradation** of a window is the Jensen-Shannon divergence between the dense teacher's and the pruned
   model's next-token distributions, averaged over its tokens (nats, at most ln 2); one forward of both models;
3. each cluster's **budget** is proportional to its mean degradation, exact integers that add up to
   ``round(keep * N)``, none above the cluster's size, what a full cluster cannot take handed on to the others
   (:func:`prunekit.core.masks.apportion`);
4. the windows are walked from the most degraded down; a window is taken while its cluster has budget left and it is
   not a **near duplicate** (cosine similarity of the embeddings above ``dedup_threshold``) of one already taken
   (a practical form of PASER's concept-consistency filter). Budget a cluster cannot fill for want of distinct
   windows is apportioned again over the clusters that still have some (by mean degradation); only when no
   distinct window is left anywhere are near duplicates taken, the most degraded first, so the count is exact.

PASER's within-cluster efficiency score divides the divergence by the log of the sample's length; recovery windows
all have the same length, so the order is the divergence's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.masks import apportion
from prunekit.core.progress import bar
from prunekit.core.registry import Registry
from prunekit.errors import PruneError

SELECTIONS = Registry("recovery selection")
SELECTIONS.register_names((
    ("all", "every recovery window"),
    ("random", "a seeded random share keep of the windows"),
    ("paser", "PASER: MiniLM clusters, budgets by the pruned model's divergence from the dense one, "
              "near duplicates skipped"),
))


@dataclass
class Selection:
    """The chosen windows (sorted row indices into the candidates) and what the run record says about them."""

    indices: torch.Tensor
    info: dict


def selected_count(n: int, keep: float) -> int:
    """How many of ``n`` windows a share ``keep`` in (0, 1] selects: ``round(keep * n)``, at least one."""
    if not 0.0 < float(keep) <= 1.0:
        raise PruneError(f"The recovery keep share must be in (0, 1], got {keep}.")
    return min(n, max(1, int(round(float(keep) * n))))


def check_selection(rec, teacher, tokenizer, embeddings, n: int) -> None:
    """What ``rec.select`` needs, checked before any work (one sentence on a mistake)."""
    if rec.select != "paser":
        return
    if teacher is None:
        raise PruneError("Recovery select 'paser' measures the pruned model against the dense one; pass the dense "
                         "model as teacher= (CLI: --teacher MODEL, default the source in the input's prunekit.json).")
    if embeddings is None and tokenizer is None:
        raise PruneError("Recovery select 'paser' embeds the text of each window; pass tokenizer= (or embeddings=).")
    if embeddings is not None and tuple(np.shape(embeddings))[:1] != (n,):
        raise PruneError(f"embeddings must have one row per recovery window ({n}), "
                         f"got shape {tuple(np.shape(embeddings))}.")


def select_windows(model: nn.Module, rec, windows: torch.Tensor, *, teacher: nn.Module | None = None, tokenizer=None,
                   embeddings=None, progress: bool = True) -> Selection:
    """The windows of ``windows [N, seqlen]`` that recovery ``rec`` trains on (see the module docstring)."""
    n = int(windows.shape[0])
    check_selection(rec, teacher, tokenizer, embeddings, n)
    m = selected_count(n, rec.keep)
    info: dict = {"select": rec.select, "keep": rec.keep, "candidates": n, "selected": m}
    if rec.select == "all" or m >= n:
        return Selection(torch.arange(n), info)
    if rec.select == "random":
        gen = torch.Generator().manual_seed(rec.seed)
        chosen = torch.randperm(n, generator=gen)[:m].sort().values
        return Selection(chosen, {**info, "indices": chosen.tolist()})
    t0 = time.perf_counter()
    z = window_embeddings(windows, tokenizer) if embeddings is None else _normalize(np.asarray(embeddings))
    k = min(rec.clusters, n)
    from prunekit.data.clusters import kmeans

    labels = kmeans(z.astype(np.float64), k, seed=rec.seed).labels
    t1 = time.perf_counter()
    deg = degradation(model, teacher, windows, rec.batch_size, progress=progress).numpy()
    t2 = time.perf_counter()
    chosen, plan = paser_plan(deg, labels, m, z, rec.dedup_threshold)
    info.update(plan)
    info.update({"clusters": k, "dedup_threshold": rec.dedup_threshold, "degradation": "jsd",
                 "degradation_mean": round(float(deg.mean()), 6),
                 "degradation_selected_mean": round(float(deg[chosen].mean()), 6),
                 "indices": [int(i) for i in chosen],
                 "seconds": {"embed_cluster": round(t1 - t0, 3), "degradation": round(t2 - t1, 3)}})
    return Selection(torch.as_tensor(chosen, dtype=torch.long), info)


def _normalize(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or not np.isfinite(z).all():
        raise PruneError(f"embeddings must be a finite 2-D array [windows, dim], got shape {z.shape}.")
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def window_embeddings(windows: torch.Tensor, tokenizer) -> np.ndarray:
    """``[N, 384]`` L2-normalized MiniLM embeddings of the windows' decoded text (the data family's encoder)."""
    from prunekit.data.datasets import DataSet
    from prunekit.data.embed import embed

    texts = tokenizer.batch_decode(windows.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return _normalize(embed(DataSet("recovery windows", "text", texts=[t or " " for t in texts]), "minilm"))


def jsd(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between the softmax distributions of two ``[..., vocab]`` logits, per row."""
    lp, lq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    p, q = lp.exp(), lq.exp()
    m = (p + q).mul_(0.5)  # H(m) - (H(p) + H(q)) / 2; xlogy: 0 log 0 = 0
    return (0.5 * ((p * lp).sum(-1) + (q * lq).sum(-1)) - torch.xlogy(m, m).sum(-1)).clamp_min(0.0)


@torch.no_grad()
def degradation(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                progress: bool = True) -> torch.Tensor:
    """``[N]`` float: each window's Jensen-Shannon divergence between ``teacher`` (dense) and ``model`` (pruned)
    next-token distributions, averaged over its positions. Both models' modes are left as they were."""
    if teacher.get_output_embeddings().weight.shape[0] != model.get_output_embeddings().weight.shape[0]:
        raise PruneError("The teacher's vocabulary differs from the model's; measure against the dense model it was "
                         "pruned from.")
    modes = [(mod, mod.training) for mod in (model, teacher)]
    dev_m, dev_t = next(model.parameters()).device, next(teacher.parameters()).device
    out = []
    try:
        model.eval()
        teacher.eval()
        for i in bar(range(0, windows.shape[0], batch_size), desc="paser: divergence from dense", enabled=progress):
            x = windows[i:i + batch_size].long()
            lq = model(input_ids=x.to(dev_m), use_cache=False).logits
            lp = teacher(input_ids=x.to(dev_t), use_cache=False).logits.to(lq.device)
            out.extend(jsd(lp[j], lq[j]).mean().item() for j in range(x.shape[0]))  # one window at a time: less memory
    finally:
        for mod, mode in modes:
            mod.train(mode)
    d = torch.tensor(out, dtype=torch.float64)
    if not bool(torch.isfinite(d).all()):
        raise PruneError("The pruned or dense model gives non-finite logits on the recovery windows; check the models.")
    return d


def paser_plan(degradation, labels, m: int, embeddings, threshold: float) -> tuple[np.ndarray, dict]:
    """Choose ``m`` windows: cluster budgets by mean degradation, the most degraded first, near duplicates skipped.

    ``degradation [N]``, ``labels [N]`` (cluster of each window), ``embeddings [N, d]``; returns the sorted indices
    and the plan (per cluster: size, mean degradation, budget (the proportional share), selected)."""
    deg = np.asarray(degradation, dtype=np.float64)
    labels = np.asarray(labels)
    z = _normalize(embeddings)
    n = len(deg)
    ids = np.unique(labels)
    cl = np.searchsorted(ids, labels)  # cluster positions 0..k-1
    sizes = np.bincount(cl, minlength=len(ids))
    mean_deg = np.array([deg[cl == c].mean() for c in range(len(ids))])
    budget = np.asarray(apportion(m, mean_deg.tolist(), sizes.tolist()), dtype=np.int64)
    order = np.lexsort((np.arange(n), -deg))  # most degraded first, ties by position
    taken = np.zeros(n, dtype=bool)
    best_sim = np.full(n, -np.inf)  # each window's highest cosine similarity to a taken one

    def take(i):
        taken[i] = True
        np.maximum(best_sim, z @ z[i], out=best_sim)

    def walk(quota):
        count = np.bincount(cl[taken], minlength=len(ids))
        for i in order:
            if not taken[i] and count[cl[i]] < quota[cl[i]] and best_sim[i] <= threshold:
                take(i)
                count[cl[i]] += 1

    walk(budget)
    quota = budget.copy()
    while taken.sum() < m:  # budget a cluster could not fill with distinct windows goes to the others
        got = np.bincount(cl[taken], minlength=len(ids))
        room = np.bincount(cl[~taken & (best_sim <= threshold)], minlength=len(ids))
        if room.sum() == 0:
            break
        quota = got + np.asarray(apportion(int(m - taken.sum()), mean_deg.tolist(), room.tolist()), dtype=np.int64)
        before = taken.sum()
        walk(quota)
        if taken.sum() == before:
            break
    dup_fill = 0
    for i in order:  # no distinct window left anywhere: near duplicates, the most degraded first
        if taken.sum() >= m:
            break
        if not taken[i]:
            take(i)
            dup_fill += 1
    got = np.bincount(cl[taken], minlength=len(ids))
    skipped = int((~taken & (best_sim > threshold)).sum())  # windows left out as near duplicates of a taken one
    per_cluster = [{"cluster": int(c), "size": int(sizes[j]), "degradation": round(float(mean_deg[j]), 6),
                    "budget": int(budget[j]), "selected": int(got[j])} for j, c in enumerate(ids)]
    return np.flatnonzero(taken), {"per_cluster": per_cluster, "near_duplicates_skipped": skipped,
                                   "near_duplicates_taken": dup_fill}

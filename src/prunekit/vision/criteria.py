"""Unstructured saliency scores for every prunable weight of any model (higher = keep).

* ``magnitude``  |w|.
* ``random``     uniform noise (pair it with ERK allocation for the "random + ERK" baseline).
* ``snip``       |g * w| on a few batches at the current weights (Lee et al., 2019; connection sensitivity).
* ``grasp``      GraSP (Wang et al., 2020): the paper removes the weights with the *largest* -w * (H g), so the
                 keep-score is ``w * (H g)`` (Hessian-gradient product by double backprop).
* ``synflow``    SynFlow (Tanaka et al., 2020): data-free. |w * dR/dw| with R the sum of the output of the
                 model with all parameters made positive on an all-ones input, in float64, BatchNorm in eval
                 mode. Iterative: :func:`synflow_masks` re-scores ``iterations`` times while sparsity grows
                 exponentially to the target, masking between rounds.
* ``taylor``     first-order Taylor (Molchanov et al., 2019): sum over batches of (g * w)^2 at trained weights.
* ``lrp``        Pruning by Explaining (Yeom et al., 2021): the absolute LRP relevance of each weight summed over the
                 reference samples (:mod:`prunekit.vision.lrp`; options rule, alpha, epsilon: :class:`LrpOptions`).

Each function returns ``{parameter name: score tensor}`` for the names of :func:`prunable`; scores of weights
already masked are set to -inf so they are never chosen back.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.gradients import gradient_pass
from prunekit.core.masks import Masks, prunable
from prunekit.core.registry import Registry
from prunekit.errors import PruneError
from prunekit.vision.lrp import LrpOptions, lrp_scores

# every criterion: fn(model, names, batches, masks, seed, input_shape) -> {name: score}
CRITERIA = Registry("criterion")
DATA_FREE = ("magnitude", "random", "synflow")


def _masked(scores: dict[str, torch.Tensor], masks: Masks | None) -> dict[str, torch.Tensor]:
    if masks is None:
        return scores
    return {k: torch.where(masks[k].to(s.device), s, torch.full_like(s, -float("inf"))) for k, s in scores.items()}


def _need_batches(batches, criterion: str) -> Sequence:
    if not batches:
        raise PruneError(f"Criterion {criterion!r} needs training batches; pass a dataset (it is not data-free).")
    return batches


def magnitude_scores(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    p = dict(model.named_parameters())
    return {k: p[k].detach().abs().float().clone() for k in names}


def random_scores(model: nn.Module, names: Iterable[str], seed: int = 0) -> dict[str, torch.Tensor]:
    # offset: a generator seeded like torch.manual_seed(seed) would replay the very uniform draws of the default
    # weight init, and "random" masks would then keep exactly the positive weights of the first layer
    g = torch.Generator().manual_seed(1_000_003 + 7919 * seed)
    p = dict(model.named_parameters())
    return {k: torch.rand(p[k].shape, generator=g) for k in names}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers (BatchNorm running statistics), which a scoring forward in train mode updates."""
    return {k: b.detach().clone() for k, b in model.named_buffers()}


@torch.no_grad()
def _restore(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for k, b in model.named_buffers():
        if k in snap:
            b.copy_(snap[k])


@contextmanager
def _scoring(model: nn.Module, names: list[str], masks: Masks | None):
    """Score the (masked) network in train mode, then put back its weights, BatchNorm statistics and mode."""
    params = dict(model.named_parameters())
    was = model.training
    snap = _snapshot(model)
    model.train()
    saved = None
    if masks is not None:  # score the masked network
        saved = {k: params[k].detach().clone() for k in names}
        masks.apply(model)
    try:
        yield params
    finally:
        model.zero_grad(set_to_none=True)
        if saved is not None:
            with torch.no_grad():
                for k, v in saved.items():
                    params[k].copy_(v)
        _restore(model, snap)
        model.train(was)


def _grads(model: nn.Module, names: list[str], batches, masks: Masks | None, square: bool = False):
    """Sum over batches of the gradient (or of (g*w)^2 when ``square``) of the cross-entropy, model as given."""
    with _scoring(model, names, masks) as params:
        acc = {k: torch.zeros_like(params[k], dtype=torch.float32) for k in names}

        def add(i, p, g):
            acc[names[i]] += (g * p.detach()).float().pow(2) if square else g.float()

        gradient_pass(model, [params[k] for k in names], batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), add,
                      train=True)
    return acc


def snip_scores(model, names, batches, masks=None):
    names = list(names)
    g = _grads(model, names, _need_batches(batches, "snip"), masks)
    p = dict(model.named_parameters())
    return _masked({k: (g[k] * p[k].detach()).abs() for k in names}, masks)


def taylor_scores(model, names, batches, masks=None):
    names = list(names)
    return _masked(_grads(model, names, _need_batches(batches, "taylor"), masks, square=True), masks)


def grasp_scores(model, names, batches, masks=None, temperature: float = 200.0):
    """GraSP keep-scores w * (H g): g from the (temperature-scaled) loss without graph, then the gradient of
    g_const . grad(loss) (with graph) w.r.t. the weights."""
    names = list(names)
    batches = _need_batches(batches, "grasp")
    with _scoring(model, names, masks) as params:
        ws = [params[k] for k in names]
        g0 = [torch.zeros_like(w) for w in ws]
        for x, y in batches:
            gs = torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), ws, allow_unused=True)
            for a, g in zip(g0, gs):
                if g is not None:
                    a += g
        hg = [torch.zeros_like(w) for w in ws]
        for x, y in batches:
            gs = torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), ws, create_graph=True, allow_unused=True)
            z = sum((g * c).sum() for g, c in zip(gs, g0) if g is not None)
            out = torch.autograd.grad(z, ws, allow_unused=True)
            for a, h in zip(hg, out):
                if h is not None:
                    a += h
        scores = {k: (w.detach() * h).float() for k, w, h in zip(names, ws, hg)}
    return _masked(scores, masks)


def synflow_scores(model: nn.Module, names: Iterable[str], input_shape: Sequence[int], masks: Masks | None = None):
    """One SynFlow scoring pass (data-free): |w * dR/dw| of the positive, masked, float64 copy of the model."""
    names = list(names)
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point():
                t.abs_()
        if masks is not None:
            masks.apply(m)
    params = dict(m.named_parameters())
    for p in m.parameters():
        p.requires_grad_(True)
    x = torch.ones((1, *input_shape), dtype=torch.float64)
    r = m(x).sum()
    ws = [params[k] for k in names]
    gs = torch.autograd.grad(r, ws, allow_unused=True)
    scores = {}
    for k, w, g in zip(names, ws, gs):
        s = torch.zeros_like(w) if g is None else (w.detach() * g).abs()
        scores[k] = s.float()
    return _masked(scores, masks)


CRITERIA.register("magnitude", lambda m, n, b, masks, seed, shape: _masked(magnitude_scores(m, n), masks),
                  description="|w|")
CRITERIA.register("random", lambda m, n, b, masks, seed, shape: _masked(random_scores(m, n, seed), masks),
                  description="uniform noise (with erk: the random + ERK baseline)")
CRITERIA.register("snip", lambda m, n, b, masks, seed, shape: snip_scores(m, n, b, masks),
                  description="|g * w| on a few batches (connection sensitivity)")
CRITERIA.register("grasp", lambda m, n, b, masks, seed, shape: grasp_scores(m, n, b, masks),
                  description="w * (H g), gradient-flow preservation")
CRITERIA.register("synflow", lambda m, n, b, masks, seed, shape: _synflow(m, n, masks, shape),
                  description="data-free |w * dR/dw| of the all-positive model (iterative)")
CRITERIA.register("taylor", lambda m, n, b, masks, seed, shape: taylor_scores(m, n, b, masks),
                  description="sum over batches of (g * w)^2 at trained weights")
CRITERIA.register("lrp", lambda m, n, b, masks, seed, shape, **opts: _lrp(m, n, b, masks, opts), params=LrpOptions,
                  description="absolute LRP relevance of each weight on reference samples (Yeom et al. 2021; "
                              "options rule epsilon|alpha-beta, alpha, epsilon)")


def _lrp(model, names, batches, masks, opts):
    return _masked(lrp_scores(model, names, _need_batches(batches, "lrp"), masks, **opts), masks)


def _synflow(model, names, masks, input_shape):
    if input_shape is None:
        raise PruneError("SynFlow needs the input shape (e.g. 1,28,28); pass input_shape.")
    return synflow_scores(model, names, input_shape, masks)


def score(model: nn.Module, criterion: str, names: Iterable[str] | None = None, batches=None,
          masks: Masks | None = None, seed: int = 0, input_shape: Sequence[int] | None = None,
          options: dict | None = None):
    """Scores of one criterion (see the module docstring). ``synflow`` here is a single pass; use
    :func:`prunekit.vision.schedules.compute_masks` for the iterative procedure."""
    fn = CRITERIA.get(criterion).impl
    names = list(names) if names is not None else list(prunable(model))
    if options:  # the criterion's own options (its params, e.g. lrp's rule)
        return fn(model, names, batches, masks, seed, input_shape, **options)
    return fn(model, names, batches, masks, seed, input_shape)

"""GraNd (Paul et al. 2021): the norm of the per-example loss gradient, early in training (``epochs`` 0 = at
initialization, as in the paper), averaged over seeds.

``grand_params="all"``: exact per-example gradients of every parameter (torch.func vmap over the batch).
``grand_params="last"``: the classifier layer only, in closed form: ||p - y|| * sqrt(||h||^2 + 1).
"""

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.data.scores import SCORES, ScoreResult
from prunekit.data.scores._dynamics import probs_after, run_seeds
from prunekit.errors import PruneError


def _norms_all(model, x, y, batch=256):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi[None],))
        return F.cross_entropy(out, yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))
    out = []
    for s in range(0, len(x), batch):
        gs = g(params, x[s:s + batch], y[s:s + batch])
        out.append(torch.sqrt(sum(v.pow(2).flatten(1).sum(1) for v in gs.values())))
    return torch.cat(out).numpy()


def _make_task(which):
    def _task(x, y, num_classes, tcfg):
        p, model = probs_after(x, y, num_classes, tcfg)
        if which == "all":
            return _norms_all(model, x, y)
        with torch.no_grad():
            h = torch.cat([model.embed(x[s:s + 1024]) for s in range(0, len(x), 1024)])
        return ((p - F.one_hot(y, num_classes).float()).norm(dim=1) * torch.sqrt(h.pow(2).sum(1) + 1)).numpy()
    return _task


_TASKS = {"all": _make_task("all"), "last": _make_task("last")}


@SCORES.register("grand", description="GraNd: gradient norm early in training", needs_labels=True)
def score(ds, cfg, engine=None, progress=False):
    if cfg.grand_params not in _TASKS:
        raise PruneError(f"Unknown --grand-params {cfg.grand_params!r}; use all or last.")
    epochs = 2 if cfg.epochs is None else cfg.epochs
    runs = run_seeds(_TASKS[cfg.grand_params], ds, cfg, engine, epochs, progress, "grand")
    return ScoreResult("grand", np.asarray(runs).mean(0), info={"epochs": epochs, "runs": len(runs), "params": cfg.grand_params})

"""AUM (Pleiss et al. 2020): area under the margin, the mean over training of (assigned-label logit - largest
other logit), from the minibatch logits of every epoch. Low AUM = likely mislabeled; reported as -AUM so
that higher = harder. Averaged over ``seeds`` runs of ``epochs``."""

import numpy as np
import torch

from prunekit.data.scores import SCORES, ScoreResult
from prunekit.data.scores._dynamics import run_seeds
from prunekit.data.train import fit


def _task(x, y, num_classes, tcfg):
    total = torch.zeros(len(x), dtype=torch.float64)
    count = torch.zeros(len(x))

    def on_batch(epoch, idx, logits):
        assigned = logits.gather(1, y[idx, None])[:, 0]
        other = logits.scatter(1, y[idx, None], float("-inf")).max(1).values
        total[idx] += (assigned - other).double()
        count[idx] += 1

    fit(x, y, num_classes, tcfg, on_batch=on_batch)
    return (-(total / count.clamp_min(1))).numpy()


@SCORES.register("aum", description="-AUM: area under the margin", needs_labels=True)
def score(ds, cfg, engine=None, progress=False):
    epochs = 6 if cfg.epochs is None else cfg.epochs
    runs = run_seeds(_task, ds, cfg, engine, epochs, progress, "aum")
    return ScoreResult("aum", np.asarray(runs).mean(0), info={"epochs": epochs, "runs": len(runs)})

"""Forgetting events (Toneva et al. 2019): how often an example goes from correctly to incorrectly classified
between two presentations during training (minibatch predictions). Examples never learned count as the most
forgotten (epochs + 1, as in the paper's ranking). Averaged over ``seeds`` runs of ``epochs``."""

import numpy as np
import torch

from prunekit.data.scores import SCORES, ScoreResult
from prunekit.data.scores._dynamics import run_seeds
from prunekit.data.train import fit


def _task(x, y, num_classes, tcfg):
    n = len(x)
    prev = torch.zeros(n, dtype=torch.bool)
    forgets = torch.zeros(n)
    learned = torch.zeros(n, dtype=torch.bool)

    def on_batch(epoch, idx, logits):
        ok = logits.argmax(1) == y[idx]
        forgets[idx] += (prev[idx] & ~ok).float()
        learned[idx] |= ok
        prev[idx] = ok

    fit(x, y, num_classes, tcfg, on_batch=on_batch)
    return torch.where(learned, forgets, torch.full_like(forgets, tcfg.epochs + 1)).numpy()


@SCORES.register("forgetting", description="forgetting events over training", needs_labels=True)
def score(ds, cfg, engine=None, progress=False):
    epochs = 6 if cfg.epochs is None else cfg.epochs
    runs = run_seeds(_task, ds, cfg, engine, epochs, progress, "forgetting")
    # ties are many (integer counts): the mean over runs breaks some of them
    return ScoreResult("forgetting", np.asarray(runs).mean(0), info={"epochs": epochs, "runs": len(runs)})

"""EL2N (Paul et al. 2021): || softmax(f(x)) - onehot(y) ||_2 after a few epochs, averaged over seeds."""

import torch.nn.functional as F

from prunekit.data.scores import SCORES, ScoreResult
from prunekit.data.scores._dynamics import probs_after, run_seeds


def _task(x, y, num_classes, tcfg):
    p, _ = probs_after(x, y, num_classes, tcfg)
    return (p - F.one_hot(y, num_classes).float()).norm(dim=1).numpy()


@SCORES.register("el2n", description="EL2N: error norm early in training", needs_labels=True)
def score(ds, cfg, engine=None, progress=False):
    epochs = 2 if cfg.epochs is None else cfg.epochs
    runs = run_seeds(_task, ds, cfg, engine, epochs, progress, "el2n")
    return ScoreResult("el2n", runs.mean(0), info={"epochs": epochs, "runs": len(runs)})

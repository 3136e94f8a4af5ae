"""Entropy of the predicted class distribution after a few epochs, averaged over seeds (uncertainty)."""

from prunekit.data.scores import SCORES, ScoreResult
from prunekit.data.scores._dynamics import probs_after, run_seeds


def _task(x, y, num_classes, tcfg):
    p, _ = probs_after(x, y, num_classes, tcfg)
    return -(p * p.clamp_min(1e-12).log()).sum(1).numpy()


@SCORES.register("entropy", description="entropy of the predictions", needs_labels=True)
def score(ds, cfg, engine=None, progress=False):
    epochs = 2 if cfg.epochs is None else cfg.epochs
    runs = run_seeds(_task, ds, cfg, engine, epochs, progress, "entropy")
    return ScoreResult("entropy", runs.mean(0), info={"epochs": epochs, "runs": len(runs)})

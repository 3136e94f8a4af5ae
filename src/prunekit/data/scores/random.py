"""Random scores: a seeded uniform draw per example (the baseline every selection must beat)."""

import numpy as np

from prunekit.data.scores import SCORES, ScoreResult


@SCORES.register("random", description="a seeded uniform draw (the baseline)", needs_labels=False)
def score(ds, cfg, engine=None, progress=False):
    return ScoreResult("random", np.random.default_rng(cfg.seed).random(len(ds)))

"""Data pruning: score every training example, select the subset to keep, train on it (issue 5).

Python API (mirrors ``prunekit data score|select|train``)::

    from prunekit import data
    ds = data.load_dataset("fashion-mnist")
    res = data.score(ds, "el2n")                       # ScoreResult, .values[i] = difficulty of example i
    data.save_scores("scores.parquet", ds, res)
    keep = data.select(res.values, 0.3, "ccs", beta=0.1, labels=ds.y)
    data.save_keep("keep.parquet", keep, len(ds), ...)
    out = data.train_subset(ds, keep, data.TrainConfig(), test=data.load_dataset("fashion-mnist", "test"), distill=True)

Also: ``data.select.validation_split`` + ``train_subset(val=...)`` (early stopping, never on the test set);
``data.ssl`` (a SimCLR encoder trained on the data itself: ``--encoder simclr`` prototypes); ``data.transfer``
(DP4TL: prune a source data set for a target task); ``data.compose`` (prune-combine-augment under a byte budget).
"""

from __future__ import annotations

from prunekit.data.datasets import DataSet, load_dataset
from prunekit.data.files import load_keep, load_scores, save_keep, save_scores
from prunekit.data.scores import SCORES, ScoreConfig, ScoreResult
from prunekit.data.select import STRATEGIES, select
from prunekit.data.train import TrainConfig, train_subset


def score(ds, name: str, cfg: ScoreConfig | None = None, *, engine="local", address: str | None = None,
          with_embeddings: bool = False, progress: bool = False) -> ScoreResult:
    """One float per example (higher = harder). ``with_embeddings`` adds cluster ids and embeddings to any
    score (``prototype`` always has them), which ``dbp`` and ``semdedup`` selections need."""
    from prunekit.data.engine import get_engine
    from prunekit.data.scores import compute

    cfg = cfg or ScoreConfig()
    eng = get_engine(engine, address)
    res = compute(name, ds, cfg, engine=eng, progress=progress)
    if with_embeddings and "embedding" not in res.extra:
        proto = compute("prototype", ds, cfg, engine=eng, progress=progress)
        res.extra.update(proto.extra)
        res.extra["centroid_distance"] = proto.values
        res.info["embeddings"] = proto.info
    return res


__all__ = ["DataSet", "load_dataset", "score", "select", "train_subset", "save_scores", "load_scores", "save_keep",
           "load_keep", "ScoreConfig", "ScoreResult", "TrainConfig", "SCORES", "STRATEGIES"]

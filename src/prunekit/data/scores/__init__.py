"""Per-example difficulty scores. One interface: ``score(ds, cfg, engine) -> ScoreResult`` with one float per
example, higher = harder (or, for ``prototype``, farther from the nearest k-means centroid = less typical).

``random``; ``el2n`` and ``grand`` (Paul et al. 2021, early in training, averaged over seeds); ``forgetting``
(Toneva et al. 2019); ``aum`` (Pleiss et al. 2020, reported as -AUM); ``entropy`` of the predictions;
``prototype`` (Sorscher et al. 2022, self-supervised prototype distance; labels not needed).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field

import numpy as np

from prunekit.errors import PruneError

SCORES = ("random", "el2n", "grand", "forgetting", "aum", "entropy", "prototype")
LABEL_FREE = ("random", "prototype")


@dataclass
class ScoreConfig:
    seed: int = 0
    seeds: int = 3  # short runs averaged (el2n, grand, entropy)
    epochs: int | None = None  # default: 2 for el2n/grand/entropy ("early"), 6 for forgetting/aum (whole run)
    model: str = "auto"  # cnn for images, mlp for vectors / text embeddings
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 16
    grand_params: str = "all"  # all parameters (exact per-example gradients) or last layer (closed form)
    encoder: str = "auto"
    clusters: int | None = None  # prototype: default = number of classes (10 without labels)
    embed_dim: int = 64
    image_size: int = 64

    def to_dict(self):
        return asdict(self)


@dataclass
class ScoreResult:
    name: str
    values: np.ndarray  # [N] float64, higher = harder
    extra: dict = field(default_factory=dict)  # optional per-example columns (cluster, distance, embedding)
    info: dict = field(default_factory=dict)


def compute(name: str, ds, cfg: ScoreConfig | None = None, *, engine=None, progress: bool = False) -> ScoreResult:
    if name not in SCORES:
        raise PruneError(f"Unknown score {name!r}; use one of {', '.join(SCORES)}.")
    if len(ds) < 2:
        raise PruneError("The data set has fewer than 2 examples; give a larger one.")
    if name not in LABEL_FREE:
        ds.require_labels(f"The {name} score")
    mod = importlib.import_module(f"prunekit.data.scores.{name}")
    from prunekit.data.engine import get_engine

    res = mod.score(ds, cfg or ScoreConfig(), engine=get_engine(engine), progress=progress)
    v = np.asarray(res.values, dtype=np.float64)
    if v.shape != (len(ds),) or not np.isfinite(v).all():
        raise RuntimeError(f"score {name} returned {v.shape} values with non-finite entries")
    res.values = v
    return res

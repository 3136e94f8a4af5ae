"""Per-example difficulty scores. One interface: ``score(ds, cfg, engine) -> ScoreResult`` with one float per
example, higher = harder (or, for ``prototype``, farther from the nearest k-means centroid = less typical).

``random``; ``el2n`` and ``grand`` (Paul et al. 2021, early in training, averaged over seeds); ``forgetting``
(Toneva et al. 2019); ``aum`` (Pleiss et al. 2020, reported as -AUM); ``entropy`` of the predictions;
``prototype`` (Sorscher et al. 2022, self-supervised prototype distance; labels not needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import model_validator

from prunekit.core.config import Config
from prunekit.core.registry import Registry
from prunekit.errors import PruneError


def _load_scores() -> None:
    """Every module of this package registers its score (``@SCORES.register(name, needs_labels=...)``)."""
    import importlib
    import pkgutil

    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


SCORES = Registry("score", loader=_load_scores)


class ScoreConfig(Config):
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
    ssl_steps: int = 1500  # encoder simclr: training steps of the self-supervised encoder (prunekit.data.ssl)

    what = "data score"
    flags = True

    def to_dict(self):
        return self.model_dump()

    @model_validator(mode="after")
    def _valid(self):
        from prunekit.data.train import model_name

        self.model = model_name(self.model)
        self.check()
        return self

    def check(self, n: int | None = None) -> None:
        """One sentence for a value no score can use (``n``: examples in the data set)."""
        _check_ints(self, ("seed", 0), ("seeds", 1), ("batch_size", 1), ("width", 1), ("embed_dim", 1), ("image_size", 1),
                    ("ssl_steps", 1))
        if self.epochs is not None and self.epochs < 0:
            raise PruneError(f"--epochs must be 0 or more, got {self.epochs}.")
        if self.clusters is not None:
            if self.clusters < 1:
                raise PruneError(f"--clusters must be at least 1, got {self.clusters}.")
            if n is not None and self.clusters > n:
                raise PruneError(f"--clusters {self.clusters} is more than the {n} examples; use at most {n}.")
        _check_positive(self, "lr")
        from prunekit.data.embed import ENCODERS

        from prunekit.data.train import CHOICES

        _check_choice("model", self.model, CHOICES)
        _check_choice("encoder", self.encoder, ENCODERS)
        _check_choice("grand-params", self.grand_params, ("all", "last"))


def _check_choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise PruneError(f"Unknown --{flag} {value!r}; use one of {', '.join(choices)}.")


def _check_ints(cfg, *limits) -> None:
    for name, low in limits:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise PruneError(f"--{name.replace('_', '-')} must be an integer of at least {low}, got {v}.")


def _check_positive(cfg, *names) -> None:
    import math

    for name in names:
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise PruneError(f"--{name.replace('_', '-')} must be a positive finite number, got {v}.")


@dataclass
class ScoreResult:
    name: str
    values: np.ndarray  # [N] float64, higher = harder
    extra: dict = field(default_factory=dict)  # optional per-example columns (cluster, distance, embedding)
    info: dict = field(default_factory=dict)


def compute(name: str, ds, cfg: ScoreConfig | None = None, *, engine=None, progress: bool = False) -> ScoreResult:
    entry = SCORES.get(name)
    if len(ds) < 2:
        raise PruneError("The data set has fewer than 2 examples; give a larger one.")
    cfg = cfg or ScoreConfig()
    cfg.check(len(ds))
    if name in ("el2n", "entropy", "forgetting", "aum") and cfg.epochs == 0:
        raise PruneError(f"The {name} score needs at least 1 training epoch (only grand is defined at initialization).")
    if entry.meta.get("needs_labels", True):
        ds.require_labels(f"The {name} score")
    from prunekit.data.engine import get_engine

    res = entry.impl(ds, cfg, engine=get_engine(engine), progress=progress)
    v = np.asarray(res.values, dtype=np.float64)
    if v.shape != (len(ds),):
        raise RuntimeError(f"score {name} returned {v.shape} values for {len(ds)} examples")
    if not np.isfinite(v).all():
        raise PruneError(
            f"The {name} score came out non-finite for {int((~np.isfinite(v)).sum())} examples (training diverged); "
            "lower --lr or check the data."
        )
    res.values = v
    return res

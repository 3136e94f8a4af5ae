"""prunekit: prune neural networks and their training data, with the methods of the literature, measured honestly."""

__version__ = "0.1.0"

from prunekit.api import evaluate, prune  # noqa: E402
from prunekit.batches import calibration_batches, evaluation_windows, tokenize  # noqa: E402
from prunekit.errors import PruneError  # noqa: E402
from prunekit.io import load, save  # noqa: E402
from prunekit.recipe import Recipe  # noqa: E402
from prunekit.report import Report  # noqa: E402
from prunekit.train import recover  # noqa: E402
from prunekit.zoo import load_model, load_text  # noqa: E402

__all__ = [
    "PruneError",
    "Recipe",
    "Report",
    "calibration_batches",
    "evaluate",
    "evaluation_windows",
    "load",
    "load_model",
    "load_text",
    "prune",
    "recover",
    "save",
    "tokenize",
]

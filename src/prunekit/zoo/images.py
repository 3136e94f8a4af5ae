"""Image datasets that work offline.

``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), idx
files in ``/usr/share/datasets/fashion-mnist`` (or ``$PRUNEKIT_FASHION_MNIST``). 60k train + 10k test 28x28 grey
images, 10 classes.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from prunekit.errors import PruneError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the ``train`` (60k) or ``test`` (10k) split."""
    if split not in ("train", "test"):
        raise PruneError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}.")
    folder = Path(os.environ.get("PRUNEKIT_FASHION_MNIST", FASHION_DIR))
    prefix = "train" if split == "train" else "t10k"
    images, labels = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise PruneError(f"Fashion-MNIST is not in {folder}; run `apt-get install dataset-fashion-mnist` "
                         "(or set PRUNEKIT_FASHION_MNIST to a folder with the idx .gz files).")
    x, y = _idx(images), _idx(labels)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))

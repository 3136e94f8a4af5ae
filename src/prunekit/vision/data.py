"""The vision family's data: Fashion-MNIST (the bundled Debian package, via :mod:`prunekit.zoo.images`) and a tiny
synthetic task for tests, as normalized float tensors; seeded score batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunekit.errors import PruneError

DATASETS = ("fashion-mnist", "synthetic")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def load_data(dataset: str = "fashion-mnist", train_subset: int | None = None, test_subset: int | None = None,
              seed: int = 0, image_size: int | None = None, rgb: bool = False) -> dict:
    """Normalized float tensors {x_train, y_train, x_test, y_test}; ``synthetic`` is a tiny learnable task for
    tests (random images, labels from a fixed random linear map)."""
    g = torch.Generator().manual_seed(seed)
    if dataset == "fashion-mnist":
        from prunekit.zoo.images import fashion_mnist

        xtr, ytr = fashion_mnist("train")
        xte, yte = fashion_mnist("test")
        perm = torch.randperm(len(xtr), generator=g)
        if train_subset:
            perm = perm[:train_subset]
        xtr, ytr = xtr[perm], ytr[perm]
        if test_subset:
            xte, yte = xte[:test_subset], yte[:test_subset]
        xtr = ((xtr.float() / 255 - FASHION_MEAN) / FASHION_STD)[:, None]
        xte = ((xte.float() / 255 - FASHION_MEAN) / FASHION_STD)[:, None]
    elif dataset == "synthetic":
        n_tr, n_te = train_subset or 512, test_subset or 256
        protos = torch.randn(10, 1, 7, 7, generator=torch.Generator().manual_seed(1234))
        protos = F.interpolate(protos, size=(28, 28), mode="bilinear", align_corners=False)
        ytr = torch.randint(0, 10, (n_tr,), generator=g)
        yte = torch.randint(0, 10, (n_te,), generator=g)
        xtr = protos[ytr] + 0.8 * torch.randn(n_tr, 1, 28, 28, generator=g)
        xte = protos[yte] + 0.8 * torch.randn(n_te, 1, 28, 28, generator=g)
    else:
        raise PruneError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    if image_size and image_size != xtr.shape[-1]:
        xtr = F.interpolate(xtr, size=(image_size, image_size), mode="bilinear", align_corners=False)
        xte = F.interpolate(xte, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if rgb:
        xtr, xte = xtr.expand(-1, 3, -1, -1).contiguous(), xte.expand(-1, 3, -1, -1).contiguous()
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def batches_of(data: dict, n: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 7)
    idx = torch.randperm(len(data["y_train"]), generator=g)[: n * batch_size]
    return [(data["x_train"][i], data["y_train"][i]) for i in idx.split(batch_size)]

"""Prune, combine, augment (PCA; Xiao & He 2024, "Rethinking Large-scale Dataset Compression: Shifting Focus From
Labels to Images"): under a storage budget (bytes of uint8 images kept), select images by score, store several
downsampled images tiled into one canvas of the original size, and train a student on random resized crops of the
canvases with soft labels that the teacher gives each augmented batch.

API::

    canvases, sources = combine(images, factor)        # factor x factor tiles per canvas; sources: original indices
    n = images_within(budget_bytes, images.shape[1:], factor)   # images that fit the budget at that factor
    stored_bytes(canvases)                              # the bytes actually kept
    student = train_student(canvases, 10, cfg, teacher=teacher, augment=True, stats_from=x_all)
    student = train_student(images, 10, cfg, labels=y)  # the baseline: hard labels, full resolution

Only the images count towards the budget: soft labels come from the teacher at training time, so no labels are
stored; ``sources`` is bookkeeping for analysis, not training data.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from prunekit.errors import PruneError


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise PruneError(f"Images must be a uint8 array [N, H, W] or [N, H, W, C], got {images.dtype} with shape "
                         f"{images.shape}.")
    return images


def _check_factor(factor, shape) -> int:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise PruneError(f"The combine factor must be a whole number of at least 1, got {factor!r}.")
    h, w = int(shape[0]), int(shape[1])
    if factor > min(h, w):
        raise PruneError(f"A combine factor of {factor} leaves no pixel per tile of a {h}x{w} image; use at most "
                         f"{min(h, w)}.")
    return int(factor)


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """Area-average downsampling of uint8 images by ``factor`` to ``(H // factor, W // factor)``, rounded to the
    nearest integer (for an ``H`` not divisible by ``factor`` the pooling windows are torch's adaptive ones)."""
    images = _check_images(images)
    factor = _check_factor(factor, images.shape[1:3])
    if factor == 1:
        return images.copy()
    h, w = images.shape[1] // factor, images.shape[2] // factor
    x = torch.from_numpy(np.ascontiguousarray(images)).double()
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    y = F.adaptive_avg_pool2d(x, (h, w)).round_().clamp_(0, 255).to(torch.uint8)
    y = y[:, 0] if images.ndim == 3 else y.permute(0, 2, 3, 1)
    return np.ascontiguousarray(y.numpy())


def combine(images: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile ``factor x factor`` area-downsampled images into canvases of the original size.

    Canvas ``j`` holds images ``j * factor**2 ...`` in row-major tile order; ``sources[j, t]`` is the original
    index in tile ``t`` (-1 for an empty slot of the last canvas, left black, as is any border that ``H % factor``
    leaves). ``factor`` 1 returns the images unchanged. Returns ``(canvases uint8 [M, H, W(, C)], sources
    int64 [M, factor**2])``."""
    images = _check_images(images)
    factor = _check_factor(factor, images.shape[1:3])
    n, per = len(images), factor * factor
    if n == 0:
        raise PruneError("There are no images to combine; select at least one.")
    m = math.ceil(n / per)
    sources = np.full(m * per, -1, dtype=np.int64)
    sources[:n] = np.arange(n)
    sources = sources.reshape(m, per)
    if factor == 1:
        return images.copy(), sources
    small = downsample(images, factor)
    th, tw = small.shape[1], small.shape[2]
    canvases = np.zeros((m,) + images.shape[1:], dtype=np.uint8)
    for t in range(per):
        r, c = divmod(t, factor)
        idx = sources[:, t]
        ok = idx >= 0
        canvases[ok, r * th:(r + 1) * th, c * tw:(c + 1) * tw] = small[idx[ok]]
    return canvases, sources


def stored_bytes(*arrays: np.ndarray) -> int:
    """The bytes actually kept: the sum of ``nbytes`` of the stored arrays (canvases or full-resolution images)."""
    return int(sum(np.asarray(a).nbytes for a in arrays))


def images_within(budget_bytes: int, image_shape, factor: int = 1, itemsize: int = 1) -> int:
    """How many source images fit ``budget_bytes`` when ``factor x factor`` of them share one canvas of
    ``image_shape`` (``(H, W)`` or ``(H, W, C)``, ``itemsize`` bytes a value): whole canvases only, each full."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise PruneError(f"The image shape must be (H, W) or (H, W, C) with positive sizes, got {image_shape}.")
    factor = _check_factor(factor, shape)
    per_canvas = int(np.prod(shape)) * int(itemsize)
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer, float)) \
            or not math.isfinite(budget_bytes) or budget_bytes < per_canvas:
        raise PruneError(f"The storage budget must be at least one image ({per_canvas:,} bytes), got {budget_bytes}.")
    return int(budget_bytes // per_canvas) * factor * factor


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3),
                        flip: bool = True) -> torch.Tensor:
    """A batch of random resized crops (area fraction in ``scale``, aspect ratio log-uniform in ``ratio``), each
    resampled bilinearly to the input size and mirrored left-right with probability 1/2 when ``flip``: one
    ``grid_sample`` over the batch ``[N, C, H, W]``."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    w, h = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _as_input(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    from prunekit.data.datasets import DataSet
    from prunekit.data.train import features

    return features(DataSet("stored", "image", _check_images(x)))


def train_student(stored, num_classes: int, cfg, *, labels=None, teacher: nn.Module | None = None,
                  augment: bool = False, scale=(0.25, 1.0), flip: bool = True, model: nn.Module | None = None,
                  stats_from: torch.Tensor | None = None, progress: bool = False) -> nn.Module:
    """Train a student on ``stored`` (uint8 images/canvases, or model inputs ``[N, C, H, W]``) for ``cfg.steps``
    steps (or ``cfg.epochs``): :func:`prunekit.data.train.fit` with a teacher on every (augmented) batch.

    Targets: ``teacher`` alone gives soft labels (``kd_loss`` at ``cfg.temperature``) computed on each batch as the
    student sees it (after augmentation); ``labels`` alone, cross-entropy; both, ``(1 - alpha) CE + alpha KD``.
    ``augment``: :func:`random_resized_crop` (``scale``, ``flip``) on every batch. ``model``: train this model (e.g.
    a pre-trained one with a new head: fine-tuning) instead of a fresh ``cfg.model``; ``stats_from``: inputs whose
    per-channel mean/std standardize a fresh model (default: ``stored``). Deterministic for ``cfg.seed``."""
    from prunekit.data.train import fit

    cfg.check()
    if labels is None and teacher is None:
        raise PruneError("Training a student needs labels or a teacher (soft labels); give one of them.")
    x = _as_input(stored)
    if len(x) == 0:
        raise PruneError("There is nothing stored to train on; keep at least one image.")
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if labels.shape != (len(x),):
            raise PruneError(f"There are {len(labels)} labels for {len(x)} stored images; give one label per image.")
    if augment and x.dim() != 4:
        raise PruneError("Augmentation (random resized crops) needs images; train vectors with augment=False.")
    lo, hi = float(scale[0]), float(scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise PruneError(f"The crop scale must be 0 < low <= high <= 1, got {tuple(scale)}.")

    def crop(xb, g):
        return random_resized_crop(xb, g, (lo, hi), flip=flip)

    return fit(x, labels, num_classes, cfg, teacher=teacher, transform=crop if augment else None, model=model,
               stats_from=stats_from, progress=progress, desc="student")

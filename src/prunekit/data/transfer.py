"""Dataset pruning for transfer learning (DP4TL; Zhang et al., NeurIPS 2023, "Selectivity Drives Productivity:
Efficient Dataset Pruning for Enhanced Transfer Learning"): prune the *source* data set before pre-training, keeping
the parts of it that the *target* task maps to. A source model (trained on the whole source) looks at the target:

* label mapping (LM): every target training image votes for the source class its top-1 prediction falls in
  (``soft``: each adds its softmax over the source classes instead); whole source classes are kept from the most
  voted down until the budget, the last one partially (a seeded random part);
* feature mapping (FM): k-means clusters of the source examples' embeddings (``model.embed``) are ranked by the
  distance from their centroid to the nearest k-means centroid of the target embeddings; the closest clusters are
  kept until the budget, the last one partially.

The budget is ``round(keep * N)`` source examples; random source pruning (``select(..., "random")``) is the
baseline. API::

    keep = label_mapping_keep(source_logits_on_target, source_labels, 0.3, seed=0, soft=False)
    keep = feature_mapping_keep(source_features, target_features, 0.3, clusters=50, target_clusters=10, seed=0)
    groups, dist = feature_mapping_rank(source_features, target_features)    # cluster once, then any budget:
    keep = keep_groups(groups, dist, 0.3, seed=0)
    res = select_for_target(source_ds, target_ds, "label", 0.3)    # trains the source model, then maps
    model = finetune(pretrained, x_target, y_target, num_classes, cfg)  # new head, every weight trained

CLI: ``prunekit data select-for-target SOURCE --target TARGET --method label|feature --keep 0.3 --out keep.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prunekit.errors import PruneError

METHODS = ("label", "feature")


def _keep_groups(order: np.ndarray, groups: np.ndarray, keep: float, seed: int) -> np.ndarray:
    """Whole groups in ``order`` until ``round(keep * N)`` examples; the group that does not fit is sampled."""
    from prunekit.data.select import budget

    m = budget(len(groups), keep)
    rng = np.random.default_rng(seed)
    out, left = [], m
    for gid in order:
        if left == 0:
            break
        members = np.flatnonzero(groups == gid)
        if len(members) <= left:
            out.append(members)
            left -= len(members)
        else:
            out.append(rng.choice(members, size=left, replace=False))
            left = 0
    return np.sort(np.concatenate(out)) if out else np.empty(0, dtype=np.int64)


def _rank(values: np.ndarray, seed: int, descending: bool) -> np.ndarray:
    from prunekit.data.select import _order

    return _order(np.asarray(values, dtype=np.float64), seed, descending)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PruneError(f"The seed must be an integer of at least 0, got {seed!r}.")
    return int(seed)


def label_frequency(source_logits_on_target, num_classes: int, soft: bool = False) -> np.ndarray:
    """Per source class, how many target images the source model maps to it (top-1 counts, or with ``soft`` the
    summed softmax probability)."""
    z = np.asarray(source_logits_on_target, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] != num_classes:
        raise PruneError(f"The source logits on the target must be [target images, {num_classes} source classes], "
                         f"got shape {z.shape}.")
    if not np.isfinite(z).all():
        raise PruneError("The source logits on the target hold NaN or Inf; check the source model.")
    if soft:
        p = np.exp(z - z.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True)).sum(0)
    return np.bincount(z.argmax(1), minlength=num_classes).astype(np.float64)


def label_mapping_keep(source_logits_on_target, source_labels, keep: float, seed: int = 0,
                       soft: bool = False) -> np.ndarray:
    """DP4TL label mapping: sorted indices of the source examples kept (see the module docstring). Classes that tie
    on frequency are ordered by the seed."""
    from prunekit.data.select import check_keep

    seed = _check_seed(seed)
    check_keep(keep)
    labels = np.asarray(source_labels)
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise PruneError("The source labels must be a non-empty 1-d array of class ids 0, 1, ...")
    z = np.asarray(source_logits_on_target)
    num_classes = z.shape[1] if z.ndim == 2 else -1
    if labels.max() >= num_classes:
        raise PruneError(f"The source labels go up to {int(labels.max())} but the logits have {num_classes} "
                         "classes; give the logits of the model trained on these labels.")
    return keep_groups(labels, label_frequency(z, num_classes, soft), keep, seed, descending=True)


def feature_mapping_rank(source_features, target_features, clusters: int = 50, target_clusters: int = 10,
                         seed: int = 0, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The clustering behind :func:`feature_mapping_keep`: ``(cluster id of every source example, distance from each
    source centroid to the nearest target centroid)``. ``clusters`` source clusters (at most N);
    ``target_clusters`` target centroids (at most the target size; 1 = the mean target feature); ``max_iter`` Lloyd
    iterations of each k-means at most."""
    from prunekit.data.clusters import kmeans

    seed = _check_seed(seed)
    s, t = np.asarray(source_features, dtype=np.float64), np.asarray(target_features, dtype=np.float64)
    if s.ndim != 2 or t.ndim != 2 or len(s) == 0 or len(t) == 0 or s.shape[1] != t.shape[1]:
        raise PruneError(f"Source and target features must be non-empty [N, d] arrays of the same width, got "
                         f"{s.shape} and {t.shape}.")
    if not (np.isfinite(s).all() and np.isfinite(t).all()):
        raise PruneError("The source or target features hold NaN or Inf; check the source model.")
    for name, k in (("clusters", clusters), ("target clusters", target_clusters), ("k-means iterations", max_iter)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise PruneError(f"The number of {name} must be at least 1, got {k!r}.")
    src = kmeans(s, min(int(clusters), len(s)), seed=seed, max_iter=int(max_iter))
    cents_t = kmeans(t, min(int(target_clusters), len(t)), seed=seed, max_iter=int(max_iter)).centroids
    return src.labels, np.sqrt(((src.centroids[:, None] - cents_t[None]) ** 2).sum(-1)).min(1)


def keep_groups(groups, group_scores, keep: float, seed: int = 0, descending: bool = False) -> np.ndarray:
    """Sorted indices of the examples in whole groups (``groups[i]`` = the group id of example ``i``, ids
    ``0..len(group_scores) - 1``), taken in the order of ``group_scores`` (lowest first, or highest with
    ``descending``; ties by the seed) until ``round(keep * N)`` examples; the group that does not fit whole gives a
    seeded random part."""
    from prunekit.data.select import check_keep

    seed = _check_seed(seed)
    check_keep(keep)
    groups, scores = np.asarray(groups), np.asarray(group_scores, dtype=np.float64)
    if scores.ndim != 1 or not np.isfinite(scores).all():
        raise PruneError("The group scores must be a 1-d array of finite numbers, one per group.")
    if groups.ndim != 1 or len(groups) == 0 or not np.issubdtype(groups.dtype, np.integer) \
            or groups.min() < 0 or groups.max() >= len(scores):
        raise PruneError(f"The group ids must be a non-empty 1-d array of integers in 0..{len(scores) - 1}, one per "
                         "example.")
    return _keep_groups(_rank(scores, seed, descending), groups, keep, seed)


def feature_mapping_keep(source_features, target_features, keep: float, clusters: int = 50,
                         target_clusters: int = 10, seed: int = 0, max_iter: int = 100) -> np.ndarray:
    """DP4TL feature mapping: sorted indices of the source examples kept, the clusters closest to the target first
    (see the module docstring and :func:`feature_mapping_rank` for the options)."""
    from prunekit.data.select import check_keep

    check_keep(keep)
    groups, dist = feature_mapping_rank(source_features, target_features, clusters, target_clusters, seed, max_iter)
    return keep_groups(groups, dist, keep, seed)


def match_images(x: np.ndarray, shape) -> np.ndarray:
    """uint8 images resized (bilinear, antialiased when shrinking) to ``shape`` = ``(H, W)`` or ``(H, W, C)`` of
    another data set; gray becomes RGB by repetition, RGB becomes gray by the channel mean."""
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise PruneError(f"Images must be uint8 [N, H, W] or [N, H, W, C], got {x.dtype} {x.shape}.")
    shape = tuple(int(s) for s in shape)
    h, w, c = shape[0], shape[1], (shape[2] if len(shape) == 3 else 0)
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    t = t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2)
    if t.shape[2:] != (h, w):
        shrink = h < t.shape[2] or w < t.shape[3]
        t = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    want = c or 1
    if t.shape[1] != want:
        if want == 1:
            t = t.mean(1, keepdim=True)
        elif t.shape[1] == 1:
            t = t.expand(-1, want, -1, -1)
        else:
            raise PruneError(f"Cannot turn {t.shape[1]}-channel images into {want} channels.")
    t = t.round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray((t[:, 0] if not c else t.permute(0, 2, 3, 1)).numpy())


@dataclass
class TargetSelection:
    """What :func:`select_for_target` chose: ``keep`` (sorted source indices), the method, ``info`` (LM: the
    per-class ``frequency``; FM: the numbers of clusters) and the source ``model`` it used."""

    keep: np.ndarray
    method: str
    info: dict = field(default_factory=dict)
    model: nn.Module | None = None


def source_inputs(source, target):
    """Model inputs ``(x_source, x_target)``: target images resized to the source's size and channels."""
    from prunekit.data.datasets import DataSet
    from prunekit.data.train import features

    if source.kind != target.kind:
        raise PruneError(f"The source holds {source.kind} data and the target {target.kind} data; give two image "
                         "data sets or two array data sets of the same width.")
    if source.kind == "image" and target.x.shape[1:] != source.x.shape[1:]:
        target = DataSet(target.name, "image", match_images(target.x, source.x.shape[1:]), y=target.y)
    xs, xt = features(source), features(target)
    if xs.shape[1:] != xt.shape[1:]:
        raise PruneError(f"Source examples have shape {tuple(xs.shape[1:])} and target examples "
                         f"{tuple(xt.shape[1:])}; give data of the same shape.")
    return xs, xt


@torch.no_grad()
def model_features(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """``model.embed`` over ``x`` in batches, as float64 numpy."""
    model.eval()
    return torch.cat([model.embed(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def select_for_target(source, target, method: str, keep: float, *, cfg=None, model: nn.Module | None = None,
                      seed: int = 0, soft: bool = False, clusters: int = 50, target_clusters: int = 10,
                      progress: bool = False) -> TargetSelection:
    """Train the source model on all of ``source`` (:func:`prunekit.data.train.fit` with ``cfg``; or use
    ``model``), run it on ``target``'s training images and keep ``keep`` of the source by ``method`` (``label`` or
    ``feature``). The target needs no labels."""
    from prunekit.data.select import check_keep
    from prunekit.data.train import TrainConfig, fit, predict

    if method not in METHODS:
        raise PruneError(f"Unknown method {method!r}; use label (label mapping) or feature (feature mapping).")
    check_keep(keep)
    seed = _check_seed(seed)
    y = torch.from_numpy(source.require_labels("Label mapping" if method == "label" else "Training the source model"))
    xs, xt = source_inputs(source, target)
    if model is None:
        model = fit(xs, y, source.num_classes, cfg or TrainConfig(seed=seed), progress=progress)
    info = {"source": source.name, "target": target.name, "target_images": len(target)}
    if method == "label":
        logits = predict(model, xt).double().numpy()
        idx = label_mapping_keep(logits, y.numpy(), keep, seed=seed, soft=soft)
        info["frequency"] = label_frequency(logits, logits.shape[1], soft).tolist()
        info["soft"] = soft
    else:
        idx = feature_mapping_keep(model_features(model, xs), model_features(model, xt), keep, clusters=clusters,
                                   target_clusters=target_clusters, seed=seed)
        info.update(clusters=clusters, target_clusters=target_clusters)
    return TargetSelection(idx, method, info, model)


def finetune(model: nn.Module, x: torch.Tensor, y, num_classes: int, cfg) -> nn.Module:
    """Fine-tune a pre-trained ``model`` (a :class:`prunekit.data.train.Standardize` around a network with an
    ``fc`` head) on the target: a fresh ``num_classes`` head (seeded by ``cfg.seed``), every weight trained for
    ``cfg.steps`` with the same optimizer and schedule as training from scratch (:func:`compose.train_student`).
    The model is changed in place and returned."""
    from prunekit.data.compose import train_student

    net = getattr(model, "net", model)
    if not isinstance(getattr(net, "fc", None), nn.Linear):
        raise PruneError("Fine-tuning needs a network with a linear head named fc (the data family's models).")
    torch.manual_seed(cfg.seed)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return train_student(x, num_classes, cfg, labels=y, model=model)

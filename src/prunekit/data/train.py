"""Train on a subset: a small CNN for images, an MLP or linear probe for feature vectors/embeddings, with
optional knowledge distillation from a teacher's soft labels (Hinton et al.; "Distilling the Knowledge in
Data Pruning", Ben-Baruch et al. 2024): loss = (1 - alpha) * CE(y) + alpha * T^2 * KL(teacher_T || student_T).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pydantic import model_validator

from prunekit.core.config import Config
from prunekit.zoo.nets import MLP, FastCNN
from prunekit.core.loop import kd_loss, make_optimizer, make_schedule, train_loop
from prunekit.errors import PruneError

MODELS = ("fast-cnn", "mlp", "linear")
CHOICES = ("auto",) + MODELS


def model_name(name: str) -> str:
    """The data family's name for a network; ``cnn`` is the spelling before the shared vocabulary (where ``cnn`` is
    the vision SmallCNN) and means ``fast-cnn`` for one more release."""
    if name == "cnn":
        import warnings

        warnings.warn("data model 'cnn' is now 'fast-cnn' (vision's 'cnn' is another network); 'cnn' will be "
                      "removed in the next release", FutureWarning, stacklevel=3)
        return "fast-cnn"
    return name


def auto_model(ds_kind: str) -> str:
    """``fast-cnn`` for images, ``mlp`` for vectors and text embeddings."""
    return "fast-cnn" if ds_kind == "image" else "mlp"


def features(ds, encoder: str = "auto", engine=None, progress: bool = False) -> torch.Tensor:
    """The model input of a data set: standardized images [N, C, H, W], or float vectors (text: embeddings)."""
    if ds.kind == "text":
        from prunekit.data.embed import embed

        return torch.from_numpy(embed(ds, encoder="minilm" if encoder == "auto" else encoder, engine=engine,
                                      progress=progress)).float()
    x = torch.from_numpy(np.ascontiguousarray(ds.x))
    if ds.kind == "image":
        x = x.float().div_(255)
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x
    return x.float().reshape(x.shape[0], -1)


def build_model(kind: str, x: torch.Tensor, num_classes: int, width: int = 16, hidden: int = 256) -> nn.Module:
    if kind not in MODELS:
        raise PruneError(f"Unknown model {kind!r}; use one of {', '.join(MODELS)}.")
    if kind == "fast-cnn":
        if x.dim() != 4:
            raise PruneError("The CNN needs images; use --model mlp or linear for feature vectors and texts.")
        return FastCNN(x.shape[1], num_classes, width)
    d = int(np.prod(x.shape[1:]))
    return MLP(d, num_classes, hidden=0 if kind == "linear" else hidden)


class TrainConfig(Config):
    model: str = "fast-cnn"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    width: int = 16
    hidden: int = 256  # the MLP's hidden units
    seed: int = 0
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the distillation term when a teacher is given
    steps: int | None = None  # a fixed number of optimizer steps instead of epochs (the same compute for any subset size)
    patience: int | None = None  # with a validation split: stop after this many checks without a better accuracy

    what = "data training"
    flags = True

    @model_validator(mode="after")
    def _valid(self):
        self.model = model_name(self.model)
        self.check()
        return self

    def check(self) -> None:
        """One sentence for a value training cannot use."""
        from prunekit.data.scores import _check_choice, _check_ints, _check_positive

        _check_choice("model", self.model, CHOICES)
        _check_ints(self, ("epochs", 1), ("batch_size", 1), ("width", 1), ("hidden", 1), ("seed", 0))
        if self.steps is not None:
            _check_ints(self, ("steps", 1))
        if self.patience is not None:
            _check_ints(self, ("patience", 1))
        _check_positive(self, "lr", "temperature")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise PruneError(f"--weight-decay must be 0 or more, got {self.weight_decay}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise PruneError(f"--alpha must be in [0, 1], got {self.alpha}.")


class Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, net: nn.Module):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = net

    def embed(self, x):
        return self.net.embed((x - self.mean) / self.std)

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def _stats(x: torch.Tensor):
    if x.dim() == 4:
        mean = x.mean((0, 2, 3), keepdim=True)[0:1]
        std = x.std((0, 2, 3), keepdim=True)[0:1].clamp_min(1e-6)
    else:
        mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    return mean, std


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: TrainConfig, *, teacher_logits: torch.Tensor | None = None,
        on_batch: Callable | None = None, progress: bool = False, stats_from: torch.Tensor | None = None,
        val: tuple[torch.Tensor, torch.Tensor] | None = None, teacher: nn.Module | None = None,
        transform: Callable | None = None, model: nn.Module | None = None, desc: str = "training") -> nn.Module:
    """Train a fresh model (or ``model``: fine-tuning) on (x, y). ``on_batch(epoch, idx, logits)`` sees every
    minibatch's logits (forgetting, AUM). ``teacher_logits`` (aligned with x) switch on distillation; ``teacher`` (a
    module) gives them on each batch as the student sees it, after ``transform(batch, generator)`` (augmentation);
    ``y`` may then be None (soft labels only). Deterministic for a seed.

    ``val = (x_val, y_val)`` (a split carved from the training data, never the test set) switches on early stopping:
    accuracy on it after every epoch (every few epochs when there are more than 40), the best checked epoch's
    weights are the ones returned, and with ``cfg.patience`` the run stops after that many checks without a better
    one. ``model.fit_info`` then says which epoch was kept."""
    if len(x) == 0:
        raise PruneError("The subset is empty; keep a larger fraction.")
    cfg.check()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    if model is None:
        mean, std = _stats(stats_from if stats_from is not None else x)
        model = Standardize(mean, std, build_model(cfg.model, x, num_classes, cfg.width, cfg.hidden))
    if teacher is not None:
        teacher.eval()
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = max(1, cfg.steps if cfg.steps else cfg.epochs * steps_per_epoch)
    epochs = math.ceil(total / steps_per_epoch)
    opt = make_optimizer(model.parameters(), "adamw", cfg.lr, cfg.weight_decay)
    sched = make_schedule(opt, "onecycle", total, pct_start=0.15)
    left = {"steps": total}
    best = {"acc": -1.0, "epoch": -1, "state": None, "stale": 0, "epochs": 0}

    every = max(1, math.ceil(epochs / 40))  # at most ~40 validation passes, however many short epochs a subset has

    def on_epoch(epoch, step, result):
        best["epochs"] = epoch + 1
        if (epoch + 1) % every and epoch + 1 != epochs:
            return
        acc = accuracy(model, *val)
        model.train()
        if acc > best["acc"]:
            best.update(acc=acc, epoch=epoch + 1, stale=0,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        else:
            best["stale"] += 1

    def epoch_batches():
        for _ in range(epochs):
            if val is not None and cfg.patience is not None and best["stale"] >= cfg.patience:
                return
            perm = torch.randperm(len(x), generator=g)
            yield _take(perm, steps_per_epoch, cfg.batch_size, left)

    def loss_fn(model, idx):
        xb = x[idx] if transform is None else transform(x[idx], g)
        logits = model(xb)
        soft = None if teacher_logits is None else teacher_logits[idx]
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(xb)
        if soft is None:
            return F.cross_entropy(logits, y[idx]), logits
        kd = kd_loss(logits, soft, cfg.temperature)
        if y is None:
            return kd, logits
        return (1 - cfg.alpha) * F.cross_entropy(logits, y[idx]) + cfg.alpha * kd, logits

    after = None
    if on_batch is not None:
        def after(step, epoch, idx, logits, loss):
            on_batch(epoch, idx, logits.detach())

    train_loop(model, opt, epoch_batches(), loss_fn, scheduler=sched, after_step=after, total=total,
               desc=desc, progress=progress, on_epoch=None if val is None else on_epoch)
    if val is not None:
        model.load_state_dict(best["state"])
        model.fit_info = {"best_epoch": best["epoch"], "epochs_run": best["epochs"], "val_accuracy": best["acc"]}
    return model.eval()


def _take(perm: torch.Tensor, steps: int, batch_size: int, left: dict):
    """The epoch's mini-batches of ``perm`` while the step budget ``left["steps"]`` lasts."""
    for s in range(steps):
        if left["steps"] == 0:
            return
        left["steps"] -= 1
        yield perm[s * batch_size:(s + 1) * batch_size]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


def train_subset(ds, keep: np.ndarray | None, cfg: TrainConfig, *, test=None, distill: bool = False,
                 teacher_cfg: TrainConfig | None = None, teacher=None, progress: bool = False, encoder: str = "auto",
                 val: np.ndarray | None = None) -> dict:
    """Train on ``ds[keep]`` (all of it when ``keep`` is None), optionally distilled from a teacher trained on all
    of ``ds`` (or the given one); report accuracy on ``test`` (when given) and timings. ``val``: indices of ``ds``
    held out for early stopping (:func:`prunekit.data.select.validation_split`); they may not overlap ``keep``,
    and the teacher does not see them either."""
    cfg.check()
    if teacher_cfg is not None:
        teacher_cfg.check()
    y_all = torch.from_numpy(ds.require_labels("Training"))
    x_all = features(ds, encoder, progress=progress)
    keep_t = torch.arange(len(ds)) if keep is None else torch.as_tensor(np.asarray(keep), dtype=torch.long)
    val_xy = None
    if val is not None:
        val = np.asarray(val, dtype=np.int64)
        if keep is None:
            keep_t = torch.from_numpy(np.setdiff1d(np.arange(len(ds)), val))
        if len(val) == 0 or np.isin(val, keep_t.numpy()).any():
            raise PruneError("The validation split must be non-empty and share no example with the kept subset; "
                             "carve it with validation_split and prune the rest.")
        val_xy = (x_all[torch.from_numpy(val)], y_all[torch.from_numpy(val)])
    x_te = y_te = None
    if test is not None:
        x_te, y_te = features(test, encoder, progress=progress), torch.from_numpy(test.require_labels("Testing"))
    out = {"kept": int(len(keep_t)), "total": len(ds), "fraction": len(keep_t) / len(ds), "distill": distill}
    t_logits = None
    if distill:
        t0 = time.perf_counter()
        if teacher is None:
            seen = torch.arange(len(ds)) if val is None else torch.from_numpy(np.setdiff1d(np.arange(len(ds)), val))
            teacher = fit(x_all[seen], y_all[seen], ds.num_classes, teacher_cfg or cfg, progress=progress, val=val_xy)
        t_logits = predict(teacher, x_all)[keep_t]
        out["teacher_seconds"] = time.perf_counter() - t0
        if x_te is not None:
            out["teacher_test_accuracy"] = accuracy(teacher, x_te, y_te)
    t0 = time.perf_counter()
    # normalize with the full data's statistics: a subset's own statistics would be another variable
    model = fit(x_all[keep_t], y_all[keep_t], ds.num_classes, cfg, teacher_logits=t_logits, progress=progress,
                stats_from=x_all, val=val_xy)
    out["train_seconds"] = time.perf_counter() - t0
    if x_te is not None:
        out["test_accuracy"] = accuracy(model, x_te, y_te)
    if val_xy is not None:
        out.update(model.fit_info)
    out["model"] = model
    return out

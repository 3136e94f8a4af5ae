"""Shared by the training-dynamics scores: short training runs (one per seed) on the engine."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.data.train import TrainConfig, auto_model, features, fit, predict


def model_kind(ds, cfg) -> str:
    if cfg.model != "auto":
        return cfg.model
    return auto_model(ds.kind)


def train_cfg(ds, cfg, seed: int, epochs: int) -> TrainConfig:
    return TrainConfig(model=model_kind(ds, cfg), epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       width=cfg.width, seed=seed)


def inputs(ds, cfg, engine, progress):
    x = features(ds, cfg.encoder, engine=engine, progress=progress)
    y = torch.from_numpy(ds.y)
    return x, y


def run_seeds(task, ds, cfg, engine, epochs: int, progress: bool, what: str) -> np.ndarray:
    """``task(x, y, num_classes, train_cfg) -> [N] array`` for seeds seed..seed+seeds-1; returns [seeds, N]."""
    x, y = inputs(ds, cfg, engine, progress)
    args = [(task, x.numpy(), y.numpy(), ds.num_classes, train_cfg(ds, cfg, cfg.seed + s, epochs))
            for s in range(cfg.seeds)]
    outs = engine.run_tasks(_run, args, progress=f"{what}: {cfg.seeds} runs x {epochs} epochs" if progress else None)
    return np.stack(outs)


def _run(task, x, y, num_classes, tcfg):
    return task(torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y)), num_classes, tcfg)


def probs_after(x, y, num_classes, tcfg) -> torch.Tensor:
    model = fit(x, y, num_classes, tcfg) if tcfg.epochs > 0 else _untrained(x, y, num_classes, tcfg)
    return F.softmax(predict(model, x), 1), model


def _untrained(x, y, num_classes, tcfg):
    from prunekit.data.train import Standardize, _stats, build_model

    torch.manual_seed(tcfg.seed)
    mean, std = _stats(x)
    return Standardize(mean, std, build_model(tcfg.model, x, num_classes, tcfg.width)).eval()

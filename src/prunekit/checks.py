"""Checks of what a user hands prunekit, made before any expensive work; each failure is one PruneError sentence."""

from __future__ import annotations

import math

import torch
from torch import nn

from prunekit.errors import PruneError


def check_finite(model: nn.Module, what: str = "The model") -> None:
    """Every parameter and floating buffer of ``model`` is finite, or a sentence naming the first tensor that is not."""
    for kind, named in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                nan = int(torch.isnan(t).sum())
                raise PruneError(
                    f"{what} has non-finite values in {kind} {name} ({nan} NaN, {bad - nan} Inf of {t.numel()}); "
                    "prunekit cannot prune or evaluate it: repair or re-export the checkpoint."
                )


def check_finite_tensor(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise PruneError(f"{what} contains NaN or Inf values; check the model and its calibration data.")


def check_number(name: str, value: float | None) -> None:
    if value is not None and isinstance(value, float) and not math.isfinite(value):
        raise PruneError(f"{name} must be a finite number, got {value}.")


def check_device(device: str) -> torch.device:
    """The torch device ``device`` names, usable on this machine, or one sentence."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PruneError(f"Unknown device {device!r}; use cpu or cuda (cuda:N for one GPU).") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise PruneError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu."
            )
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise PruneError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s).")
    elif d.type != "cpu":
        raise PruneError(f"Device {device!r} is not supported; use cpu or cuda.")
    return d


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seqlen(model: nn.Module, seqlen: int, flag: str = "--seqlen") -> None:
    """Windows no longer than the positions the model was built for (longer ones are wrong or out of memory)."""
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise PruneError(f"{flag} {seqlen} is longer than this model's {limit} positions; use at most {limit}.")

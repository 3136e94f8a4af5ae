"""Journey accounting ("Journey Matters: Average Parameter Count over Pre-training Unifies Sparse and Dense Scaling
Laws", Jin et al., ICLR 2025): what a pruning schedule costs is not only where it ends but the parameters it carries
along the way. :class:`Journey` records the number of live (unmasked, present) parameters at every optimizer step of
any schedule (one-shot, gradual, iterative, lottery, Adapt-Pruner) and reports their average over training, the
figure the paper compares runs by (runs with the same average reach about the same loss, dense or sparse).

    j = Journey()
    j.add(live_parameters(model), steps=1)   # once per step (or steps=k for k steps at that count)
    j.summary()  # {"average_params", "initial_params", "final_params", "steps", "curve"}

In :func:`prunekit.core.loop.train_loop`, ``on_step=j.tracking(model, masks, schedule_on_step)`` adds every step
and recounts only when the schedule hands back new masks.
"""

from __future__ import annotations

import torch
from torch import nn


def live_parameters(model: nn.Module, masks=None) -> int:
    """Parameters a step trains and an inference runs: every parameter's element count (a structurally pruned
    model has fewer), minus the removed (False) entries of ``masks`` (a :class:`~prunekit.core.masks.Masks` or
    ``{name: bool tensor}``) when given. Zeros are not inferred from the weights: pass the masks of a sparse run."""
    total = sum(p.numel() for p in model.parameters())
    if masks is None:
        return int(total)
    items = masks.items() if hasattr(masks, "items") else masks
    removed = sum(int((~m.bool()).sum()) for _, m in items)
    return int(total - removed)


class Journey:
    """The live-parameter count along training; ``average`` is its mean over steps."""

    def __init__(self, max_points: int = 200):
        self.steps = 0
        self.total = 0.0  # sum over steps of the live count
        self.first: int | None = None
        self.last: int | None = None
        self._curve: list[tuple[int, int]] = []  # (step where the count took this value, count)
        self.max_points = max_points

    def add(self, params: int, steps: int = 1) -> None:
        """``steps`` optimizer steps were taken with ``params`` live parameters."""
        if steps < 0 or params < 0:
            raise ValueError("steps and params must be 0 or more")
        params = int(params)
        if self.first is None:
            self.first = params
        if self.last != params or not self._curve:
            self._curve.append((self.steps, params))
        self.last = params
        self.steps += int(steps)
        self.total += float(params) * steps

    def tracking(self, model: nn.Module, masks=None, on_step=None):
        """An ``on_step`` for :func:`prunekit.core.loop.train_loop` that records this journey: it calls ``on_step``
        (a schedule's; it may hand back new masks), then adds the step about to run at the live count of ``model``
        under the masks in force (``masks`` until ``on_step`` returns others). The count is taken once here and
        again only when the masks change, never per step. A rewound round (lottery) is more steps: every step
        counts once, in the order trained."""
        count = live_parameters(model, masks)

        def step(i: int):
            nonlocal count
            new = on_step(i) if on_step is not None else None
            if new is not None:
                count = live_parameters(model, new)
            self.add(count)
            return new

        return step

    @property
    def average(self) -> float:
        return self.total / self.steps if self.steps else float(self.last or 0)

    def curve(self) -> list[tuple[int, int]]:
        """Change points (step, count), thinned to at most ``max_points`` (first and last kept)."""
        c = self._curve
        if len(c) <= self.max_points:
            return list(c)
        idx = torch.linspace(0, len(c) - 1, self.max_points).round().long().unique().tolist()
        return [c[i] for i in idx]

    def summary(self) -> dict:
        return {"average_params": round(self.average, 1), "initial_params": self.first, "final_params": self.last,
                "steps": self.steps, "curve": [list(p) for p in self.curve()]}

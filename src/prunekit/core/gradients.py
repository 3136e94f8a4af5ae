"""The one gradient pass: gradients of a loss w.r.t. some parameters, summed over batches in any form a criterion
needs (GBLM's per-sample squared gradients, structured Taylor's summed gradients, vision SNIP/Taylor scores).

Only the asked-for parameters require a gradient while it runs; afterwards every ``requires_grad`` flag, every
``.grad`` (cleared) and the train/eval mode are as they were, whatever happened.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from prunekit.core.progress import bar as progress_bar


def gradient_pass(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    accumulate: Callable[[int, nn.Parameter, torch.Tensor], None],
    *,
    train: bool = False,
    desc: str = "gradients",
    unit: str = "batch",
    progress: bool = False,
) -> None:
    """For each batch: ``loss_fn(model, batch).backward()``, then ``accumulate(i, p, p.grad)`` for the ``i``-th
    parameter of ``params`` that got a gradient, then the gradients are cleared. ``train``: the model runs in train
    mode (dropout, BatchNorm batch statistics), else in eval mode (the deterministic model)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.train(train)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        for batch in progress_bar(batches, desc=desc, unit=unit, enabled=progress):
            loss_fn(model, batch).backward()
            with torch.no_grad():
                for i, p in enumerate(params):
                    if p.grad is not None:
                        accumulate(i, p, p.grad)
                        p.grad = None
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)

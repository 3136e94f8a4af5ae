"""The one training loop: every family that trains (LLM recovery, vision training-time pruning, training on a
data subset) runs :func:`train_loop` with its own batches and loss.

One step is always: ``on_step(step)`` (may hand back new :class:`~prunekit.core.masks.Masks`, e.g. a gradual
schedule), ``loss, out = loss_fn(model, batch)``, a finite-loss check, ``zero_grad``, ``backward``, optional
gradient clipping, ``optimizer.step()`` (the attached masks zero the removed weights' gradients before it and the
weights after it), ``scheduler.step()``, then ``after_step``. The loop owns the progress bar and leaves the model
with its masks applied and detached whether it ends, fails or is interrupted (Ctrl-C propagates as
``KeyboardInterrupt`` once everything is put in order). With ``ema > 0`` the loop keeps an exponential moving
average of the weights (:class:`WeightAverage`) and, when it ends normally, leaves the model holding the average
(masks applied): the usual last step of diffusion and other generative training.

Optimizers (:func:`make_optimizer`) and learning-rate schedules (:data:`LR_SCHEDULES`) are named here, and the
distillation term :func:`kd_loss` is shared by every family that distills.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.masks import Masks
from prunekit.core.progress import bar as progress_bar
from prunekit.core.registry import Registry
from prunekit.errors import PruneError

LR_SCHEDULES = Registry("learning-rate schedule")
LR_SCHEDULES.register_names((
    ("constant", "the optimizer's lr throughout"),
    ("cosine", "cosine decay from lr to 0 over the steps"),
    ("warmup-cosine", "linear warmup, then cosine decay to min_factor * lr"),
    ("onecycle", "torch OneCycleLR (warmup over pct_start, then anneal)"),
))


class _KD(torch.autograd.Function):
    """``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over rows, with the gradient written out:
    ``T * (softmax(s / T) - softmax(t / T)) / rows``. It is exactly zero when ``s`` equals ``t`` (autograd's
    chain through ``kl_div`` leaves rounding residue there, which Adam would amplify into real updates), and it
    keeps two tensors of the logits' size instead of autograd's several."""

    @staticmethod
    def forward(ctx, s, t, T: float):
        c = s.shape[-1]
        ls = torch.log_softmax(s.reshape(-1, c) / T, dim=-1)
        lt = torch.log_softmax(t.reshape(-1, c) / T, dim=-1)
        pt = lt.exp()
        rows = ls.shape[0]
        loss = (pt * (lt - ls)).sum() * (T * T / rows)
        ctx.save_for_backward(ls, pt)
        ctx.T, ctx.rows, ctx.shape = T, rows, s.shape
        return loss

    @staticmethod
    def backward(ctx, g):
        ls, pt = ctx.saved_tensors
        grad = (ls.exp() - pt) * (g * (ctx.T / ctx.rows))
        return grad.reshape(ctx.shape), None, None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation term ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the
    rows of the logits flattened to ``[-1, classes]`` (Hinton et al. 2015). No gradient flows to the teacher; the
    student's gradient is exactly zero where the student's logits equal the teacher's."""
    return _KD.apply(student, teacher.detach(), float(temperature))


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, fused: bool = False):
    """``sgd`` (Nesterov momentum, the vision recipes) or ``adamw``; ``fused``: torch's fused AdamW kernel (about 6x
    faster per step on a CPU for a 135M model; rounds differently from the default, so families whose figures are
    published keep the default)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    raise PruneError(f"Unknown optimizer {name!r}; choose sgd or adamw.")


def make_schedule(opt, name: str, total: int, *, warmup: int = 0, min_factor: float = 0.0, pct_start: float = 0.15):
    """The learning-rate scheduler ``name`` (see :data:`LR_SCHEDULES`) over ``total`` steps."""
    name = LR_SCHEDULES.canonical(name)
    total = max(1, total)
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if name == "warmup-cosine":
        w = max(1, warmup)

        def factor(s: int) -> float:
            if s < w:
                return (s + 1) / w
            progress = (s - w) / max(1, total - w)
            return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    lr = [g["lr"] for g in opt.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr if len(lr) > 1 else lr[0], total_steps=total,
                                               pct_start=pct_start)


class WeightAverage:
    """An exponential moving average of a module's parameters. The decay warms up as
    ``min(decay, (1 + step) / (10 + step))`` so that a short run is not dominated by its starting weights."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise PruneError(f"The weight average's decay must be in (0, 1); got {decay}.")
        self.decay = float(decay)
        self.params = [p for p in module.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


@dataclass
class LoopResult:
    """What :func:`train_loop` did: the global step it ended on, every step's loss, its wall time, and the masks in
    force at the end (the last ones ``on_step`` handed back, or the ones it was given)."""

    step: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    masks: Masks | None = None

    def summary(self, trainable: int | None = None) -> dict:
        """Mean loss over the first and last 10% of steps, steps, seconds (the recovery report's fields)."""
        k = max(1, len(self.losses) // 10)
        out = {"steps": len(self.losses), "loss_first": sum(self.losses[:k]) / k if self.losses else float("nan"),
               "loss_last": sum(self.losses[-k:]) / k if self.losses else float("nan"), "seconds": self.seconds}
        if trainable is not None:
            out["trainable_params"] = trainable
        return out


def train_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    epochs: Iterable[Iterable],
    loss_fn: Callable,
    *,
    scheduler=None,
    masks: Masks | None = None,
    clip: tuple[list[nn.Parameter], float] | None = None,
    on_step: Callable[[int], Masks | None] | None = None,
    after_step: Callable | None = None,
    on_epoch: Callable | None = None,
    step0: int = 0,
    total: int | None = None,
    desc: str = "train",
    progress: bool = True,
    diverged: Callable[[int, float], str] | None = None,
    postfix: Callable[[], dict] | None = None,
    ema: float = 0.0,
) -> LoopResult:
    """Train ``model`` over ``epochs`` (an iterable of per-epoch iterables of batches).

    ``loss_fn(model, batch) -> (loss, out)``; ``masks`` are attached to ``opt`` for the whole loop;
    ``on_step(step) -> Masks | None`` runs before each step and replaces the attached masks when it returns some;
    ``after_step(step, epoch, batch, out, loss)`` sees each finished step (``step`` counts from ``step0 + 1``);
    ``on_epoch(epoch, step, result)`` after each epoch. ``clip = (params, max_norm)`` clips the gradient norm.
    A non-finite loss raises :class:`PruneError` with ``diverged(step, value)`` as its sentence (default: lower
    the learning rate). ``ema`` in (0, 1): after each step (before ``after_step``) a :class:`WeightAverage` of
    the parameters is updated, and a loop that ends normally copies it into the model. Returns a
    :class:`LoopResult`.
    """
    average = WeightAverage(model, ema) if ema else None
    result = LoopResult(step0, masks=masks)
    if masks is not None:
        masks.attach(model, opt)
    bar = progress_bar(total=total, desc=desc, unit="step", enabled=progress)
    progress = progress and not bar.disable
    running = None
    t0 = time.perf_counter()
    model.train()
    try:
        for epoch, batches in enumerate(epochs):
            for batch in batches:
                if on_step is not None:
                    new = on_step(result.step)
                    if new is not None:
                        if result.masks is not None:
                            result.masks.detach()
                        result.masks = new
                        new.attach(model, opt)
                loss, out = loss_fn(model, batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    lr = opt.param_groups[0]["lr"]
                    raise PruneError(diverged(result.step + 1, value) if diverged else
                                     f"Training diverged (loss {value} at step {result.step + 1}); lower the "
                                     f"learning rate (now {lr:g}).")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                result.step += 1
                result.losses.append(value)
                if average is not None:
                    average.update(result.step)
                if after_step is not None:
                    after_step(result.step, epoch, batch, out, loss)
                running = value if running is None else 0.9 * running + 0.1 * value
                bar.update(1)
                if progress:
                    shown = {"loss": f"{running:.4f}"}
                    if result.masks is not None:
                        shown["sparsity"] = f"{result.masks.sparsity():.3f}"
                    if postfix is not None:
                        shown.update(postfix())
                    bar.set_postfix(shown, refresh=False)
            if on_epoch is not None:
                on_epoch(epoch, result.step, result)
        if average is not None and result.step > step0:
            average.copy_to()
    finally:
        bar.close()
        result.seconds = time.perf_counter() - t0
        if result.masks is not None:
            result.masks.detach()
            with torch.no_grad():
                result.masks.apply(model)
    return result

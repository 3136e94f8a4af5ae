"""LAPP, layer-adaptive progressive pruning with learnable thresholds (Zhai et al., "Layer Adaptive Progressive
Pruning: Compressing CNNs from Scratch", 2023): learner ``lapp``.

Every prunable weight (conv / linear, outside ``exclude``) gets a **learnable threshold** ``t_l`` (one per layer,
in units of the layer's current RMS weight, so one scale serves every layer), starting at 0. A weight's gate is
the hard step ``m = [|w| / rms(w) > t_l]`` in the forward pass and, for ``t_l``'s gradient, the smooth surrogate
``sigmoid((|w| / rms(w) - t_l) / temperature)`` (straight-through: value of the step, gradient of the sigmoid).
The weights see ``w * m`` (so a threshold of 0 keeps every non-zero weight: the dense model). The loss is

    task loss + lam * (F(m) / F_dense - target_s)^2,   F(m) = sum_l |m_l|_0 * spatial_l

where ``spatial_l`` is the number of output positions of layer ``l`` (height x width of a convolution's output,
tokens of a linear layer's), so ``F`` is the multiply-accumulates the kept weights cost and ``F_dense`` the same
with every weight (``side: above``: only the excess, ``max(0, .)^2``, the one-sided form). Progressive, from
scratch: the FLOPs target ``target_s`` falls from 1 to the final target
``1 - cfg.sparsity`` along a cubic ramp over the first ``ramp`` fraction of the training steps (``cfg.epochs``), so
the thresholds rise and pruning grows while the network trains; each layer's threshold moves by the FLOPs it
costs against what its weights do for the task loss, which sets the per-layer sparsity.

At the end the hard masks become a prunekit :class:`~prunekit.core.masks.Masks`. If their FLOPs ratio is off the
target by more than ``tolerance``, every threshold is shifted by one common amount (bisection; the layers keep
their learned order) until it is within; the shift is reported. Each layer keeps at least its largest weight.
``cfg.finetune_epochs`` of training with the masks fixed follow.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import parametrize

from prunekit.core.config import Config
from prunekit.core.masks import Masks, prunable
from prunekit.core.progress import say
from prunekit.errors import PruneError
from prunekit.vision.learn import LEARNED


class LappOptions(Config):
    """The options of learner ``lapp`` (recipe ``options``, ``--option KEY=VALUE``)."""

    what = "lapp option"
    lam: float = Field(20.0, description="weight of the squared FLOPs excess in the loss")
    temperature: float = Field(0.1, description="width of the sigmoid surrogate, in units of a layer's RMS weight")
    ramp: float = Field(0.7, description="fraction of the training steps over which the FLOPs target falls from "
                        "1 to its final value (cubic)")
    tolerance: float = Field(0.01, description="the final masks' FLOPs ratio is within this of the target")
    side: Literal["above", "both"] = Field("both", description="above: penalise only FLOPs above the target "
                                          "(max(0, excess)^2); both: (ratio - target)^2, which also pulls back "
                                          "thresholds that overshoot (momentum carries them past the target)")

    @model_validator(mode="after")
    def _check(self):
        if not self.lam > 0:
            raise ValueError(f"lam must be positive, got {self.lam}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 < self.ramp <= 1.0:
            raise ValueError(f"ramp must be in (0, 1], got {self.ramp}")
        if not 0.0 < self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        return self


def normalized(w: torch.Tensor) -> torch.Tensor:
    """``|w| / rms(w)`` with the RMS taken as a constant (no gradient); zeros for an all-zero weight."""
    rms = w.detach().pow(2).mean().sqrt()
    return w.detach().abs() / rms if rms > 0 else torch.zeros_like(w)


class ThresholdGate(nn.Module):
    """A parametrization ``w -> w * m``: ``m`` is the step ``[|w|/rms > t]`` forward, with the gradient of
    ``sigmoid((|w|/rms - t) / temperature)`` for the learnable threshold ``t`` (straight-through)."""

    def __init__(self, temperature: float):
        super().__init__()
        self.threshold = nn.Parameter(torch.zeros(()))
        self.temperature = temperature

    def gate(self, w: torch.Tensor) -> torch.Tensor:
        s = normalized(w)
        hard = (s > self.threshold).to(w.dtype)
        soft = torch.sigmoid((s - self.threshold) / self.temperature)
        return hard + (soft - soft.detach())  # exactly the step in value

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.gate(w)


def output_positions(model: nn.Module, example: torch.Tensor, names) -> dict[str, int]:
    """For each weight name (``<module>.weight`` / ``<attention>.in_proj_weight``): how many output positions
    its layer computes per input (a conv: output height x width; a linear layer or attention projection: tokens).
    The weight's MACs are its element count times this (groups included: a grouped conv's weight is already
    ``in / groups`` wide)."""
    mods = dict(model.named_modules())
    owners = {n.rsplit(".", 1)[0] if "." in n else "": n for n in names}
    seen: dict[str, int] = {}
    hooks = []
    for mname in set(owners) | {m.rsplit(".", 1)[0] for m in owners if "." in m
                                if isinstance(mods.get(m.rsplit(".", 1)[0]), nn.MultiheadAttention)}:
        mod = mods[mname]

        def hook(m, args, out, mname=mname):
            b = example.shape[0]
            if isinstance(m, nn.MultiheadAttention):
                q = args[0]
                seen[mname] = q.numel() // (q.shape[-1] * b)
            elif isinstance(m, nn.modules.conv._ConvNd):
                seen[mname] = out.numel() // (out.shape[1] * b)
            else:
                seen[mname] = out.numel() // (out.shape[-1] * b)

        hooks.append(mod.register_forward_hook(hook))
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    out = {}
    for mname, wname in owners.items():
        if mname not in seen:  # a projection used functionally (an attention's out_proj): its parent's tokens
            parent = mname.rsplit(".", 1)[0]
            if parent not in seen:
                raise PruneError(f"LAPP counts FLOPs of layers that run; {mname!r} never ran on the example "
                                 "(exclude it with --exclude).")
            seen[mname] = seen[parent]
        out[wname] = seen[mname]
    return out


def flops_ratio(keep: dict[str, torch.Tensor], positions: dict[str, int]) -> torch.Tensor:
    """``sum_l sum(keep_l) * positions_l / sum_l numel_l * positions_l`` (``keep``: hard or soft gates)."""
    dense = sum(keep[n].numel() * positions[n] for n in keep)
    return sum(keep[n].sum() * positions[n] for n in keep) / dense


def target_at(step: int, total: int, final: float, ramp: float) -> float:
    """The FLOPs target at ``step``: ``final + (1 - final) (1 - min(1, step / (ramp total)))^3``."""
    frac = min(1.0, step / max(1.0, ramp * total))
    return final + (1.0 - final) * (1.0 - frac) ** 3


def hard_masks(weights: dict[str, torch.Tensor], thresholds: dict[str, float],
               shift: float = 0.0) -> dict[str, torch.Tensor]:
    """``[|w|/rms > t_l + shift]`` per layer; a layer keeps at least its largest weight."""
    out = {}
    for n, w in weights.items():
        k = normalized(w) > thresholds[n] + shift
        if not k.any():
            k.view(-1)[int(w.abs().argmax())] = True
        out[n] = k
    return out


def fit_to_target(weights: dict[str, torch.Tensor], thresholds: dict[str, float], positions: dict[str, int],
                  target: float, tolerance: float, iters: int = 60) -> tuple[dict[str, torch.Tensor], float]:
    """The hard masks and the common threshold shift (0 when already within ``tolerance``) that bring the FLOPs
    ratio within ``tolerance`` of ``target`` (bisection on the shift; the ratio falls as the shift rises)."""
    masks = hard_masks(weights, thresholds)
    ratio = float(flops_ratio(masks, positions))
    if abs(ratio - target) <= tolerance:
        return masks, 0.0
    top = max(float(normalized(w).max()) for w in weights.values()) + max(abs(t) for t in thresholds.values()) + 1
    lo, hi = (0.0, top) if ratio > target else (-top, 0.0)
    best = (abs(ratio - target), masks, 0.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = hard_masks(weights, thresholds, mid)
        r = float(flops_ratio(m, positions))
        if abs(r - target) < best[0]:
            best = (abs(r - target), m, mid)
        if abs(r - target) <= tolerance:
            break
        lo, hi = (mid, hi) if r > target else (lo, mid)
    return best[1], best[2]


def run(cfg, model: nn.Module, data: dict, ctx):
    """Train ``cfg.epochs`` from scratch with learnable thresholds under the progressive FLOPs constraint, fix the
    hard masks at the target, fine-tune ``cfg.finetune_epochs``; returns (model, masks)."""
    from prunekit.vision.train import evaluate, train_epochs

    o = ctx.options
    example = data["x_train"][:2]
    names = list(prunable(model, cfg.exclude))
    positions = output_positions(model, example, names)
    final = 1.0 - cfg.sparsity
    mods = dict(model.named_modules())
    owner = {n: (mods[n.rsplit(".", 1)[0] if "." in n else ""], n.rsplit(".", 1)[-1]) for n in names}
    gates = {}
    for n, (mod, attr) in owner.items():
        gates[n] = ThresholdGate(o.temperature)
        parametrize.register_parametrization(mod, attr, gates[n], unsafe=True)
    per_epoch = math.ceil(len(data["y_train"]) / cfg.batch_size)
    total = max(1, cfg.epochs * per_epoch)
    state = {"step": 0}
    trace: list[dict] = []

    def on_step(step):
        state["step"] = step
        return None

    def regularizer(m):
        soft = {n: gates[n].gate(owner[n][0].parametrizations[owner[n][1]].original) for n in names}
        ratio = flops_ratio(soft, positions)
        goal = target_at(state["step"], total, final, o.ramp)
        if state["step"] % max(1, total // 20) == 0:
            trace.append({"step": state["step"], "target": round(goal, 4),
                          "flops_ratio": round(float(ratio.detach()), 4)})
        excess = ratio - goal
        return o.lam * (torch.relu(excess) if o.side == "above" else excess) ** 2

    try:
        train_epochs(model, data, cfg.epochs, cfg, None, "lapp", ctx.history, on_step=on_step, progress=ctx.progress,
                     seed=cfg.seed, journey=ctx.journey, regularizer=regularizer)
    finally:
        thresholds = {n: float(gates[n].threshold.detach()) for n in names}
        for mod, attr in owner.values():
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
    params = dict(model.named_parameters())
    weights = {n: params[n].detach() for n in names}
    learned = hard_masks(weights, thresholds)
    ratio_learned = float(flops_ratio(learned, positions))
    keep, shift = fit_to_target(weights, thresholds, positions, final, o.tolerance)
    masks = Masks(keep)
    masks.apply(model)
    ratio = float(flops_ratio(keep, positions))
    ctx.info["acc_after_prune"] = evaluate(model, data["x_test"], data["y_test"])
    if ctx.progress:
        say(f"lapp: learned thresholds keep {ratio_learned:.3f} of the FLOPs; masks at {ratio:.3f} (target "
            f"{final:.3f}, common shift {shift:+.3f})")
    train_epochs(model, data, cfg.finetune_epochs, cfg, masks, "finetune", ctx.history, progress=ctx.progress,
                 seed=cfg.seed + 1, journey=ctx.journey)
    ctx.info["learn"] = {
        "method": "lapp", "lam": o.lam, "side": o.side, "temperature": o.temperature, "ramp": o.ramp,
        "tolerance": o.tolerance,
        "flops_target": final, "flops_ratio_learned": ratio_learned, "flops_ratio": ratio, "shift": shift,
        "weight_sparsity": masks.sparsity(), "trace": trace,
        "layers": {n: {"threshold": thresholds[n], "positions": positions[n], "params": int(keep[n].numel()),
                       "kept": int(keep[n].sum()), "sparsity": 1.0 - float(keep[n].float().mean())} for n in names},
    }
    return model, masks


LEARNED.register("lapp", run, params=LappOptions,
                 description="learnable per-layer magnitude thresholds (straight-through sigmoid) trained from "
                             "scratch with a progressive FLOPs constraint; sparsity = fraction of FLOPs removed "
                             "(Zhai et al. 2023)")

"""Polarization pruning (Zhuang et al., NeurIPS 2020, "Neuron-level Structured Pruning using Polarization
Regularizer"), one pass: learner ``polarization``.

One training run with the **polarizer** on the BatchNorm scales gamma added to the loss (through
``train_epochs(regularizer=)``)::

    R(gamma) = t * ||gamma||_1 - ||gamma - mean(gamma) 1||_1        (weighted by lam)

over all polarized BatchNorm layers at once (``scope: global``, the paper's code: one mean over every channel) or
summed per layer (``scope: layer``); after every optimizer step the scales are clamped to [0, ``clamp``] (the
paper's [0, 1]). Unlike L1 (network slimming), which shrinks every scale, the polarizer pushes the scales below the
mean to exactly 0 and lets the others stay near a common value, so the distribution splits into two clusters.
Then the channels whose scale is at or below a threshold are removed physically on Torch-Pruning's dependency
graph (:func:`prunekit.vision.channels.prune_channels` with ``remove=``; coupled channels go only when every
coupled BatchNorm agrees): the threshold is each layer's histogram **valley** (the first local minimum of a
``bins``-bin histogram over [0, clamp], capped at ``valley_max``, the paper's ``grad`` strategy), a fixed number,
or ``sparsity`` (the recipe's sparsity as the fraction of all polarized channels, lowest scales first, the
paper's ``percent``). An optional fine-tune (``finetune_epochs``, no regulariser) follows, then the BatchNorm
statistics are re-estimated (``bn_recalibrate``) as in every channel run.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.core.masks import keep_highest, kept_total
from prunekit.core.progress import say
from prunekit.errors import PruneError
from prunekit.vision.learn import LEARNED, named_modules

RULES = ("valley", "sparsity")


class PolarizationOptions(Config):
    """The options of learner ``polarization`` (recipe ``options``, ``--option KEY=VALUE``)."""

    what = "polarization option"
    lam: float = Field(5e-3, description="weight of the polarizer in the loss (the paper's lambda). Its pull on a "
                       "scale grows with lam x steps: on SmallCNN 1e-2 over 120 steps split the scales, 1e-3 did "
                       "not; the paper's 1e-4 is for 160+ epochs")
    t: float = Field(1.2, description="weight of the L1 term against the spread term (larger: more zeros)")
    scope: Literal["global", "layer"] = Field("global", description="global: one mean over every polarized "
                                              "channel (the paper's code); layer: the polarizer per layer")
    gamma_init: float | None = Field(0.5, description="BatchNorm scales set to this before training (the paper's "
                                     "0.5); null keeps the model's own (a pretrained model)")
    clamp: float = Field(1.0, description="scales clamped to [0, clamp] after every step")
    threshold: float | str = Field("valley", description="valley: each layer's histogram valley; sparsity: the "
                                   "recipe's sparsity as the fraction of channels removed; a number: remove "
                                   "scales at or below it")
    bins: int = Field(100, description="valley: histogram bins over [0, clamp]")
    valley_max: float = Field(0.1, description="valley: the threshold never exceeds this")

    @model_validator(mode="after")
    def _check(self):
        if not self.lam > 0:
            raise ValueError(f"lam must be positive, got {self.lam}")
        if not self.t > 0:
            raise ValueError(f"t must be positive, got {self.t}")
        if not self.clamp > 0:
            raise ValueError(f"clamp must be positive, got {self.clamp}")
        if self.gamma_init is not None and not 0.0 < self.gamma_init <= self.clamp:
            raise ValueError(f"gamma_init must be in (0, clamp={self.clamp}], got {self.gamma_init}")
        if isinstance(self.threshold, str) and self.threshold not in RULES:
            raise ValueError(f"threshold is 'valley', 'sparsity' or a number, got {self.threshold!r}")
        if not isinstance(self.threshold, str) and not 0.0 <= self.threshold < self.clamp:
            raise ValueError(f"a threshold number must be in [0, clamp={self.clamp}), got {self.threshold}")
        if self.bins < 3:
            raise ValueError(f"bins must be at least 3, got {self.bins}")
        if not 0.0 <= self.valley_max < self.clamp:
            raise ValueError(f"valley_max must be in [0, clamp={self.clamp}), got {self.valley_max}")
        return self


def polarizer(gammas: list[torch.Tensor], t: float, scope: str = "global") -> torch.Tensor:
    """R = t ||g||_1 - ||g - mean(g)||_1 over all ``gammas`` concatenated (``global``) or the sum of it per tensor
    (``layer``); the mean is part of the graph (its gradient flows, as in the paper's code)."""
    if scope == "global":
        g = torch.cat([x.reshape(-1) for x in gammas])
        return t * g.abs().sum() - (g - g.mean()).abs().sum()
    return sum(t * g.abs().sum() - (g - g.mean()).abs().sum() for g in gammas)


def valley(g: torch.Tensor, bins: int = 100, top: float = 1.0) -> float:
    """The left edge of the first local minimum of the histogram of ``g`` over [0, top] (``bins`` bins), searched
    from the second bin on (the paper's ``grad`` split: the end of the cluster at zero); 0 if there is none."""
    counts = torch.histc(g.detach().float(), bins=bins, min=0.0, max=top).tolist()
    for i in range(1, bins - 1):
        if counts[i - 1] >= counts[i] <= counts[i + 1]:
            return i * top / bins
    return 0.0


def polarizable(model: nn.Module, example: torch.Tensor, exclude=()) -> dict[str, nn.Module]:
    """The BatchNorm layers whose channels can go: affine, outside ``exclude`` (module names), and not coupled with
    the model's output or an excluded module on the dependency graph."""
    from prunekit.vision.channels import coupled_outputs, output_modules

    def inside(n: str) -> bool:
        return any(n == e or n.startswith(e + ".") for e in exclude)

    bns = {n: m for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and not inside(n)}
    if not bns:
        return {}
    names = {m: n for n, m in model.named_modules()}
    was = model.training
    stay = {names[m] for m in output_modules(model.eval(), example)}
    coupled = coupled_outputs(model, example, list(bns))
    model.train(was)
    return {n: m for n, m in bns.items() if coupled[n] and not any(c in stay or inside(c) for c in coupled[n])}


def select(gammas: dict[str, torch.Tensor], rule: float | str, sparsity: float = 0.0, bins: int = 100,
           top: float = 1.0, valley_max: float = 0.1) -> tuple[dict[str, list[int]], dict[str, float | None]]:
    """Which channels go: (layer -> indices of the channels to remove, layer -> the threshold used). A channel
    goes when its scale is at or below the threshold (``valley``: each layer's, capped at ``valley_max``; a
    number: that one; ``sparsity``: the lowest ``sparsity`` fraction of all scales together, ties by position).
    Every layer keeps at least its largest scale. (``sparsity``: the threshold is the largest removed scale, None
    if none is removed.)"""
    if rule == "sparsity":
        flat = torch.cat([g.reshape(-1) for g in gammas.values()])
        kept = keep_highest(flat, kept_total(flat.numel(), sparsity))
        parts = dict(zip(gammas, kept.split([g.numel() for g in gammas.values()])))
        removed = flat[~kept]
        thr = float(removed.max()) if removed.numel() else None
        thresholds = {n: thr for n in gammas}
    else:
        thresholds = {n: min(valley(g, bins, top), valley_max) if rule == "valley" else float(rule)
                      for n, g in gammas.items()}
        parts = {n: g > thresholds[n] for n, g in gammas.items()}
    remove = {}
    for n, g in gammas.items():
        keep = parts[n].clone()
        if not keep.any():
            keep[int(g.argmax())] = True
        remove[n] = (~keep).nonzero().flatten().tolist()
    return remove, thresholds


def _histogram(gammas: dict[str, torch.Tensor], top: float, bins: int = 20) -> dict:
    flat = torch.cat([g.reshape(-1) for g in gammas.values()]).float()
    return {"edges": [round(top * i / bins, 6) for i in range(bins + 1)],
            "counts": [int(c) for c in torch.histc(flat, bins=bins, min=0.0, max=top).tolist()],
            "zero": int((flat == 0).sum()), "total": int(flat.numel()),
            "mean": float(flat.mean()), "median": float(flat.median())}


def run(cfg, model: nn.Module, data: dict, ctx):
    """Train ``cfg.epochs`` with the polarizer, remove the channels under the threshold, fine-tune
    ``cfg.finetune_epochs``; returns (the smaller model, None)."""
    from prunekit.vision.channels import check_supported, count_macs, output_modules, prune_channels
    from prunekit.vision.train import evaluate, recalibrate_bn, train_epochs

    o = ctx.options
    example = data["x_train"][:2]
    mods = named_modules(model, cfg.exclude)
    no_bn = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine for m in mods.values())
    if not no_bn:
        check_supported(model, output_modules(model.eval(), example) + [mods[n] for n in cfg.exclude])
    bns = {} if no_bn else polarizable(model, example, cfg.exclude)
    if not bns:
        raise PruneError(f"Polarization needs BatchNorm layers whose channels can be removed; model {cfg.model!r} "
                         "has none (choose a model with BatchNorm, e.g. cnn or resnet).")
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = count_macs(model, example[:1])
    gammas = [bn.weight for bn in bns.values()]
    if o.gamma_init is not None:
        with torch.no_grad():
            for g in gammas:
                g.fill_(o.gamma_init)

    def clamp(step=None):
        with torch.no_grad():
            for g in gammas:
                g.clamp_(0.0, o.clamp)
        return None

    def regularizer(m):
        return o.lam * polarizer(gammas, o.t, o.scope)

    train_epochs(model, data, cfg.epochs, cfg, None, "polarize", ctx.history, on_step=clamp, progress=ctx.progress,
                 seed=cfg.seed, journey=ctx.journey, regularizer=regularizer)
    clamp()
    acc_polarized = evaluate(model, data["x_test"], data["y_test"])
    found = {n: bn.weight.detach().clone() for n, bn in bns.items()}
    remove, thresholds = select(found, o.threshold, cfg.sparsity, o.bins, o.clamp, o.valley_max)
    n_all, n_off = sum(g.numel() for g in found.values()), sum(len(v) for v in remove.values())
    if ctx.progress:
        say(f"polarization: {n_off} of {n_all} channels at or below the threshold ({o.threshold}); removing them")
    ctx.info["dense_acc"] = acc_polarized
    ctx.info["channels"] = prune_channels(model, example, 0.0, ignore=list(cfg.exclude), remove=remove)
    ctx.info["acc_after_prune"] = evaluate(model, data["x_test"], data["y_test"])
    after = {n: int(mods[n].weight.numel()) for n in bns}
    train_epochs(model, data, cfg.finetune_epochs, cfg, None, "finetune", ctx.history, progress=ctx.progress,
                 seed=cfg.seed + 1, journey=ctx.journey)
    if cfg.bn_recalibrate:
        recalibrate_bn(model, data, 20, cfg.batch_size, cfg.seed)
    ctx.info["learn"] = {
        "method": "polarization", "lam": o.lam, "t": o.t, "scope": o.scope, "threshold": o.threshold,
        "gamma_histogram": _histogram(found, o.clamp),
        "layers": {n: {"channels": int(found[n].numel()), "kept": after[n], "marked": len(remove[n]),
                       "threshold": thresholds[n]} for n in bns},
        "channels_before": n_all, "channels_after": sum(after.values()),
        "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
        "macs_before": macs_before, "macs_after": count_macs(model, example[:1]),
        "acc_polarized": acc_polarized, "acc_after_removal": ctx.info["acc_after_prune"],
    }
    return model, None


LEARNED.register("polarization", run, params=PolarizationOptions,
                 description="polarizer t|g|_1 - |g - mean g|_1 on BatchNorm scales in one training run, channels "
                             "under the valley / a threshold / the sparsity removed (Zhuang et al. 2020)")

"""LD-Pruner (Castells et al., CVPR-W 2024): operators judged in latent space, task-agnostically.

For each candidate operator (the stock-expressible removals of :mod:`prunekit.diffusion.blocks`: the mid block or
its attention, a block's attentions, one resnet/attention pair of a level) apply that one modification, regenerate
the latents from the same fixed noise and conditions (DDIM, ``calib_steps``), and score

    score = || mean(L_mod) - mean(L) ||_2 + || std(L_mod) - std(L) ||_2

with the mean and standard deviation taken over the calibration set, element by element (the paper's
Eq. 1). The least important operators are removed until the UNet's MACs fall by ``ratio``; the short fine-tune
(BK-SDM's distillation) is the recipe's ``finetune``. ``order: random`` removes operators in a seeded random order
instead (the baseline at equal compression), ``order: score-per-mac`` divides the score by the MACs an operator
saves. An identity modification scores exactly 0 (the same noise, conditions and arithmetic).
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit.core.config import Config
from prunekit.core.progress import bar, say
from prunekit.diffusion.blocks import apply_ops, candidates, check_ops, ordered_until
from prunekit.diffusion.methods import METHODS, Context, check_ratio
from prunekit.diffusion.pipeline import Pipeline, count_macs


class LDOptions(Config):
    what = "ld-pruner options"

    order: Literal["score", "score-per-mac", "random"] = "score"
    ops: list[str] | None = None  # candidates (default: every operator of the UNet)


def latent_score(ref: torch.Tensor, mod: torch.Tensor) -> float:
    """``|| mean(mod) - mean(ref) || + || std(mod) - std(ref) ||`` over the samples (dim 0), element-wise."""
    dm = (mod.mean(0) - ref.mean(0)).flatten().norm()
    ds = (mod.std(0) - ref.std(0)).flatten().norm()
    return float(dm + ds)


def scores(pipe: Pipeline, ctx: Context, ops: list[str], progress: bool = True) -> dict[str, float]:
    """Each operator's score (one modification at a time, latents from the context's fixed noise)."""
    ref = ctx.latents(pipe)
    out = {}
    for op in bar(ops, desc="LD-Pruner: score operators", unit="op", enabled=progress):
        out[op] = latent_score(ref, ctx.latents(pipe, unet=apply_ops(pipe.unet, [op])))
    return out


@METHODS.register("ld-pruner", params=LDOptions,
                  description="operators scored by the change of the latents' mean and std; least important removed")
def run(pipe: Pipeline, recipe, opts: LDOptions, ctx: Context) -> dict:
    ratio = check_ratio(recipe.ratio)
    ops = check_ops(pipe.unet, opts.ops) if opts.ops is not None else candidates(pipe.unet)
    dense = count_macs(pipe)
    if opts.order == "random":
        g = torch.Generator().manual_seed(recipe.seed)
        order = [ops[i] for i in torch.randperm(len(ops), generator=g).tolist()]
        sc = {}
    else:
        sc = scores(pipe, ctx, ops, ctx.progress)
        key = sc
        if opts.order == "score-per-mac":
            saved = {o: max(1, dense - count_macs(pipe, apply_ops(pipe.unet, [o]))) for o in ops}
            key = {o: sc[o] / saved[o] for o in ops}
        order = sorted(ops, key=lambda o: (key[o], ops.index(o)))
    chosen, macs = ordered_until(pipe, order, ratio)
    if macs > (1 - ratio) * dense:
        say(f"ld-pruner: every candidate removed cuts the UNet's MACs by {1 - macs / dense:.1%}, less than the "
            f"{ratio:.0%} asked")
    before = sum(p.numel() for p in pipe.unet.parameters())
    pipe.unet = apply_ops(pipe.unet, chosen)
    return {"scores": sc, "order": order, "ops": chosen, "unet_macs_dense": dense, "unet_macs": macs,
            "unet_params_dense": before, "unet_params": sum(p.numel() for p in pipe.unet.parameters())}

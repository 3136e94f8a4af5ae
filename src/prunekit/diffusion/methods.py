"""The diffusion pruning methods (registry :data:`METHODS`), their shared recipe and context, and the short
fine-tune every method may end with.

A method is ``run(pipe, opts, ctx) -> dict``: it changes ``pipe`` (a copy of the dense pipeline) in place and
returns what it did (its rows for the record). ``opts`` is the method's own options (a :class:`Config`), ``ctx``
the :class:`Context`: the dense pipeline (teacher, never changed), the calibration conditions and noise, and the
images a fine-tune or a learned method trains on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pydantic import Field
from torch import nn

from prunekit.core.config import Config
from prunekit.core.registry import Registry
from prunekit.diffusion.pipeline import Condition, Pipeline, denoise_loss, sample
from prunekit.errors import PruneError


def _load_methods() -> None:
    from prunekit.diffusion import aptp, blocks, channels, ldpruner, magnitude, tome  # noqa: F401


METHODS = Registry("diffusion pruning method", loader=_load_methods)


class FinetuneConfig(Config):
    """The short fine-tune after pruning: the denoising loss + ``distill`` x BK-SDM's output distillation from
    the dense UNet, masks kept."""

    steps: int = 0
    # 1e-4: a short fine-tune must not move a converged model (the reference ends its training at 5e-5; at 5e-4
    # the dense model fine-tuned alone lost 7 points of class fidelity, benchmarks/diffusion.py part control)
    lr: float = 1e-4
    batch_size: int = 64
    distill: float = 1.0
    p_uncond: float = 0.1  # share of conditions replaced by the null one (keeps classifier-free guidance working)
    ema: float = Field(0.999, ge=0.0, lt=1.0)  # weight average left in the UNet at the end (0: the last weights)


def drop_conditions(cond: Condition, p: float, generator: torch.Generator) -> Condition:
    """``cond`` with a share ``p`` of its rows replaced by the null condition (the training side of
    classifier-free guidance); unchanged when it has no null part or ``p`` is 0."""
    if p <= 0 or not cond.guided:
        return Condition(cond.hidden, cond.labels)
    drop = torch.rand(len(cond), generator=generator) < p

    def mix(a, b):
        if a is None or b is None:
            return a
        return torch.where(drop.view(-1, *([1] * (a.dim() - 1))), b, a)

    return Condition(mix(cond.hidden, cond.null_hidden), mix(cond.labels, cond.null_labels))


class DiffusionRecipe(Config):
    what = "diffusion recipe"

    method: str
    ratio: float | None = None  # the method's amount: sparsity (magnitude), fraction of UNet MACs (structural)
    options: dict = {}
    finetune: FinetuneConfig = FinetuneConfig()
    seed: int = 0
    calib_samples: int = 32  # conditions x noise of the calibration set (LD-Pruner, channel importance)
    calib_steps: int = 10  # DDIM steps when a method regenerates latents


@dataclass
class Context:
    dense: Pipeline
    calib: Condition
    noise: torch.Tensor
    calib_steps: int
    images: torch.Tensor | None = None  # training images at the UNet's input size (x0), for fine-tunes
    labels: torch.Tensor | None = None
    seed: int = 0
    progress: bool = True
    guidance: float = 1.0
    log: Callable[[str], None] = field(default=lambda s: None)

    def latents(self, pipe: Pipeline, unet: nn.Module | None = None) -> torch.Tensor:
        """Latents regenerated from the fixed calibration noise and conditions (no VAE decode)."""
        return sample(pipe, self.calib, steps=self.calib_steps, noise=self.noise, unet=unet, decode=False,
                      guidance=self.guidance)


def check_ratio(ratio: float | None, what: str = "--ratio") -> float:
    if ratio is None:
        raise PruneError(f"{what} is required for this method: a fraction in (0, 1).")
    if not 0.0 < float(ratio) < 1.0:
        raise PruneError(f"{what} must be in (0, 1) (got {ratio}).")
    return float(ratio)


def training_batches(ctx: Context, pipe: Pipeline, steps: int, batch_size: int, generator: torch.Generator):
    """``steps`` batches ``(x0, condition)`` drawn from the context's images (the class prompts through the
    pipeline's own text encoder at each step, so a pruned text encoder trains too)."""
    if ctx.images is None or ctx.labels is None:
        raise PruneError("This step trains: give the training images (the reference model has them built in).")
    n = len(ctx.images)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        yield ctx.images[idx], ctx.labels[idx]


def finetune(pipe: Pipeline, ctx: Context, cfg: FinetuneConfig, masks=None, unet: nn.Module | None = None,
             desc: str = "fine-tune") -> dict:
    """BK-SDM's short recovery: ``cfg.steps`` of the denoising loss + output distillation from the dense UNet,
    with ``masks`` (unstructured sparsity) kept. Returns the loop's summary."""
    from prunekit.core.loop import make_optimizer, make_schedule, train_loop

    if cfg.steps <= 0:
        return {}
    net = unet if unet is not None else pipe.unet
    g = torch.Generator().manual_seed(ctx.seed + 1)
    teacher = ctx.dense.unet.eval()  # used under no_grad only; its flags are the caller's
    for p in net.parameters():
        p.requires_grad_(True)
    params = list(net.parameters())
    opt = make_optimizer(params, "adamw", cfg.lr)
    sched = make_schedule(opt, "warmup-cosine", cfg.steps, warmup=max(1, cfg.steps // 20))

    def loss_fn(model, batch):
        x0, y = batch
        with torch.no_grad():
            cond = drop_conditions(pipe.condition(y, guidance=cfg.p_uncond > 0), cfg.p_uncond, g)
        return denoise_loss(pipe, x0, cond, generator=g, teacher=teacher, distill=cfg.distill, unet=net)

    res = train_loop(net, opt, [training_batches(ctx, pipe, cfg.steps, cfg.batch_size, g)], loss_fn,
                     scheduler=sched, masks=masks, total=cfg.steps, desc=desc, progress=ctx.progress,
                     clip=(params, 1.0), ema=cfg.ema)
    net.eval()
    return res.summary()


def run(pipe: Pipeline, recipe: DiffusionRecipe, ctx: Context) -> tuple[Pipeline, dict]:
    """Prune a copy of ``pipe`` with ``recipe`` (then its fine-tune); returns the pruned pipeline and the rows."""
    entry = METHODS.get(recipe.method)
    opts = METHODS.options(entry.name, recipe.options)
    if recipe.finetune.steps > 0 and entry.meta.get("training_free"):
        raise PruneError(f"{entry.name} is training-free; drop the fine-tune (finetune.steps 0).")
    out = pipe.clone()
    info = entry.impl(out, recipe, opts, ctx) or {}
    if recipe.finetune.steps > 0 and not entry.meta.get("trains_itself"):
        masks = info.pop("_masks", None)
        info["finetune"] = finetune(out, ctx, recipe.finetune, masks=masks)
    info.pop("_masks", None)
    return out, info


def copy_unet(unet: nn.Module) -> nn.Module:
    return copy.deepcopy(unet)


def build_context(dense: Pipeline, recipe: DiffusionRecipe, *, hidden: torch.Tensor | None = None,
                  images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  progress: bool = True) -> Context:
    """The context of one run: ``recipe.calib_samples`` calibration conditions (the classes in turn, or the given
    prompt embeddings ``hidden``) with seeded noise, and the training images. A pipeline trained here on
    Fashion-MNIST (its record says so) gets its training images by default."""
    g = torch.Generator().manual_seed(recipe.seed)
    if hidden is not None:
        cond = Condition(hidden=hidden)
    else:
        cond = dense.condition(torch.arange(recipe.calib_samples) % 10, guidance=False)
    with torch.no_grad():
        cond = Condition(*(None if t is None else t.detach() for t in
                           (cond.hidden, cond.labels, cond.null_hidden, cond.null_labels)))
    noise = torch.randn((len(cond), *dense.in_shape()), generator=g)
    if images is None and "Fashion-MNIST" in str(dense.record.get("source", "")):
        from prunekit.diffusion.reference import images as fashion

        images, labels = fashion("train", dense.in_shape()[-1])
    return Context(dense, cond, noise, recipe.calib_steps, images, labels, recipe.seed, progress)

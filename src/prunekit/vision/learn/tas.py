"""TAS, "Network Pruning via Transformable Architecture Search" (Dong & Yang, NeurIPS 2019): learner ``tas``.

Width search per layer. Every searchable convolution (a ``Conv2d`` whose output channels are coupled with one
BatchNorm and nothing else, :func:`prunekit.vision.learn.gating.gateable`) has a learnable distribution
``alpha_L`` over candidate widths ``c_j = round(w_j x C)`` (``widths``, default 25/50/75/100 %). In each training
forward of the search the distribution is sampled with Gumbel-softmax at temperature ``tau`` (annealed from
``tau_start`` to ``tau_end``): the ``sample`` (the paper's 2) most probable candidates of ``softmax((alpha + g) /
tau)`` are kept, their probabilities renormalized, and the BatchNorm output is multiplied by the aggregated
channel-wise mask (the paper's channel-wise interpolation of the sampled widths)::

    m_L[c] = sum_{j sampled} p_j 1[c < c_j]           y_L = BN(conv(x)) * m_L

(in eval mode the mask is the argmax width's). The loss is cross-entropy + ``lam`` x the FLOPs loss toward the
target ``T = macs_target`` x the dense MACs::

    L_cost = log E[F]  if F(argmax) > (1 + tolerance) T;  -log E[F]  if F(argmax) < (1 - tolerance) T;  else 0

with ``E[F] = sum_L macs_L x E[kept_out_L] / out_L x E[kept_in_L] / in_L`` under ``softmax(alpha)``
(:func:`~prunekit.vision.learn.gating.executed_macs` with keep probabilities ``P(c < c_j)``). The architecture
parameters have their own Adam (``arch_lr``), stepped after every weight step on the same batch's gradients (the
paper alternates the two optimizers on two halves of the training set).

After ``search_epochs`` the argmax widths are taken; with ``fit`` (not in the paper) single width steps, most
probable next candidate first, bring the MACs into the tolerance band when the argmax misses it. The last
channels of every layer are then removed physically on the dependency graph
(:func:`prunekit.vision.channels.prune_channels` with ``remove=``; the searched weights of the first channels are
kept) and the smaller network is trained ``finetune_epochs`` with knowledge distillation from the dense network
(cross-entropy + ``kd_weight`` x ``T^2 KL(p_teacher^T || p_student^T)``, :func:`prunekit.core.loop.kd_loss`),
then its BatchNorm statistics are re-estimated (``bn_recalibrate``). Schedule: ``epochs`` dense (the teacher),
``search_epochs`` search, ``finetune_epochs`` distillation. Depth is not searched (the zoo models have no
optional blocks).
"""

from __future__ import annotations

import copy
import math

import torch
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.core.progress import say
from prunekit.errors import PruneError
from prunekit.vision.learn import LEARNED
from prunekit.vision.learn.gating import LayerPlan, executed_macs, layer_plan, switchable


class TasOptions(Config):
    """The options of learner ``tas`` (recipe ``options``, ``--option KEY=VALUE``)."""

    what = "tas option"
    widths: list[float] = Field([0.25, 0.5, 0.75, 1.0], description="candidate widths, fractions of each "
                                "searchable layer's channels (increasing, the last 1.0)")
    macs_target: float = Field(0.5, description="target MACs as a fraction of the dense network's")
    tolerance: float = Field(0.05, description="the FLOPs loss is 0 while the argmax MACs are within this "
                             "fraction of the target")
    lam: float = Field(2.0, description="weight of the FLOPs loss (the paper's 2)")
    search_epochs: int = Field(1, description="epochs of the width search (after `epochs` of dense training)")
    sample: int = Field(2, description="candidates sampled per forward (the paper's 2)")
    tau_start: float = Field(10.0, description="Gumbel-softmax temperature at the start of the search")
    tau_end: float = Field(0.1, description="temperature at the end (exponential decay)")
    temperature: float = Field(4.0, description="distillation temperature T")
    kd_weight: float = Field(0.25, description="weight of the distillation term next to cross-entropy (on "
                             "SmallCNN at lr 0.05, weight 1 at T 4 diverged within a few steps; 0.25 did not)")
    arch_lr: float = Field(0.05, description="Adam learning rate of the architecture parameters (the paper's "
                           "1e-3 is for hundreds of epochs)")
    fit: bool = Field(True, description="step argmax widths until the MACs are in the tolerance band")

    @model_validator(mode="after")
    def _check(self):
        w = self.widths
        if len(w) < 2 or any(not 0.0 < a < b for a, b in zip(w, w[1:])) or not 0.0 < w[0] or w[-1] != 1.0:
            raise ValueError(f"widths must be at least two increasing fractions in (0, 1] ending at 1.0, got {w}")
        if not 0.0 < self.macs_target < 1.0:
            raise ValueError(f"macs_target must be in (0, 1), got {self.macs_target}")
        if not 0.0 < self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if not self.lam > 0:
            raise ValueError(f"lam must be positive, got {self.lam}")
        if self.search_epochs < 1:
            raise ValueError(f"search_epochs must be at least 1, got {self.search_epochs}")
        if not 1 <= self.sample <= len(w):
            raise ValueError(f"sample must be in 1..{len(w)} (the number of widths), got {self.sample}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"temperatures need 0 < tau_end <= tau_start, got {self.tau_end} and {self.tau_start}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not self.arch_lr > 0:
            raise ValueError(f"arch_lr must be positive, got {self.arch_lr}")
        if self.kd_weight < 0:
            raise ValueError(f"kd_weight must be >= 0, got {self.kd_weight}")
        return self


class WidthSearch:
    """The search state on a model: candidate channel counts per searchable BatchNorm and, once :meth:`attach`
    ed, forward hooks that multiply each BatchNorm output by its width mask, whose logits ``alpha`` (one vector
    per searchable BatchNorm, kept here, not in the model) have their own Adam (:meth:`step`)."""

    def __init__(self, model: nn.Module, pairs: dict[str, str], plan: dict[str, LayerPlan], widths, sample: int = 2):
        mods = dict(model.named_modules())
        self.model, self.plan, self.sample, self.tau = model, plan, sample, 1.0
        self.bns = list(pairs.values())
        self.channels = {bn: mods[bn].num_features for bn in self.bns}
        self.counts = {bn: [max(1, round(w * c)) for w in widths] for bn, c in self.channels.items()}
        # below[bn][j, c] = 1 where channel c runs at candidate width j (the first c_j channels)
        self.below = {bn: (torch.arange(c)[None, :] < torch.tensor(self.counts[bn])[:, None]).float()
                      for bn, c in self.channels.items()}
        self.dense = float(sum(p.macs for p in plan.values()))
        self.hooks: list = []

    def attach(self, lr: float = 0.05) -> None:
        """Start the search: uniform architecture parameters (alpha = 0), their Adam (learning rate ``lr``, the
        paper's weight decay 1e-3) and the mask hooks on the model."""
        mods = dict(self.model.named_modules())
        self.alphas = [torch.zeros(len(self.below[bn]), requires_grad=True) for bn in self.bns]
        self.opt = torch.optim.Adam(self.alphas, lr=lr, betas=(0.5, 0.999), weight_decay=1e-3)
        self.hooks = [mods[bn].register_forward_hook(self._hook(i, bn)) for i, bn in enumerate(self.bns)]

    def alpha(self, i: int) -> torch.Tensor:
        return self.alphas[i]

    def step(self) -> None:
        """One Adam step of the architecture parameters on the gradients of the last backward, then clear them."""
        if any(a.grad is not None for a in self.alphas):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def _hook(self, i: int, bn: str):
        def hook(mod, inputs, y):
            return y * self.mask(i, bn, self.model.training)[None, :, None, None]
        return hook

    def mask(self, i: int, bn: str, sampled: bool) -> torch.Tensor:
        """Channel mask of layer ``i``: the renormalized top-``sample`` Gumbel-softmax candidates' masks, weighted
        (training), or the argmax width's mask (eval)."""
        a = self.alpha(i)
        if not sampled:
            return self.below[bn][int(a.argmax())]
        u = torch.rand_like(a).clamp(1e-10, 1 - 1e-10)
        p = torch.softmax((a - torch.log(-torch.log(u))) / self.tau, 0)
        top = p.topk(self.sample).indices
        w = p[top] / p[top].sum()
        return (w[:, None] * self.below[bn][top]).sum(0)

    def choice(self) -> dict[str, int]:
        """The argmax candidate index per searchable BatchNorm."""
        return {bn: int(self.alpha(i).argmax()) for i, bn in enumerate(self.bns)}

    def macs(self, choice: dict[str, int]) -> float:
        """MACs per input of the network with the widths ``choice`` (candidate index per BatchNorm)."""
        return float(executed_macs(self.plan, {bn: self.below[bn][j][None] for bn, j in choice.items()})[0])

    def expected_macs(self) -> torch.Tensor:
        """E[F] under softmax(alpha): a channel runs with probability sum_j p_j 1[c < c_j]."""
        keep = {bn: (torch.softmax(self.alpha(i), 0) @ self.below[bn])[None] for i, bn in enumerate(self.bns)}
        return executed_macs(self.plan, keep)[0]

    def cost_loss(self, target: float, tolerance: float) -> torch.Tensor:
        """TAS's FLOPs loss: log E[F] above the band, -log E[F] below it, 0 inside (on the argmax MACs)."""
        now = self.macs(self.choice())
        if now > (1 + tolerance) * target:
            return torch.log(self.expected_macs() / self.dense)
        if now < (1 - tolerance) * target:
            return -torch.log(self.expected_macs() / self.dense)
        return torch.zeros(())

    def fit(self, target: float, tolerance: float) -> tuple[dict[str, int], int]:
        """The argmax widths, moved one candidate at a time (the layer whose next candidate is most probable
        first) until the MACs are within ``tolerance`` of ``target`` or no step helps; returns (choice, steps)."""
        choice, steps = self.choice(), 0
        probs = {bn: torch.softmax(self.alpha(i).detach(), 0) for i, bn in enumerate(self.bns)}
        for _ in range(sum(len(c) for c in self.counts.values())):
            now = self.macs(choice)
            down = now > (1 + tolerance) * target
            if not down and now >= (1 - tolerance) * target:
                break
            moves = []
            for bn, j in choice.items():
                k = j - 1 if down else j + 1
                if 0 <= k < len(self.counts[bn]):
                    trial = {**choice, bn: k}
                    if down or self.macs(trial) <= (1 + tolerance) * target:
                        moves.append((float(probs[bn][k]), bn, k))
            if not moves:
                break
            _, bn, k = max(moves)
            choice[bn] = k
            steps += 1
        return choice, steps

    def remove(self) -> None:
        """Take the mask hooks off the model."""
        for h in self.hooks:
            h.remove()
        self.hooks = []


def run(cfg, model: nn.Module, data: dict, ctx):
    """Train ``cfg.epochs`` dense (the teacher), search the widths ``search_epochs``, build the chosen network and
    distil into it ``cfg.finetune_epochs``; returns (the smaller model, None)."""
    from prunekit.core.loop import kd_loss
    from prunekit.vision.channels import count_macs, prune_channels
    from prunekit.vision.train import evaluate, recalibrate_bn, train_epochs

    o = ctx.options
    example = data["x_train"][:2]
    pairs = switchable(model, example, cfg.exclude, "TAS", cfg.model)
    plan = layer_plan(model, example, pairs)
    search = WidthSearch(model, pairs, plan, o.widths, o.sample)
    target = o.macs_target * search.dense
    floor = search.macs({bn: 0 for bn in search.bns})
    if floor > (1 + o.tolerance) * target:
        raise PruneError(f"macs_target {o.macs_target} is below what the smallest widths reach "
                         f"({floor / search.dense:.3f} of the dense MACs); raise it or add a smaller width.")
    train_epochs(model, data, cfg.epochs, cfg, None, "dense", ctx.history, progress=ctx.progress, seed=cfg.seed,
                 journey=ctx.journey)
    teacher_acc = evaluate(model, data["x_test"], data["y_test"])
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    search.attach(o.arch_lr)
    steps = max(1, o.search_epochs * math.ceil(len(data["y_train"]) / cfg.batch_size))

    def anneal(step):  # before each step: the architecture step on the last backward's gradients, the new tau
        search.step()
        search.tau = o.tau_start * (o.tau_end / o.tau_start) ** (min(step, steps - 1) / max(1, steps - 1))
        return None

    train_epochs(model, data, o.search_epochs, cfg, None, "search", ctx.history, on_step=anneal,
                 progress=ctx.progress, seed=cfg.seed + 1, journey=ctx.journey,
                 regularizer=lambda m: o.lam * search.cost_loss(target, o.tolerance))
    search.step()
    argmax = search.choice()
    choice, fitted = search.fit(target, o.tolerance) if o.fit else (argmax, 0)
    probs = {bn: [round(float(v), 4) for v in torch.softmax(search.alpha(i).detach(), 0)]
             for i, bn in enumerate(search.bns)}
    with torch.no_grad():  # the chosen widths as the eval masks, for the accuracy before removal
        for i, bn in enumerate(search.bns):
            search.alpha(i).copy_(torch.nn.functional.one_hot(torch.tensor(choice[bn]), len(o.widths)).float())
    searched_acc = evaluate(model, data["x_test"], data["y_test"])
    macs_chosen = search.macs(choice)
    search.remove()
    remove = {bn: list(range(search.counts[bn][j], search.channels[bn])) for bn, j in choice.items()}
    remove = {bn: r for bn, r in remove.items() if r}
    macs_before = count_macs(model, example[:1])
    ctx.info["dense_acc"] = searched_acc
    ctx.info["channels"] = prune_channels(model, example, 0.0, ignore=list(cfg.exclude), remove=remove)
    ctx.info["acc_after_prune"] = evaluate(model, data["x_test"], data["y_test"])
    if ctx.progress:
        say(f"tas: widths {[search.counts[bn][j] for bn, j in choice.items()]}, "
            f"{macs_chosen / search.dense:.1%} of the dense MACs (target {o.macs_target:.0%}); distilling")
    seen = {}
    hook = model.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))

    def distill(m):
        with torch.no_grad():
            t = teacher(seen["x"])
        return o.kd_weight * kd_loss(seen["out"], t, o.temperature)

    out_hook = model.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))
    train_epochs(model, data, cfg.finetune_epochs, cfg, None, "distill", ctx.history, progress=ctx.progress,
                 seed=cfg.seed + 2, journey=ctx.journey, regularizer=distill if o.kd_weight > 0 else None)
    hook.remove()
    out_hook.remove()
    if cfg.bn_recalibrate:
        recalibrate_bn(model, data, 20, cfg.batch_size, cfg.seed)
    after = {bn: dict(model.named_modules())[bn].num_features for bn in search.bns}
    ctx.info["learn"] = {
        "method": "tas", "widths": o.widths, "macs_target": o.macs_target, "tolerance": o.tolerance, "lam": o.lam,
        "layers": {bn: {"channels": search.channels[bn], "kept": after[bn], "argmax": search.counts[bn][argmax[bn]],
                        "probs": probs[bn]} for bn in search.bns},
        "fit_steps": fitted, "macs_argmax": search.macs(argmax), "macs_chosen": macs_chosen,
        "macs_before": macs_before, "macs_after": count_macs(model, example[:1]),
        "params_before": ctx.info["channels"]["params_before"],
        "params_after": sum(p.numel() for p in model.parameters()),
        "teacher_acc": teacher_acc, "acc_searched": searched_acc, "acc_after_removal": ctx.info["acc_after_prune"],
    }
    return model, None


LEARNED.register("tas", run, params=TasOptions,
                 description="differentiable width search (Gumbel-softmax over candidate widths, FLOPs loss "
                             "toward a MACs target), the argmax network built and distilled from the dense one "
                             "(Dong & Yang 2019)")

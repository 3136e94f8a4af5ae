"""Dynamic channel gating, "Fire Together Wire Together" (Elkerdawy et al., CVPR 2022): learner ``gating``.

Every **gated convolution** (a ``Conv2d`` whose output channels are coupled with one BatchNorm and nothing else on
the dependency graph: no residual add, concatenation or depthwise partner, not the model's output) gets a small
mask predictor that looks at the block input ``x`` and decides, per input, which of its output channels run::

    logits = W_g . GAP(x) + b_g              (one Linear per gated conv: in_channels -> out_channels)
    keep   = sigmoid(logits) > threshold     (hard gate, also in training: the paper's binarizer)
    y      = BN(conv(x)) * keep              (a closed channel is exactly 0 after its BatchNorm)

The predictors are trained **self-supervised**: for each input the target mask is the top-k channels of the
layer's own activation heat map ``H_c = max_{h,w} |BN(conv(x))_c|`` (``heat: mean``: the spatial mean), computed in
the same forward before gating (the paper's code), with ``k = max(1, round((1 - sparsity) C))``
(``target: topk``, the recipe's sparsity) or the fewest channels holding ``mass`` of the heat (``target: mass``,
the paper's default). Loss = cross-entropy + ``lam`` x mean over gated layers of BCE(logits, target); the
predictor sees ``x`` detached (the paper's "decoupled" mode), the backbone is fine-tuned through the gated forward.
The predictors start open (weight 0, bias ``+0.1``) so the fine-tune starts from the dense model.

Schedule: ``epochs`` of dense training, then ``finetune_epochs`` with the gates and the BCE term. Reported: the
average **executed MACs** per test input, ``sum_L macs_L x kept_out_L / out_L x kept_in_L / in_L`` (kept-in: the
input channels whose producing gate is open, through the dependency graph, so a Linear after a flatten counts its
features too) plus the predictors' own MACs, and the measured **CPU speed** of a gated execution that skips work
(batch 1: each gated plain ``Conv2d`` computes only the open output channels from the open input channels, with
``index_select`` on the weight) against the ungated network. With a threshold below 0 every gate is open and
the gated model equals the dense model exactly.

The gated modules keep their class's parameters and names (``features.0.weight`` ...); each predictor is the
conv's submodule ``gate`` (``features.0.gate.weight``). A saved run loads back through the entry's ``rebuild``
meta (:func:`rebuild_gates`), which installs the recorded gates on the fresh model.

The helpers :func:`gateable`, :func:`layer_plan` and :func:`executed_macs` (which output channels can be switched
per layer, and what that saves) are shared with learner ``tas``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.core.progress import say
from prunekit.errors import PruneError
from prunekit.vision.learn import LEARNED, named_modules

OPEN_BIAS = 0.1  # the predictors' initial bias: every gate (just) open


class GatingOptions(Config):
    """The options of learner ``gating`` (recipe ``options``, ``--option KEY=VALUE``)."""

    what = "gating option"
    lam: float = Field(1.0, description="weight of the predictors' BCE loss (summed over a layer's channels) "
                       "against the heat-map targets")
    target: Literal["topk", "mass"] = Field("topk", description="topk: the (1 - sparsity) x C hottest channels per "
                                            "input; mass: the fewest hottest channels holding `mass` of the heat")
    mass: float = Field(0.9, description="target mass: fraction of the heat the kept channels hold")
    heat: Literal["max", "mean"] = Field("max", description="heat map per channel: spatial max (the paper's code) "
                                         "or mean of |activation|")
    threshold: float = Field(0.5, description="a gate is open where sigmoid(logit) > threshold")
    speed_images: int = Field(64, description="test images timed one at a time (gated vs dense); 0 skips timing")

    @model_validator(mode="after")
    def _check(self):
        if not self.lam > 0:
            raise ValueError(f"lam must be positive, got {self.lam}")
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.speed_images < 0:
            raise ValueError(f"speed_images must be >= 0, got {self.speed_images}")
        return self


# -- which channels can be switched, and what that saves (shared with tas) -------------------------------------

def gateable(model: nn.Module, example: torch.Tensor, exclude=()) -> dict[str, str]:
    """conv name -> BatchNorm name for every ``Conv2d`` (groups 1) whose output goes straight into a BatchNorm2d
    and whose output channels are coupled on the dependency graph with that BatchNorm and nothing else, outside
    ``exclude`` and not the model's output: switching such a channel off zeroes one BatchNorm channel and skips one
    filter."""
    from prunekit.vision.channels import coupled_outputs, output_modules

    def inside(n: str) -> bool:
        return any(n == e or n.startswith(e + ".") for e in exclude)

    mods = dict(model.named_modules())
    bns = [n for n, m in mods.items() if isinstance(m, nn.BatchNorm2d) and m.affine and not inside(n)]
    if not bns:
        return {}
    was = model.training
    names = {m: n for n, m in mods.items()}
    stay = {names[m] for m in output_modules(model.eval(), example)}
    coupled = coupled_outputs(model, example, bns)
    seen: dict[str, torch.Tensor] = {}  # which tensor each conv returned and each BatchNorm took
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.__setitem__(names[mod], o)) for m in mods.values()
             if isinstance(m, nn.Conv2d)]
    hooks += [mods[n].register_forward_pre_hook(lambda mod, i: seen.__setitem__(names[mod], i[0])) for n in bns]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    model.train(was)
    pairs = {}
    for bn, group in coupled.items():
        convs = [c for c in group if c != bn]
        if len(group) != 2 or len(convs) != 1:
            continue
        conv = mods[convs[0]]
        if isinstance(conv, nn.Conv2d) and conv.groups == 1 and convs[0] not in stay and not inside(convs[0]) \
                and seen.get(convs[0]) is seen.get(bn) is not None:
            pairs[convs[0]] = bn
    return pairs


@dataclass
class LayerPlan:
    """What one conv / linear layer costs and which switchable channels it touches (for one input)."""

    macs: int  # dense multiply-accumulates for one input
    width: int  # output channels (conv) / features (linear)
    fan_in: int  # input channels / features
    out_of: str | None  # the switchable BatchNorm whose channels are this layer's output channels, or None
    inputs: list  # [(BatchNorm name, LongTensor: the root channel of each of this layer's inputs in that group)]
    plain: bool = False  # an nn.Conv2d itself (groups 1): skip mode can slice its weight


def layer_plan(model: nn.Module, example: torch.Tensor, pairs: dict[str, str]) -> dict[str, LayerPlan]:
    """For every conv and linear layer of ``model``: its dense MACs for one input (``example[:1]``), and which of
    its output and input channels belong to the switchable groups ``pairs`` (conv -> BatchNorm), read from the
    dependency graph (a Linear after a flatten sees each channel's h x w features)."""
    from prunekit.vision.channels import _out_groups, _plain

    macs: dict[nn.Module, int] = {}

    def conv(m, i, o):
        macs[m] = o[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def lin(m, i, o):
        macs[m] = o[0].numel() * m.in_features

    layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
              and not isinstance(m, _Predictor)]
    hooks = [m.register_forward_hook(conv if isinstance(m, nn.modules.conv._ConvNd) else lin) for m in layers]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    names = {m: n for n, m in model.named_modules()}
    plan = {names[m]: LayerPlan(macs.get(m, 0), m.out_channels if isinstance(m, nn.modules.conv._ConvNd)
                                else m.out_features, m.in_channels if isinstance(m, nn.modules.conv._ConvNd)
                                else m.in_features, None, [], type(m) is nn.Conv2d and m.groups == 1)
            for m in layers}
    for c, bn in pairs.items():
        plan[c].out_of = bn
    if pairs:
        dg, groups = _out_groups(model, example[:1], list(pairs.values()))
        for bn, group in groups.items():
            for it in group or []:
                target = it.dep.target.module
                if dg.is_out_channel_pruning_fn(it.dep.handler) or target not in names or names[target] not in plan:
                    continue
                idx, root = _plain(it.idxs), _plain(it.root_idxs)
                order = idx.argsort()
                plan[names[target]].inputs.append((bn, root[order]))
    model.train(was)
    return plan


def executed_macs(plan: dict[str, LayerPlan], keep: dict[str, torch.Tensor]) -> torch.Tensor:
    """MACs per input when the channels of each switchable group run with ``keep[bn]`` ([N, C], 1 = runs; a
    probability gives the expectation over independent layers): ``sum_L macs_L x kept_out / out x kept_in / in``."""
    n = next(iter(keep.values())).shape[0] if keep else 1
    total = torch.zeros(n)
    for p in plan.values():
        out = keep[p.out_of].float().sum(1) / p.width if p.out_of in keep else torch.ones(n)
        off = torch.zeros(n)
        for bn, root in p.inputs:
            if bn in keep:
                off = off + (1 - keep[bn].float()[:, root]).sum(1)
        total = total + p.macs * out * (1 - off / p.fan_in)
    return total


# -- the gated modules ----------------------------------------------------------------------------------------

class _Predictor(nn.Linear):
    """A gate's mask predictor (GAP of the block input -> logits per output channel)."""


class _GatedConv(nn.Module):
    """Mixin put in front of a conv's own class. With a predictor (submodule ``gate``) it predicts the gate from
    the input. In skip mode (eval, batch 1, a plain ``Conv2d``) it computes only the open output channels (its own
    gate) from the open input channels (``gate_input``: the gated conv whose channels are its whole input) with its
    BatchNorm folded in (``gate_folded``, see :func:`set_gates`); the BatchNorm then passes that very tensor on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._modules.get("gate")
        if gate is not None:
            pooled = x.mean(tuple(range(2, x.dim())))
            self.gate_logits = gate(pooled.detach() if self.training else pooled)
            self.gate_keep = torch.sigmoid(self.gate_logits) > self.gate_threshold
        if self.gate_skip and not self.training and x.shape[0] == 1 and type(self).__mro__[2] is nn.Conv2d:
            kout = self.gate_keep[0].nonzero().flatten() if gate is not None else None
            kin = self.gate_input[0].gate_keep[0].nonzero().flatten() if self.gate_input else None
            if (kout is None or len(kout)) and (kin is None or len(kin)):  # else: the dense path (exact, rare)
                w, b = (self.weight, self.bias) if kout is None else self.gate_folded
                if kout is not None:
                    w, b = w.index_select(0, kout), b.index_select(0, kout)
                if kin is not None:
                    x, w = x.index_select(1, kin), w.index_select(1, kin)
                small = self._conv_forward(x, w, b)
                if kout is None:
                    return small
                out = small.new_zeros((1, self.out_channels, *small.shape[2:])).index_copy_(1, kout, small)
                self.gate_bn[0].gate_done = out
                return out
        return super().forward(x)


class _GatedBN(nn.Module):
    """Mixin put in front of a BatchNorm's class: multiplies its output by the partner conv's gate and records
    the heat-map target of the ungated output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_done is not None and x is self.gate_done:  # skip mode: the conv already normalized and gated
            self.gate_done = None
            return x
        y = super().forward(x)
        conv = self.gate_conv[0]
        if self.training:
            with torch.no_grad():
                heat = y.abs().amax((2, 3)) if self.gate_heat == "max" else y.abs().mean((2, 3))
                conv.gate_target = target_mask(heat, self.gate_rule, self.gate_amount)
        return y * conv.gate_keep.to(y.dtype)[:, :, None, None]


def target_mask(heat: torch.Tensor, rule: str, amount: float) -> torch.Tensor:
    """The self-supervised target per input (rows of ``heat`` [N, C]): ``topk``: 1 on the ``max(1, round(amount x
    C))`` hottest channels; ``mass``: 1 on the fewest hottest channels whose heat reaches ``amount`` of the row's
    total (ties by position, lowest index first)."""
    n, c = heat.shape
    order = heat.argsort(dim=1, descending=True, stable=True)
    if rule == "topk":
        k = torch.full((n,), max(1, min(c, round(amount * c))), dtype=torch.long)
    else:
        sorted_heat = heat.gather(1, order)
        share = sorted_heat.cumsum(1) / sorted_heat.sum(1, keepdim=True).clamp_min(1e-12)
        k = ((share < amount - 1e-9).sum(1) + 1).clamp(1, c)
    ranks = torch.arange(c).expand(n, c)
    out = torch.zeros_like(heat)
    out.scatter_(1, order, (ranks < k[:, None]).to(heat.dtype))
    return out


def _swap(mod: nn.Module, mixin: type) -> None:
    mod.__class__ = type(f"Gated{type(mod).__name__}", (mixin, type(mod)), {})


def install_gates(model: nn.Module, pairs: dict[str, str], feeds: dict[str, str] | None = None,
                  threshold: float = 0.5, heat: str = "max", rule: str = "topk", amount: float = 0.5) -> nn.Module:
    """Put a gate on every conv of ``pairs`` (conv -> BatchNorm), in place: the conv gets its predictor ``gate``
    (weight 0, bias ``OPEN_BIAS``: open) and the gated classes; ``feeds`` (conv -> gated conv) names the gated conv
    whose open channels are a conv's whole input (skip mode uses them). Targets: ``rule`` / ``amount`` (topk: the
    kept fraction; mass: the heat mass) of the ``heat`` map."""
    mods = dict(model.named_modules())
    for c, bn in pairs.items():
        conv, norm = mods[c], mods[bn]
        conv.gate = _Predictor(conv.in_channels, conv.out_channels)
        with torch.no_grad():
            conv.gate.weight.zero_()
            conv.gate.bias.fill_(OPEN_BIAS)
        conv.gate_threshold, conv.gate_skip = threshold, False
        conv.gate_keep = conv.gate_logits = conv.gate_target = conv.gate_folded = None
        norm.gate_conv, norm.gate_done, conv.gate_bn = [conv], None, [norm]
        norm.gate_heat, norm.gate_rule, norm.gate_amount = heat, rule, amount
        _swap(conv, _GatedConv)
        _swap(norm, _GatedBN)
    for c in set(pairs) | set(feeds or {}):
        conv = mods[c]
        if c not in pairs:
            conv.gate_skip = False
            _swap(conv, _GatedConv)
        conv.gate_input = [mods[feeds[c]]] if feeds and c in feeds else []
    return model


def gated_convs(model: nn.Module) -> dict[str, nn.Module]:
    """The convs with a gate (predictor), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _GatedConv) and "gate" in m._modules}


def set_gates(model: nn.Module, threshold: float | None = None, skip: bool | None = None) -> nn.Module:
    """Set every gate's threshold (below 0: every gate open) and / or skip mode (entering it folds each gated
    conv's eval-mode BatchNorm into a copy of its weights: set it again after the weights change)."""
    for m in model.modules():
        if isinstance(m, _GatedConv):
            if threshold is not None and "gate" in m._modules:
                m.gate_threshold = threshold
            if skip is not None:
                m.gate_skip = skip
            if skip and "gate" in m._modules:
                bn = m.gate_bn[0]
                with torch.no_grad():
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    shift = bn.bias - bn.running_mean * scale
                    if m.bias is not None:
                        shift = shift + m.bias * scale
                    m.gate_folded = (m.weight * scale.view(-1, 1, 1, 1), shift)
    return model


def strip_gates(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without gates or predictors: the dense network the gates sit on."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, (_GatedConv, _GatedBN)):
            m.__class__ = m.__class__.__mro__[2]
            for k in [k for k in vars(m) if k.startswith("gate_")]:
                delattr(m, k)
            if "gate" in m._modules:
                del m._modules["gate"]
    return out


def feeds_of(plan: dict[str, LayerPlan], pairs: dict[str, str]) -> dict[str, str]:
    """conv -> the gated conv whose channels are, one to one, this plain conv's whole input (skip mode's input
    side)."""
    conv_of = {bn: c for c, bn in pairs.items()}
    out = {}
    for name, p in plan.items():
        if p.plain and len(p.inputs) == 1:
            bn, root = p.inputs[0]
            if len(root) == p.fan_in and torch.equal(root, torch.arange(p.fan_in)):
                out[name] = conv_of[bn]
    return out


def bce_loss(model: nn.Module) -> torch.Tensor:
    """BCE-with-logits(predictor logits, heat-map target) of the last forward, summed over each layer's channels,
    averaged over the inputs and the gated layers (a per-element mean would give each gate a 1/C-small pull)."""
    convs = [m for m in gated_convs(model).values() if m.gate_target is not None]
    return sum(F.binary_cross_entropy_with_logits(m.gate_logits, m.gate_target, reduction="sum") / len(m.gate_target)
               for m in convs) / max(1, len(convs))


@torch.no_grad()
def gate_report(model: nn.Module, plan: dict[str, LayerPlan], pairs: dict[str, str], x: torch.Tensor,
                batch_size: int = 500) -> dict:
    """Average executed MACs per input of ``x`` (gates as set), the predictors' MACs, and the open fraction per
    gated layer."""
    was = model.training
    model.eval()
    convs = dict(model.named_modules())
    macs, opened = [], {c: 0.0 for c in pairs}
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
        keep = {bn: convs[c].gate_keep for c, bn in pairs.items()}
        macs.append(executed_macs(plan, keep))
        for c in pairs:
            opened[c] += float(convs[c].gate_keep.float().mean(1).sum())
    model.train(was)
    per = torch.cat(macs)
    predictor = sum(convs[c].gate.in_features * convs[c].gate.out_features for c in pairs)
    dense = sum(p.macs for p in plan.values())
    return {"macs_dense": int(dense), "macs_executed": float(per.mean()), "macs_predictors": int(predictor),
            "macs_ratio": (float(per.mean()) + predictor) / dense,
            "macs_min": float(per.min()), "macs_max": float(per.max()),
            "open_fraction": {c: v / len(x) for c, v in opened.items()}}


@torch.no_grad()
def batch1_seconds(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Seconds per image of ``model`` (eval mode) fed the images of ``x`` one at a time: best of ``repeats``
    passes, after 4 warm-up images."""
    model.eval()
    for i in range(min(4, len(x))):
        model(x[i:i + 1])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(len(x)):
            model(x[i:i + 1])
        best = min(best, time.perf_counter() - t0)
    return best / len(x)


@torch.no_grad()
def speed(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> dict:
    """Seconds per image, batch 1, of the gated model in skip mode and of its ungated network
    (:func:`batch1_seconds`), on this process's CPU threads."""
    dense = strip_gates(model)
    gated = set_gates(copy.deepcopy(model), skip=True)
    d, g = batch1_seconds(dense, x, repeats), batch1_seconds(gated, x, repeats)
    return {"images": len(x), "dense_ms": 1e3 * d, "gated_ms": 1e3 * g, "speedup": d / g,
            "threads": torch.get_num_threads()}


def rebuild_gates(model: nn.Module, manifest: dict) -> nn.Module:
    """The ``rebuild`` meta of entry ``gating``: the recorded gates installed on a fresh model (load_run)."""
    L = manifest["learn"]
    return install_gates(model, L["gated"], L["feeds"], L["threshold"])


def switchable(model: nn.Module, example: torch.Tensor, exclude, who: str, name: str) -> dict:
    """:func:`gateable` after the checks gating and TAS share: ``exclude`` names modules, the graph supports every
    op, and at least one conv qualifies (else one sentence naming ``who`` needs it)."""
    from prunekit.vision.channels import check_supported, output_modules

    mods = named_modules(model, exclude)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in mods.values())
    if has_bn:
        check_supported(model, output_modules(model.eval(), example) + [mods[n] for n in exclude])
    pairs = gateable(model, example, exclude) if has_bn else {}
    if not pairs:
        raise PruneError(f"{who} needs convolutions followed by a BatchNorm whose channels no other layer shares; "
                         f"model {name!r} has none (choose a model such as cnn or resnet).")
    return pairs


def run(cfg, model: nn.Module, data: dict, ctx):
    """Train ``cfg.epochs`` dense, install the gates, fine-tune ``cfg.finetune_epochs`` with the predictors'
    BCE; returns (the gated model, None)."""
    from prunekit.vision.train import evaluate, train_epochs

    o = ctx.options
    example = data["x_train"][:2]
    pairs = switchable(model, example, cfg.exclude, "Gating", cfg.model)
    train_epochs(model, data, cfg.epochs, cfg, None, "dense", ctx.history, progress=ctx.progress, seed=cfg.seed,
                 journey=ctx.journey)
    dense_acc = evaluate(model, data["x_test"], data["y_test"])
    plan = layer_plan(model, example, pairs)
    feeds = feeds_of(plan, pairs)
    amount = 1.0 - cfg.sparsity if o.target == "topk" else o.mass
    install_gates(model, pairs, feeds, o.threshold, o.heat, o.target, amount)
    if ctx.progress:
        say(f"gating: {len(pairs)} gated convolutions, target {o.target} "
            f"({'keep ' + format(amount, '.0%') if o.target == 'topk' else 'mass ' + str(o.mass)})")
    train_epochs(model, data, cfg.finetune_epochs, cfg, None, "gating", ctx.history, progress=ctx.progress,
                 seed=cfg.seed + 1, journey=ctx.journey, regularizer=lambda m: o.lam * bce_loss(m))
    model.eval()
    rep = gate_report(model, plan, pairs, data["x_test"])
    acc = evaluate(model, data["x_test"], data["y_test"])
    timing = speed(model, data["x_test"][:o.speed_images]) if o.speed_images else None
    if ctx.progress:
        say(f"gating: {rep['macs_ratio']:.1%} of the dense MACs executed on average, test accuracy {acc:.4f}"
            + (f", batch-1 speed-up {timing['speedup']:.2f}x" if timing else ""))
    ctx.info["learn"] = {
        "method": "gating", "lam": o.lam, "target": o.target, "amount": amount, "heat": o.heat,
        "threshold": o.threshold, "gated": pairs, "feeds": feeds, "dense_acc": dense_acc, "gated_acc": acc,
        **rep, "speed": timing,
    }
    return model, None


LEARNED.register("gating", run, params=GatingOptions, rebuild=rebuild_gates,
                 description="per-input channel gates from GAP -> linear predictors trained on the layers' top-k "
                             "heat maps (BCE), average executed MACs and batch-1 speed (Elkerdawy et al. 2022)")

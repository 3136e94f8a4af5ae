"""Pruning by Explaining (Yeom et al., Pattern Recognition 2021): layer-wise relevance propagation (LRP) as the
pruning criterion (train-prune criterion ``lrp``, weights and channels).

Each reference sample's relevance starts as 1 at its true class (the paper's ``output * onehot / sum``) and is
propagated back to the input, layer by layer:

* linear and convolution layers (any subclass, e.g. TF-"same" convolutions, depthwise or grouped ones) follow a rule,
  with z the layer's output **without its bias** (the paper's code ignores the bias, so relevance is conserved):

  - ``epsilon``:    R_j = sum_i a_j w_ij / (z_i + eps sign(z_i)) R_i  (sign(0) = +1);
  - ``alpha-beta``: R_j = sum_i (alpha z_ij+ / z_i+ - beta z_ij- / z_i-) R_i, beta = alpha - 1, z_ij = a_j w_ij
    split into its positive and negative contributions (inputs of either sign); rule ``alpha-beta`` (the default,
    alpha 2, beta 1, as in the paper) applies it to convolutions and ``epsilon`` to linear layers, rule ``epsilon``
    applies epsilon everywhere;
* normalization layers, activation modules and dropout pass relevance through unchanged (the paper's choice for
  BatchNorm and ReLU); every other operation (functional activations, pooling, flatten, residual adds) passes it
  by its gradient (exact for ReLU and max/average pooling; a residual add hands each branch the whole relevance).

The relevance of a weight w_ij is the sum over reference samples and positions of |R_ij|, the absolute
contributions (the paper's code sums absolute relevances): ``|w| * correlation(|a|, |R / z|)`` per rule term,
computed with the layer's own weight gradient. The channel criterion sums it over each Torch-Pruning channel group
(the filter's rows, the consumers' columns), like the other weight criteria (:class:`~prunekit.vision.channels.
ScoreImportance`). zennit (the LRP library the paper's later code uses) imports torchvision, which must match the
pinned CPU torch build exactly, so the rules are computed here with plain autograd.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.core.masks import Masks
from prunekit.errors import PruneError

RULE_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
PASS_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
               nn.modules.dropout._DropoutNd, nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU,
               nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Tanh, nn.Sigmoid,
               nn.Hardsigmoid)


class LrpOptions(Config):
    """The options of the criterion ``lrp`` (recipe ``options``, CLI ``--option KEY=VALUE``); the paper's defaults."""

    what = "lrp option"
    rule: Literal["epsilon", "alpha-beta"] = "alpha-beta"
    alpha: float = 2.0
    epsilon: float = 1e-6

    @model_validator(mode="after")
    def _check(self):
        if not self.alpha >= 1.0:
            raise ValueError(f"alpha must be >= 1 (beta = alpha - 1 >= 0); got {self.alpha:g}")
        if not self.epsilon > 0.0:
            raise ValueError(f"epsilon (the stabilizer) must be positive; got {self.epsilon:g}")
        return self


def _rule_of(module: nn.Module, opts: LrpOptions) -> str:
    if opts.rule == "alpha-beta" and isinstance(module, nn.modules.conv._ConvNd):
        return "alpha-beta"
    return "epsilon"


class _Layer:
    """One rule layer during a pass: its rule, and the summed absolute relevance of its weights."""

    def __init__(self, module: nn.Module, rule: str, opts: LrpOptions, keep_score: bool):
        self.module, self.rule, self.opts = module, rule, opts
        self.score = torch.zeros_like(module.weight, dtype=torch.float32) if keep_score else None
        self.calls = 0
        self.busy = False  # inside propagate: the layer's own forward runs without the rule hook

    def z(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's own forward (padding, stride, groups) with ``weight`` and no bias."""
        params = {"weight": weight}
        if getattr(self.module, "bias", None) is not None:
            params["bias"] = torch.zeros_like(self.module.bias)
        self.busy = True
        try:
            return torch.func.functional_call(self.module, params, (x,))
        finally:
            self.busy = False

    def propagate(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The relevance of the layer's input from ``r``, the relevance of its output; adds the weights' share."""
        w = self.module.weight.detach().float()
        x, r = x.detach().float(), r.float()
        eps = self.opts.epsilon
        with torch.enable_grad():
            if self.rule == "epsilon":
                a = x.clone().requires_grad_(True)
                z = self.z(a, w)
                s = r / (z + torch.where(z >= 0, eps, -eps)).detach()
                (g,) = torch.autograd.grad((z * s).sum(), a)
                r_in = x * g
                if self.score is not None:  # sum over samples and positions of |a_j w_ij s_i|
                    wl = w.clone().requires_grad_(True)
                    (gw,) = torch.autograd.grad((self.z(x.abs(), wl) * s.abs()).sum(), wl)
                    self.score += w.abs() * gw
                return r_in
            alpha = self.opts.alpha
            beta = alpha - 1.0
            xp, xn = x.clamp(min=0), x.clamp(max=0)
            wp, wn = w.clamp(min=0), w.clamp(max=0)
            ap, an = xp.clone().requires_grad_(True), xn.clone().requires_grad_(True)
            zp = self.z(ap, wp) + self.z(an, wn)  # positive contributions z_ij+ summed over j
            zn = self.z(ap, wn) + self.z(an, wp)  # negative ones
            sp = (alpha * r / (zp + eps)).detach()
            sn = (beta * r / (zn - eps)).detach()
            gp, gn = torch.autograd.grad((zp * sp).sum() - (zn * sn).sum(), (ap, an))
            r_in = xp * gp + xn * gn
            if self.score is not None:
                lp, ln = wp.clone().requires_grad_(True), wn.clone().requires_grad_(True)
                xa, xb, asp, asn = xp, xn.abs(), sp.abs(), sn.abs()
                total = ((self.z(xa, lp) * asp).sum() + (self.z(xb, lp) * asn).sum()
                         + (self.z(xb, ln) * asp).sum() + (self.z(xa, ln) * asn).sum())
                gwp, gwn = torch.autograd.grad(total, (lp, ln))
                self.score += wp * gwp + wn.abs() * gwn
            return r_in


class _Rule(torch.autograd.Function):
    """Identity forward on the layer's output; backward: the layer's LRP rule instead of its gradient."""

    @staticmethod
    def forward(ctx, x, out, layer):
        ctx.layer = layer
        ctx.save_for_backward(x)
        return out.clone()

    @staticmethod
    def backward(ctx, r):
        (x,) = ctx.saved_tensors
        return ctx.layer.propagate(x, r).to(x.dtype), None, None


class _Pass(torch.autograd.Function):
    """Identity forward on the module's output; backward: the relevance passes to the input unchanged."""

    @staticmethod
    def forward(ctx, x, out):
        return out.clone()

    @staticmethod
    def backward(ctx, r):
        return r, None


@contextmanager
def _attached(model: nn.Module, opts: LrpOptions, scored: set[str]):
    """Forward hooks that put the rules into ``model``'s backward; yields {module name: _Layer}."""
    layers: dict[str, _Layer] = {}
    hooks = []

    def rule_hook(layer):
        def hook(module, inputs, output):
            if layer.busy:
                return None
            layer.calls += 1
            return _Rule.apply(inputs[0], output.detach(), layer)
        return hook

    def pass_hook(module, inputs, output):
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.shape == output.shape:
            return _Pass.apply(x, output.detach())
        return None

    for name, mod in model.named_modules():
        if isinstance(mod, RULE_LAYERS):
            layers[name] = _Layer(mod, _rule_of(mod, opts), opts, name in scored)
            hooks.append(mod.register_forward_hook(rule_hook(layers[name])))
        elif isinstance(mod, PASS_LAYERS):
            hooks.append(mod.register_forward_hook(pass_hook))
    try:
        yield layers
    finally:
        for h in hooks:
            h.remove()


def _options(options: dict) -> LrpOptions:
    return LrpOptions.make(**options)


def _propagate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One LRP pass (hooks attached): the input relevance, each sample's relevance starting as 1 at class ``y``."""
    a = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(a)
        if out.dim() != 2:
            raise PruneError(f"LRP needs class scores [batch, classes] as the model's output; got shape {list(out.shape)}.")
        seed = F.one_hot(y.long(), out.shape[1]).to(out.dtype)
        (r,) = torch.autograd.grad(out, a, seed)
    return r


def input_relevance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options) -> torch.Tensor:
    """The LRP relevance of every input element of ``x`` for the classes ``y`` (same shape as ``x``); each sample's
    relevance sums to about 1 under rule epsilon (conservation; exactly 1 up to epsilon without residual adds).
    ``options``: :class:`LrpOptions` fields (rule, alpha, epsilon). The model is evaluated in eval mode."""
    opts = _options(options)
    was = model.training
    model.eval()
    try:
        with _attached(model, opts, set()):
            return _propagate(model, x, y)
    finally:
        model.train(was)


def lrp_scores(model: nn.Module, names: Iterable[str], batches: Sequence, masks: Masks | None = None,
               **options) -> dict[str, torch.Tensor]:
    """Keep-scores of the named weights (conv / linear ``.weight`` parameters): the sum over every sample of
    ``batches`` ((x, y) pairs: the reference samples of the target task) and every position of the absolute LRP
    relevance of each weight. ``masks``: the masked network is scored (a copy; ``model`` is not changed).
    ``options``: :class:`LrpOptions` fields. Layers are scored in eval mode (BatchNorm statistics untouched)."""
    opts = _options(options)
    names = list(names)
    if not batches:
        raise PruneError("Criterion 'lrp' needs reference samples (training batches); it is not data-free.")
    mods = dict(model.named_modules())
    owner = {}
    for n in names:
        mname, _, leaf = n.rpartition(".")
        mod = mods.get(mname)
        if leaf != "weight" or not isinstance(mod, RULE_LAYERS):
            raise PruneError(f"Criterion 'lrp' scores the weights of linear and convolution layers; {n!r} belongs to "
                             f"a {type(mod).__name__}: keep it dense (--exclude) or choose another criterion.")
        owner[n] = mname
    net = model
    if masks is not None:
        net = copy.deepcopy(model)
        masks.apply(net)
    was = net.training
    net.eval()
    try:
        with _attached(net, opts, set(owner.values())) as layers:
            for x, y in batches:
                _propagate(net, x, y)
    finally:
        net.train(was)
    missing = [n for n, m in owner.items() if layers[m].calls == 0]
    if missing:
        raise PruneError(f"LRP reached no relevance at {missing[0]!r}: its layer is not called as a module in the "
                         "forward pass (e.g. attention's projections); keep it dense (--exclude) or choose another "
                         "criterion.")
    return {n: layers[owner[n]].score.to(mods[owner[n]].weight.device) for n in names}

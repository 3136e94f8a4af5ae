"""UDFC, data-free channel pruning with compensation and 8-bit weights, no fine-tuning (Bai et al., "Unified
Data-Free Compression: Pruning and Quantization without Fine-Tuning", ICCV 2023): learner ``udfc``.

Sites. A random input of the model's input shape (no data) is traced to find every place where a conv's output
channels, after BatchNorm and an elementwise activation f (identity, ReLU or ReLU6, recognised by value), are the
input of one consumer: a conv (groups 1), or a Linear after global average pooling (**direct** sites); or they first
pass one depthwise conv + BatchNorm + activation (**MBConv** sites: EfficientNet's expand / depthwise / project).

Compensation. Each channel c of a site has a pre-activation y_c = G_c . x + e_c that is linear in the site's input
x: direct, G_c = (gamma_c / sigma_c) W_c (the producer's filter folded with its BatchNorm) and e_c the folded
constant; MBConv, the depthwise stage linearised around its BatchNorm Gaussian, G_c = (gamma1_c / sigma1_c)
kappa0_c (gamma0_c / sigma0_c) W_c (x) D_c, with Gram matrix (G G^T)_cj = a_c a_j <W_c, W_j> <D_c, D_j>, and e_c
= beta1_c. A removed channel p is written as a combination of the kept ones K: s = argmin ||G_p - sum_j s_j G_j||^2
+ sum_j (lam + n_j) s_j^2, lam = ridge tr(G_KK)/|K| (least squares in Gram form; n_j below). The activation is linearised with the Gaussian the
BatchNorm statistics give (y_c ~ N(beta_c, gamma_c^2)): f(y_c) ~ m_c + kappa_c (y_c - beta_c), kappa_c = E f'(y_c),
m_c = E f(y_c) (truncated-Gaussian closed forms for ReLU and ReLU6), and the rest of f(y_c) is taken as noise
independent of the other channels, of variance n_c = Var f(y_c) - kappa_c^2 gamma_c^2 (in Gram units: G_cc (Var
f / (kappa^2 gamma^2) - 1)). The best linear predictor of a_p from the kept a_j under this model is the least
squares above with the ridge lam + n_j on s_j, and

    a_p ~ sum_j t_j a_j + b,   t_j = kappa_p s_j / kappa_j,
    b = m_p + kappa_p (sum_j s_j beta_j + d - beta_p) - sum_j t_j m_j,   d = e_p - sum_j s_j e_j

(channels with kappa_j < ``min_slope`` are left out of K: they are off). The consumer's input weights take the
removed channel's share, V[:, j] += t_j V[:, p]; the constant b goes into the consumer's bias, or its BatchNorm's
running mean (exact away from the zero-padded border). With f the identity and G_p in the span of the kept G_j the
outputs are unchanged. Then the channels are removed on the dependency graph
(:func:`prunekit.vision.channels.prune_channels` with ``remove=``) and every conv / linear weight is quantized to 8 bits per output channel, symmetric: scale_o = max |W_o| / 127, W_o = scale_o
round(W_o / scale_o).

Which channels (:func:`plan_removal`). ``select: error`` (default) scores channel p by the expected squared error
it leaves in the consumer's output when removed alone and rebuilt from all the others,
``||V_p||^2 (Var f(y_p) - kappa_p^2 gamma_p^2 (1 - rho_p))``, rho_p its relative squared residual under the ridge
above (:func:`expected_error`); ``l1``: the producer filter's L1 norm; ``residual``: rho_p alone. ``allocation:
uniform`` removes ``sparsity`` of every site's channels; ``global`` (default) removes ``sparsity`` of all the sites'
channels together, lowest error relative to its site's total ``sum_c ||V_c||^2 Var f(y_c)`` first, at most
``max_site_ratio`` of one site: a site whose channels nothing else can stand in for (a linear bottleneck of 16
channels) is left whole, where the uniform split would cut it as much as the rest (not in the paper, which prunes
layer by layer; on EfficientNet-Lite0 at 10% this is what keeps the ImageNet predictions, see the benchmark).

No data and no fine-tuning: ``epochs`` trains the given model densely before (0: a trained model as it is), and
neither ``finetune_epochs`` nor ``bn_recalibrate`` apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.core.progress import say
from prunekit.errors import PruneError
from prunekit.vision.learn import LEARNED

ACTIVATIONS = {"identity": lambda y: y, "relu": F.relu, "relu6": F.relu6}


class UdfcOptions(Config):
    """The options of learner ``udfc`` (recipe ``options``, ``--option KEY=VALUE``)."""

    what = "udfc option"
    select: Literal["error", "l1", "residual"] = Field(
        "error", description="which channels go: error: lowest expected error of the consumer's output after the "
        "compensation (the consumer's weights on the channel x what the kept channels cannot rebuild of it); l1: "
        "lowest L1 norm of the producer's filter; residual: lowest relative least-squares residual")
    allocation: Literal["global", "uniform"] = Field(
        "global", description="uniform: the sparsity of every site's channels; global: the sparsity of all sites' "
        "channels together, lowest expected error relative to the site's output first (select error)")
    max_site_ratio: float = Field(0.3, description="allocation global: at most this share of one site's channels")
    compensate: bool = Field(True, description="fold each removed channel's reconstruction into the consumer")
    quantize: bool = Field(True, description="8-bit per-output-channel symmetric weights after the removal")
    ridge: float = Field(0.1, description="ridge of the least squares, relative to the mean Gram diagonal (0.1: "
                         "chosen on the Fashion-MNIST transfer model's training images, never on test data)")
    min_slope: float = Field(1e-3, description="kept channels whose activation slope E f' is below this are not "
                             "used in a reconstruction")

    @model_validator(mode="after")
    def _check(self):
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if not 0 <= self.min_slope < 1:
            raise ValueError(f"min_slope must be in [0, 1), got {self.min_slope}")
        if not 0 < self.max_site_ratio < 1:
            raise ValueError(f"max_site_ratio must be in (0, 1), got {self.max_site_ratio}")
        if self.allocation == "global" and self.select != "error":
            raise ValueError(f"allocation global ranks channels of different sites by their expected error; use "
                             f"select=error with it (or allocation=uniform with select={self.select})")
        return self


@dataclass
class Site:
    """Producer conv -> BatchNorm -> f [-> depthwise conv -> BatchNorm -> f1] -> consumer (module names)."""

    producer: str
    bn: str
    act: str
    consumer: str
    pooled: bool = False  # the consumer is a Linear after global average pooling
    dw: str | None = None
    bn1: str | None = None
    act1: str | None = None
    after: str | None = None  # the BatchNorm right after the consumer (takes the constant when it has no bias)

    @property
    def last_act(self) -> str:
        return self.act1 or self.act


def _act_of(out: torch.Tensor, target: torch.Tensor, pooled: bool = False) -> str | None:
    """The activation f with f(out) (globally averaged if ``pooled``) equal to ``target``, or None."""
    for name, f in ACTIVATIONS.items():
        y = f(out)
        if pooled:
            if y.dim() != 4:
                continue
            y = y.mean((2, 3))
        if y.shape == target.shape and torch.allclose(y, target, rtol=1e-5, atol=1e-6):
            return name
    return None


@torch.no_grad()
def find_sites(model: nn.Module, example: torch.Tensor) -> list[Site]:
    """Trace ``model`` on ``example`` (its values do not matter: a random tensor) and return its candidate sites
    (:func:`compress` keeps those whose channels are coupled with nothing else on the dependency graph)."""
    names = {m: n for n, m in model.named_modules()}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(names[m], (i[0], o)))
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.BatchNorm2d))]
    was = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    mods = dict(model.named_modules())
    convs = [n for n in seen if isinstance(mods[n], nn.Conv2d)]
    bns = [n for n in seen if isinstance(mods[n], nn.BatchNorm2d)]
    bn_after = {c: b for c in convs for b in bns if seen[b][0] is seen[c][1]}

    def consumers(out: torch.Tensor):
        for n, (inp, _) in seen.items():
            m = mods[n]
            if isinstance(m, nn.Conv2d) and inp.dim() == 4 and inp.shape[1] == out.shape[1]:
                act = _act_of(out, inp)
                if act is not None:
                    yield n, act, False
            elif isinstance(m, nn.Linear) and inp.dim() == 2 and inp.shape[1] == out.shape[1]:
                act = _act_of(out, inp, pooled=True)
                if act is not None:
                    yield n, act, True

    sites = []
    for p, b in bn_after.items():
        if mods[p].groups != 1:
            continue
        found = list(consumers(seen[b][1]))
        if len(found) != 1:
            continue
        c, act, pooled = found[0]
        cm = mods[c]
        if isinstance(cm, nn.Conv2d) and cm.groups == 1:
            sites.append(Site(p, b, act, c, pooled, after=bn_after.get(c)))
        elif isinstance(cm, nn.Conv2d) and cm.groups == cm.in_channels == cm.out_channels and c in bn_after:
            b1 = bn_after[c]
            nxt = list(consumers(seen[b1][1]))
            if len(nxt) == 1 and isinstance(mods[nxt[0][0]], nn.Conv2d) and mods[nxt[0][0]].groups == 1:
                sites.append(Site(p, b, act, nxt[0][0], False, c, b1, nxt[0][1], bn_after.get(nxt[0][0])))
        elif pooled:
            sites.append(Site(p, b, act, c, True))
    return sites


def gaussian_moments(beta: torch.Tensor, gamma: torch.Tensor, act: str) -> tuple[torch.Tensor, ...]:
    """(m, kappa, v) = (E f(y), E f'(y), Var f(y)) for y ~ N(beta, gamma^2), per channel, for f identity / ReLU /
    ReLU6 (ReLU6 = clip to [0, 6]: truncated-Gaussian moments)."""
    if act == "identity":
        return beta.clone(), torch.ones_like(beta), gamma * gamma
    sd = gamma.abs().clamp_min(1e-12)
    normal = torch.distributions.Normal(torch.zeros((), dtype=beta.dtype), torch.ones((), dtype=beta.dtype))
    cdf, pdf = normal.cdf, lambda z: normal.log_prob(z).exp()
    top = torch.full_like(beta, math.inf) if act == "relu" else torch.full_like(beta, 6.0)
    lo, hi = (0.0 - beta) / sd, (top - beta) / sd
    p_in = cdf(hi) - cdf(lo)  # P(0 < y < top) = E f'(y)
    pdf_hi = torch.where(torch.isinf(hi), torch.zeros_like(hi), pdf(hi))
    p_top = 1 - cdf(hi)
    top_f = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    m1 = beta * p_in + sd * (pdf(lo) - pdf_hi) + top_f * p_top  # E y 1{0<y<top} + top P(y > top)
    m2 = ((beta * beta + sd * sd) * p_in + sd * (beta * pdf(lo) - (beta + top_f) * pdf_hi)
          + top_f * top_f * p_top)  # E y^2 1{0<y<top} = (b^2+s^2)(P) + s[(b+0) phi(lo) - (b+top) phi(hi)]
    return m1, p_in, (m2 - m1 * m1).clamp_min(0)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) with bn(u) = a u + c per channel, in eval mode."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return a, bn.bias - a * bn.running_mean


@torch.no_grad()
def site_terms(model: nn.Module, site: Site) -> dict[str, torch.Tensor]:
    """Per channel of ``site``: the Gram matrix of the linear parts G_c, the constants e_c, the final BatchNorm's
    (beta, gamma), and the activation's Gaussian (m, kappa)."""
    mods = dict(model.named_modules())
    w = mods[site.producer].weight.detach().flatten(1).double()
    a0, c0 = (t.double() for t in _bn_affine(mods[site.bn]))
    bias = mods[site.producer].bias
    if site.dw is None:
        g = a0[:, None] * w
        gram = g @ g.T
        e = c0 + (a0 * bias.double() if bias is not None else 0)
        bn = mods[site.bn]
    else:
        b0 = mods[site.bn]
        _, kappa0, _ = gaussian_moments(b0.bias.double(), b0.weight.double(), site.act)
        a1, _ = (t.double() for t in _bn_affine(mods[site.bn1]))
        d = mods[site.dw].weight.detach().flatten(1).double()
        scale = a1 * kappa0 * a0
        gram = scale[:, None] * scale[None, :] * (w @ w.T) * (d @ d.T)
        bn = mods[site.bn1]
        e = bn.bias.detach().double().clone()
    beta, gamma = bn.bias.detach().double(), bn.weight.detach().double()
    m, kappa, var = gaussian_moments(beta, gamma, site.last_act)
    # the share of Var f(y_c) that is not linear in y_c, in the units of the Gram diagonal (1/lambda_c - 1)
    nonlinear = gram.diagonal() * (var / (kappa * kappa * gamma * gamma).clamp_min(1e-30) - 1).clamp_min(0)
    return {"gram": gram, "e": e, "beta": beta, "m": m, "kappa": kappa, "nonlinear": nonlinear}


def solve(gram: torch.Tensor, removed: list[int], kept: list[int], ridge: float,
          noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares in Gram form: S [|K|, |P|] minimising ||G_p - sum_j S_jp G_j||^2 + sum_j (lam + noise_j)
    S_jp^2 (lam = ridge x mean diagonal of G_KK; ``noise``: per channel), and each removed channel's relative
    residual."""
    gkk = gram[kept][:, kept]
    gkp = gram[kept][:, removed]
    lam = ridge * float(gkk.diagonal().mean()) if kept else 0.0
    reg = lam * torch.ones(len(kept), dtype=gram.dtype) + (0 if noise is None else noise[kept])
    s = torch.linalg.solve(gkk + torch.diag(reg), gkp)
    gpp = gram[removed, removed]
    res = (gpp - 2 * (s * gkp).sum(0) + (s * (gkk @ s)).sum(0)).clamp_min(0)
    return s, (res / gpp.clamp_min(1e-30)).sqrt()


@torch.no_grad()
def compensate(model: nn.Module, site: Site, removed: list[int], terms: dict, ridge: float = 0.1,
               min_slope: float = 1e-3) -> float:
    """Fold the reconstruction of each removed channel into the consumer (before the removal); returns the mean
    relative residual of the least squares."""
    mods = dict(model.named_modules())
    out = set(removed)
    kept = [j for j in range(terms["gram"].shape[0]) if j not in out and float(terms["kappa"][j]) >= min_slope]
    if not kept or not removed:
        return 0.0
    s, res = solve(terms["gram"], removed, kept, ridge, terms["nonlinear"])
    kap, beta, m, e = terms["kappa"], terms["beta"], terms["m"], terms["e"]
    t = kap[removed][None, :] * s / kap[kept][:, None]  # [|K|, |P|]
    d = e[removed] - (s * e[kept][:, None]).sum(0)
    b = m[removed] + kap[removed] * ((s * beta[kept][:, None]).sum(0) + d - beta[removed]) - (t * m[kept][:, None]).sum(0)
    cons = mods[site.consumer]
    v = cons.weight.detach()
    vp = v[:, removed].double()  # [O, |P|, ...]
    flat = vp.flatten(2) if vp.dim() > 2 else vp[..., None]
    v[:, kept] += torch.einsum("kp,op...->ok...", t, vp).to(v.dtype)
    shift = (flat.sum(2) * b[None, :]).sum(1)  # the constant's effect on each consumer output
    if cons.bias is not None:
        cons.bias += shift.to(cons.bias.dtype)
    elif site.after is not None:
        mods[site.after].running_mean -= shift.to(mods[site.after].running_mean.dtype)
    return float(res.mean())


@torch.no_grad()
def quantize_int8(model: nn.Module) -> dict:
    """Every conv / linear weight to 8 bits per output channel, symmetric (scale = max |W_o| / 127), in place;
    returns the bytes at int8 (weights + fp32 scales) and of the other fp32 tensors, and the largest |error| /
    scale."""
    from prunekit.core.masks import prunable

    params = prunable(model)
    int8 = scales = 0
    worst = 0.0
    for p in params.values():
        w = p.detach()
        scale = (w.flatten(1).abs().amax(1) / 127).clamp_min(1e-12).view(-1, *[1] * (w.dim() - 1))
        q = torch.round(w / scale).clamp(-127, 127) * scale
        worst = max(worst, float(((q - w).abs() / scale).max()))
        p.copy_(q)
        int8 += w.numel()
        scales += 4 * w.shape[0]
    quantized = {id(p) for p in params.values()}
    rest = sum(4 * t.numel() for t in list(model.parameters()) + list(model.buffers())
               if id(t) not in quantized and t.is_floating_point())
    return {"weights_int8_bytes": int8 + scales, "other_fp32_bytes": rest, "bytes": int8 + scales + rest,
            "max_error_over_scale": worst}


def _l1(model: nn.Module, site: Site) -> torch.Tensor:
    return dict(model.named_modules())[site.producer].weight.detach().abs().flatten(1).sum(1)


@torch.no_grad()
def expected_error(model: nn.Module, site: Site, terms: dict, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel p of ``site``, removed alone and rebuilt from all the others: the expected squared error it leaves
    in the consumer's output, ``||V_p||^2 (Var f(y_p) - kappa_p^2 gamma_p^2 (1 - rho_p))`` (``V_p``: the consumer's
    weights on p; ``rho_p``: the relative squared residual of the ridge least squares, 1 / ((G + lam + n)^-1)_pp
    G_pp; what the linear part cannot rebuild plus the non-linear rest of f, which no compensation rebuilds), and
    the site's total ``sum_c ||V_c||^2 Var f(y_c)`` (the error of losing every channel: the scale that makes sites
    comparable)."""
    mods = dict(model.named_modules())
    g = terms["gram"]
    a = g + torch.diag(ridge * float(g.diagonal().mean()) + terms["nonlinear"])
    rho = (1 / (torch.linalg.inv(a).diagonal() * g.diagonal().clamp_min(1e-30))).clamp(0, 1)
    bn = mods[site.bn1] if site.dw else mods[site.bn]
    gamma = bn.weight.detach().double()
    _, kappa, var = gaussian_moments(bn.bias.detach().double(), gamma, site.last_act)
    v = mods[site.consumer].weight.detach().double()
    vn = v.transpose(0, 1).flatten(1).pow(2).sum(1)
    return vn * (var - kappa * kappa * gamma * gamma * (1 - rho)).clamp_min(0), (vn * var).sum()


def plan_removal(model: nn.Module, sites: list[Site], terms: dict, ratio: float, select: str, allocation: str,
                 ridge: float, max_site_ratio: float) -> dict[str, list[int]]:
    """Which channels of each site go. uniform: ``floor(ratio x n)`` of each site (at least one kept), the lowest
    by ``select``; global: ``round(ratio x all channels)`` over all sites, lowest expected error relative to the
    site's total first, at most ``max_site_ratio`` of a site (and one kept)."""
    plan: dict[str, list[int]] = {}
    if allocation == "uniform":
        for site in sites:
            t = terms[site.producer]
            n = t["gram"].shape[0]
            k = min(n - 1, int(math.floor(ratio * n + 1e-9)))
            if k < 1:
                continue
            if select == "l1":
                score = _l1(model, site)
            elif select == "error":
                score = expected_error(model, site, t, ridge)[0]
            else:  # each channel against all the others: the squared residual is 1 / (A^-1)_cc, A = Gram + lam I
                g = t["gram"]
                a = g + ridge * float(g.diagonal().mean()) * torch.eye(n, dtype=g.dtype)
                score = 1 / (torch.linalg.inv(a).diagonal() * g.diagonal().clamp_min(1e-30))
            plan[site.producer] = sorted(score.argsort().tolist()[:k])
        return plan
    candidates, total = [], 0
    for site in sites:
        err, scale = expected_error(model, site, terms[site.producer], ridge)
        total += len(err)
        rel = (err / scale.clamp_min(1e-30)).tolist()
        candidates += [(r, site.producer, c) for c, r in enumerate(rel)]
    candidates.sort()
    budget = int(round(ratio * total))
    sizes = {site.producer: terms[site.producer]["gram"].shape[0] for site in sites}
    chosen: dict[str, list[int]] = {site.producer: [] for site in sites}
    for _, producer, c in candidates:
        if budget == 0:
            break
        k = len(chosen[producer]) + 1
        if k > max(1, math.floor(max_site_ratio * sizes[producer])) or k >= sizes[producer]:
            continue
        chosen[producer].append(c)
        budget -= 1
    if budget:
        raise PruneError(f"udfc's global allocation removes at most max_site_ratio={max_site_ratio:g} of a site's "
                         f"channels, too few for sparsity {ratio:g}; raise max_site_ratio or use allocation=uniform.")
    return {p: sorted(c) for p, c in chosen.items() if c}


def compress(model: nn.Module, example: torch.Tensor, ratio: float, select: str = "error", compensation: bool = True,
             quantize: bool = True, ridge: float = 0.1, min_slope: float = 1e-3, allocation: str = "global",
             max_site_ratio: float = 0.3) -> dict:
    """UDFC on ``model`` in place: remove ``ratio`` of the sites' channels (:func:`plan_removal`; every site keeps
    at least one), compensated through the consumer, then quantize; ``example`` only gives the input shape.
    Returns a report."""
    from prunekit.vision.channels import prune_channels

    bytes_before = 4 * sum(t.numel() for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())
    from prunekit.vision.channels import coupled_outputs

    sites = find_sites(model, torch.randn_like(example))
    coupled = coupled_outputs(model, example, [s.producer for s in sites]) if sites else {}
    # a site's channels must go with nothing else (not with residual partners, whose consumers it does not see)
    sites = [s for s in sites if coupled[s.producer] and set(coupled[s.producer]) <= {s.producer, s.bn, s.dw, s.bn1}]
    terms = {site.producer: site_terms(model, site) for site in sites}
    plan = plan_removal(model, sites, terms, ratio, select, allocation, ridge, max_site_ratio)
    layers = {}
    for site in sites:
        removed = plan.get(site.producer)
        if not removed:
            continue
        # afresh: an earlier site's compensation may have changed this producer (its consumer)
        t = site_terms(model, site)
        residual = compensate(model, site, removed, t, ridge, min_slope) if compensation else None
        layers[site.producer] = {"kind": "mbconv" if site.dw else "pooled" if site.pooled else "direct",
                                 "consumer": site.consumer, "activation": site.last_act,
                                 "channels": t["gram"].shape[0], "removed": len(removed), "residual": residual}
    if not plan:
        raise PruneError("udfc found no channel to remove: no conv -> BatchNorm -> activation -> conv / pooled "
                         "linear site, or the sparsity leaves every site whole; raise the sparsity or choose a "
                         "model with BatchNorm (cnn, efficientnet-lite0).")
    report = prune_channels(model, example, remove=plan)
    q = quantize_int8(model) if quantize else None
    return {"sites": layers, "channels": report, "quantization": q, "bytes_fp32_before": bytes_before,
            "bytes_after": q["bytes"] if q else 4 * sum(t.numel() for t in list(model.parameters())
                                                         + list(model.buffers()) if t.is_floating_point())}


def run(cfg, model: nn.Module, data: dict, ctx):
    """(Train ``cfg.epochs`` dense,) compress data-free at ``cfg.sparsity`` of each site's channels; returns (the
    smaller, quantized model, None)."""
    from prunekit.vision.channels import count_macs
    from prunekit.vision.train import evaluate, train_epochs

    o = ctx.options
    example = data["x_train"][:1]
    if cfg.epochs:
        train_epochs(model, data, cfg.epochs, cfg, None, "dense", ctx.history, progress=ctx.progress, seed=cfg.seed,
                     journey=ctx.journey)
    dense_acc = evaluate(model, data["x_test"], data["y_test"])
    macs_before = count_macs(model, example)
    rep = compress(model, example, cfg.sparsity, o.select, o.compensate, o.quantize, o.ridge, o.min_slope,
                   o.allocation, o.max_site_ratio)
    if ctx.progress:
        say(f"udfc: {sum(s['removed'] for s in rep['sites'].values())} channels removed at {len(rep['sites'])} "
            f"sites; {rep['bytes_fp32_before']:,} -> {rep['bytes_after']:,} bytes")
    ctx.info["dense_acc"] = dense_acc
    ctx.info["channels"] = rep["channels"]
    ctx.info["learn"] = {"method": "udfc", **o.model_dump(), **{k: v for k, v in rep.items() if k != "channels"},
                         "macs_before": macs_before, "macs_after": count_macs(model, example),
                         "params_after": sum(p.numel() for p in model.parameters())}
    return model, None


LEARNED.register("udfc", run, params=UdfcOptions,
                 description="data-free channel removal with each removed channel rebuilt from the kept ones through "
                             "BatchNorm statistics and folded into the next layer, then int8 weights, no fine-tuning "
                             "(Bai et al. 2023)")

"""Trained Rank Pruning (Xu et al., IJCAI 2020, "TRP: Trained Rank Pruning for Efficient Deep Neural Networks"):
learner ``trp``.

Every convolution (``groups == 1``) and linear layer outside ``exclude`` is seen as the matrix
``W = weight.reshape(out, in * kh * kw)``. Training (``cfg.epochs``) alternates the task loss with low-rank
projections:

* every ``period`` optimizer steps each ``W`` is replaced by its truncated SVD ``U_r S_r V_r^T``, where ``r`` is
  the smallest rank whose singular values hold ``energy`` of the squared Frobenius norm
  (``sum_{i<=r} s_i^2 >= energy * sum_i s_i^2``, the paper's energy-pruning ratio);
* the nuclear-norm regulariser ``lam * sum_layers ||W||_*`` is added to every step's loss through
  ``train_epochs(regularizer=)``, with the paper's sub-gradient ``U V^T`` (SVD of the current weight, singular
  values above ``1e-6 * s_max``): the term is written as ``sum <(U V^T).detach(), W>``, whose value is exactly
  ``sum s_i`` and whose gradient is ``U V^T``.

At the end the last projection is made and each layer whose rank ``r`` saves multiply-accumulates is decomposed
for real into two thinner layers (channel-wise decomposition): a convolution becomes the same ``kh x kw``
convolution (stride, padding, dilation kept) with ``r`` output channels and weight ``sqrt(S_r) V_r^T``, followed
by a 1x1 convolution ``U_r sqrt(S_r)`` with the original bias; a linear layer becomes two linears the same way.
A layer is decomposed only when ``r * (in*kh*kw + out) < out * in*kh*kw`` (both layers run at the output's
spatial size, so this is the MAC saving). The two-layer module is an ``nn.Sequential`` in the original's place;
``load_run`` rebuilds it from the manifest (entry meta ``rebuild``). An optional fine-tune of the decomposed model
(``cfg.finetune_epochs``, no regulariser, at ``finetune_lr`` x the recipe's lr: a product of two factors moves
faster than the one matrix did, and at the full lr the factors diverged in a trial) follows, then BatchNorm
re-estimation (``cfg.bn_recalibrate``).
"""

from __future__ import annotations

import copy
import time

import torch
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import Config
from prunekit.core.progress import say
from prunekit.errors import PruneError
from prunekit.vision.learn import LEARNED, named_modules


class TrpOptions(Config):
    """The options of learner ``trp`` (recipe ``options``, ``--option KEY=VALUE``)."""

    what = "trp option"
    energy: float = Field(0.98, description="fraction of the squared Frobenius energy the kept singular values hold")
    period: int = Field(20, description="optimizer steps between two truncations (the paper's m)")
    lam: float = Field(3e-4, description="weight of the nuclear-norm regulariser (0: none)")
    finetune_lr: float = Field(0.1, description="the fine-tune of the decomposed model runs at this fraction of the "
                               "recipe's lr (the two-layer factors diverged at the full lr 0.05 in a trial)")
    speed_batch: int = Field(256, description="batch size of the measured CPU speed (dense vs decomposed)")
    speed_repeats: int = Field(3, description="timed forward passes for the speed (0: not measured)")

    @model_validator(mode="after")
    def _check(self):
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.period < 1:
            raise ValueError(f"period must be at least 1 step, got {self.period}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not 0.0 < self.finetune_lr <= 1.0:
            raise ValueError(f"finetune_lr must be in (0, 1], got {self.finetune_lr}")
        if self.speed_batch < 1:
            raise ValueError(f"speed_batch must be at least 1, got {self.speed_batch}")
        if self.speed_repeats < 0:
            raise ValueError(f"speed_repeats must be >= 0, got {self.speed_repeats}")
        return self


def factorable(model: nn.Module, exclude=()) -> dict[str, nn.Module]:
    """The layers TRP works on: convolutions with ``groups == 1`` (2-D) and linear layers, except those inside
    ``exclude`` (module names) and the projections of ``nn.MultiheadAttention`` (used functionally there)."""

    def inside(n: str) -> bool:
        return any(n == e or n.startswith(e + ".") for e in exclude)

    attn = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    out = {}
    for n, m in model.named_modules():
        if inside(n) or any(n.startswith(a + ".") for a in attn):
            continue
        if (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear):
            out[n] = m
    return out


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest ``r`` with ``sum_{i<=r} s_i^2 >= energy * sum s_i^2`` (``s`` sorted descending); at least 1."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = e.cumsum(0) / total
    return max(1, int((cum < energy - 1e-12).sum()) + 1)


def _matrix(m: nn.Module) -> torch.Tensor:
    return m.weight.reshape(m.weight.shape[0], -1)


@torch.no_grad()
def truncate_(m: nn.Module, energy: float) -> int:
    """Replace the layer's weight by its truncated SVD at ``energy`` (in place); returns the rank kept."""
    w = _matrix(m)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = energy_rank(s, energy)
    m.weight.copy_(((u[:, :r] * s[:r]) @ vh[:r]).to(w.dtype).reshape(m.weight.shape))
    return r


def nuclear(layers) -> torch.Tensor:
    """``sum ||W||_*`` over ``layers`` with the sub-gradient ``U V^T`` (components with ``s > 1e-6 s_max``)."""
    total = 0.0
    for m in layers:
        w = _matrix(m)
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
            k = int((s > 1e-6 * s[0]).sum()) if s.numel() and s[0] > 0 else 0
            g = u[:, :k] @ vh[:k]
        total = total + (g.to(w.dtype) * w).sum()
    return total


def saves_macs(m: nn.Module, r: int) -> bool:
    """Whether two layers of inner width ``r`` take fewer MACs than the layer: ``r (in*kh*kw + out) < out in*kh*kw``."""
    out, fan_in = _matrix(m).shape
    return r * (fan_in + out) < out * fan_in


def two_layers(m: nn.Module, r: int) -> nn.Sequential:
    """The two thinner layers of inner width ``r`` in place of ``m`` (uninitialised factors; sizes only): a conv
    like ``m`` with ``r`` output channels and no bias, then a 1x1 conv (or two linears)."""
    if isinstance(m, nn.Linear):
        first = nn.Linear(m.in_features, r, bias=False)
        second = nn.Linear(r, m.out_features, bias=m.bias is not None)
    else:
        first = copy.deepcopy(m)  # keeps the subclass (e.g. TF-"same" padding), stride, padding, dilation
        first.weight = nn.Parameter(torch.zeros(r, *m.weight.shape[1:], dtype=m.weight.dtype))
        first.bias = None
        first.out_channels = r
        second = nn.Conv2d(r, m.out_channels, 1, bias=m.bias is not None)
    return nn.Sequential(first, second)


@torch.no_grad()
def decompose(m: nn.Module, r: int) -> nn.Sequential:
    """``m`` as two layers holding its rank-``r`` truncated SVD ``(U_r sqrt(S_r)) (sqrt(S_r) V_r^T)``; their
    composition equals ``m`` with the truncated weight (and ``m``'s bias)."""
    w = _matrix(m)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:r].sqrt()
    seq = two_layers(m, r)
    first, second = seq
    first.weight.copy_((root[:, None] * vh[:r]).to(w.dtype).reshape(first.weight.shape))
    second.weight.copy_((u[:, :r] * root).to(w.dtype).reshape(second.weight.shape))
    if m.bias is not None:
        second.bias.copy_(m.bias)
    return seq.train(m.training)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def rebuild(model: nn.Module, manifest: dict) -> nn.Module:
    """``load_run``'s hook: put the two-layer modules the manifest records (``learn.layers[name].decomposed``,
    rank ``rank``) in place of the zoo model's layers, so the saved state dict loads."""
    mods = dict(model.named_modules())
    for name, row in manifest.get("learn", {}).get("layers", {}).items():
        if row.get("decomposed"):
            if name not in mods:
                raise PruneError(f"The saved TRP run decomposed layer {name!r}, which this model lacks.")
            _replace(model, name, two_layers(mods[name], int(row["rank"])))
    return model


@torch.no_grad()
def images_per_second(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Forward throughput of ``model`` in eval mode on ``x`` (one warm-up pass, the best of ``repeats``)."""
    was = model.training
    model.eval()
    model(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - t0)
    model.train(was)
    return len(x) / best


def run(cfg, model: nn.Module, data: dict, ctx):
    """Train ``cfg.epochs`` with periodic truncation and the nuclear-norm regulariser, decompose the layers whose
    rank saves MACs, fine-tune ``cfg.finetune_epochs``; returns (the decomposed model, None)."""
    from prunekit.vision.channels import count_macs
    from prunekit.vision.train import evaluate, recalibrate_bn, train_epochs

    o = ctx.options
    example = data["x_train"][:1]
    named_modules(model, cfg.exclude)  # checks --exclude
    layers = factorable(model, cfg.exclude)
    if not layers:
        raise PruneError(f"TRP needs convolution or linear layers to factorize; model {cfg.model!r} has none left "
                         "after --exclude.")
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = count_macs(model, example)
    ranks: dict[str, int] = {}

    def project(step=None):
        """Truncate every layer; as ``on_step`` (run before step ``step``): after every ``period`` steps."""
        if step is None or (step > 0 and step % o.period == 0):
            for n, m in layers.items():
                ranks[n] = truncate_(m, o.energy)
        return None

    def regularizer(m):
        return o.lam * nuclear(layers.values())

    train_epochs(model, data, cfg.epochs, cfg, None, "trp", ctx.history, on_step=project, progress=ctx.progress,
                 seed=cfg.seed, journey=ctx.journey, regularizer=regularizer if o.lam > 0 else None)
    project()  # the last projection: the ranks the decomposition uses
    acc_trained = evaluate(model, data["x_test"], data["y_test"])
    truncated = copy.deepcopy(model)  # the dense-shaped model with the truncated weights (the speed baseline)
    rows = {}
    for n, m in layers.items():
        out, fan_in = _matrix(m).shape
        go = saves_macs(m, ranks[n])
        rows[n] = {"kind": "linear" if isinstance(m, nn.Linear) else "conv", "shape": [out, fan_in],
                   "full_rank": min(out, fan_in), "rank": ranks[n], "decomposed": go}
        if go:
            _replace(model, n, decompose(m, ranks[n]))
    n_dec = sum(r["decomposed"] for r in rows.values())
    if ctx.progress:
        say(f"trp: {n_dec} of {len(rows)} layers decomposed (ranks "
            + ", ".join(f"{r['rank']}/{r['full_rank']}" for r in rows.values()) + ")")
    ctx.info["dense_acc"] = acc_trained
    ctx.info["acc_after_prune"] = evaluate(model, data["x_test"], data["y_test"])
    train_epochs(model, data, cfg.finetune_epochs, cfg.model_copy(update={"lr": cfg.lr * o.finetune_lr}), None,
                 "finetune", ctx.history, progress=ctx.progress, seed=cfg.seed + 1, journey=ctx.journey)
    if cfg.bn_recalibrate and cfg.finetune_epochs > 0:
        recalibrate_bn(model, data, 20, cfg.batch_size, cfg.seed)
    speed = None
    if o.speed_repeats > 0:
        xb = data["x_train"][:o.speed_batch]
        dense_ips = images_per_second(truncated, xb, o.speed_repeats)
        dec_ips = images_per_second(model, xb, o.speed_repeats)
        speed = {"batch": len(xb), "dense_images_per_s": round(dense_ips, 1),
                 "decomposed_images_per_s": round(dec_ips, 1), "speedup": round(dec_ips / dense_ips, 3),
                 "threads": torch.get_num_threads()}
    macs_after = count_macs(model, example)
    ctx.info["learn"] = {
        "method": "trp", "energy": o.energy, "period": o.period, "lam": o.lam, "finetune_lr": o.finetune_lr,
        "layers": rows,
        "layers_decomposed": n_dec, "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()), "macs_before": macs_before,
        "macs_after": macs_after, "macs_ratio": macs_after / macs_before, "speed": speed,
        "acc_trained": acc_trained, "acc_decomposed": ctx.info["acc_after_prune"],
    }
    return model, None


LEARNED.register("trp", run, params=TrpOptions, rebuild=rebuild,
                 description="trained rank pruning: periodic truncated SVD at an energy threshold + nuclear-norm "
                             "regulariser, then each layer split into two thinner ones where that saves MACs "
                             "(Xu et al. 2020)")

"""Analysis views of two vision models (dense vs pruned, or two pruned ones): ``prunekit compare RUN_A RUN_B``.

* :func:`linear_cka` / :func:`layer_cka`: representation similarity (linear CKA, Kornblith et al. 2019) of every
  conv / linear output the two models share by name; widths may differ (channel pruning).
* :func:`agreement`: top-1 prediction agreement, and each model's accuracy.
* :func:`corrupt` / :func:`corruption_robustness`: accuracy under common corruptions (Hendrycks & Dietterich 2019,
  their CIFAR-10-C severities 1..5) made with torch ops on the [0, 1] images, seeded (registry ``CORRUPTIONS``).
* :func:`decision_plane` / :func:`plot_planes`: the geometric view of where two models disagree in input space
  (the "robustness lottery" comparison; the plane through three test images of Somepalli et al. 2022, or through
  one image and two random directions): both models' classes on a grid of the plane and the share where they
  differ.
* :func:`lmc_barrier` / :func:`three_regime`: the three-regime diagnosis of Zhou et al. (ICML 2023): the linear
  mode connectivity barrier between two models' weights (BatchNorm statistics re-estimated at every point) and the
  similarity of their outputs; regime I (poorly connected), II-A (connected, dissimilar), II-B (connected, similar).
* :func:`compare` (the command), :func:`compare_runs` (everything on two loaded runs).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
import typer
from torch import nn

from prunekit.cli_options import Overwrite, Progress, out_option, seed_option, start
from prunekit.core.progress import bar, say
from prunekit.core.registry import Registry
from prunekit.errors import PruneError

# -- representation similarity -------------------------------------------------------------------------------


def _center_gram(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T / n (double centring; the same as centring the features first)."""
    k = k - k.mean(0, keepdim=True)
    return k - k.mean(1, keepdim=True)


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:
    """Linear CKA from two Gram matrices of the same examples: <HKH, HLH> / (||HKH|| ||HLH||); NaN when either
    representation is constant over the examples (a layer whose outputs are all equal)."""
    k, l = _center_gram(k.double()), _center_gram(l.double())
    den = float(torch.sqrt((k * k).sum() * (l * l).sum()))
    return float((k * l).sum()) / den if den > 0 else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same N examples: ``x`` [N, ...] and
    ``y`` [N, ...] (each example's activations flattened into one feature vector; the widths may differ).
    Features centred over the examples, then ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) (computed through the N x N
    Gram matrices when that is smaller). 1 for the same representation, unchanged by orthogonal transforms and
    isotropic scaling of either; NaN when either is constant."""
    if x.shape[0] != y.shape[0]:
        raise PruneError(f"CKA compares representations of the same examples; got {x.shape[0]} and {y.shape[0]}.")
    x = x.detach().reshape(x.shape[0], -1).double()
    y = y.detach().reshape(y.shape[0], -1).double()
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    if n * n <= dx * dy:
        return cka_from_grams(x @ x.T, y @ y.T)
    num = float((y.T @ x).pow(2).sum())
    den = float(torch.sqrt((x.T @ x).pow(2).sum() * (y.T @ y).pow(2).sum()))
    return num / den if den > 0 else float("nan")


def _hooked(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose outputs CKA compares: every conv and linear layer, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d))}


@torch.no_grad()
def _grams(model: nn.Module, x: torch.Tensor, names: list[str], batch_size: int = 250,
           budget_mb: float = 512.0) -> dict[str, torch.Tensor]:
    """The N x N Gram matrix of each named module's (flattened, centred) outputs on ``x``. Layers are taken in
    groups whose stored outputs fit ``budget_mb`` (one pass over ``x`` per group), so a large network needs a few
    passes rather than all its activations at once."""
    mods = dict(model.named_modules())
    was = model.training
    model.eval()
    sizes: dict[str, int] = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o[0].numel())) for n in names]
    try:
        model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    groups, cur, used = [], [], 0.0
    for n in names:
        mb = sizes[n] * len(x) * 4 / 2**20
        if cur and used + mb > budget_mb:
            groups.append(cur)
            cur, used = [], 0.0
        cur.append(n)
        used += mb
    if cur:
        groups.append(cur)
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        feats: dict[str, list] = {n: [] for n in group}
        hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: feats[n].append(o.detach().reshape(len(o), -1).float()))
                 for n in group]
        try:
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size])
        finally:
            for h in hooks:
                h.remove()
        for n in group:
            f = torch.cat(feats.pop(n))
            f -= f.mean(0, keepdim=True)
            out[n] = (f @ f.T).double()
            del f
    model.train(was)
    return out


def layer_cka(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, batch_size: int = 250,
              budget_mb: float = 512.0) -> dict[str, float]:
    """Linear CKA of every conv / linear output the two models share by module name (in ``model_a``'s order), on
    the examples ``x``. After channel removal the widths differ: CKA compares them as they are. Modules only one
    model has are left out. Both models run in eval mode (restored after)."""
    names_b = _hooked(model_b)
    names = [n for n in _hooked(model_a) if n in names_b]
    if not names:
        raise PruneError("The two models share no conv or linear layer by name; CKA per layer needs matching names.")
    ka = _grams(model_a, x, names, batch_size, budget_mb)
    kb = _grams(model_b, x, names, batch_size, budget_mb)
    return {n: cka_from_grams(ka[n], kb[n]) for n in names}


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The model's logits on ``x`` in eval mode (mode restored)."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def agreement(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
              batch_size: int = 500) -> dict:
    """Top-1 agreement (the share of examples where both predict the same class) and, with labels ``y``, each
    model's accuracy: ``{"agreement", "examples", "acc_a", "acc_b"}``."""
    pa, pb = outputs(model_a, x, batch_size).argmax(1), outputs(model_b, x, batch_size).argmax(1)
    res = {"agreement": float((pa == pb).float().mean()), "examples": int(len(x))}
    if y is not None:
        res["acc_a"] = float((pa == y).float().mean())
        res["acc_b"] = float((pb == y).float().mean())
    return res


# -- common corruptions -------------------------------------------------------------------------------------

CORRUPTIONS = Registry("corruption")
# Hendrycks & Dietterich's CIFAR-10-C parameters per severity 1..5 (the small-image set, nearest to 28x28)
SEVERITY = {
    "gaussian-noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # standard deviation of the added noise
    "shot-noise": (500, 250, 100, 75, 50),  # photons per unit intensity (Poisson rate)
    "impulse-noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of values set to 0 or 1 (salt and pepper)
    "gaussian-blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on each image's distance from its mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # side of the box-downsampled image, relative
}


def _gaussian_noise(x, c, g):
    return (x + c * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _shot_noise(x, c, g):
    return (torch.poisson(x.clamp(0, 1) * c, generator=g) / c).clamp(0, 1)


def _impulse_noise(x, c, g):
    u = torch.rand(x.shape, generator=g)
    return torch.where(u < c / 2, torch.zeros_like(x), torch.where(u < c, torch.ones_like(x), x))


def _gaussian_blur(x, sigma, g):
    r = int(4 * sigma + 0.5)  # skimage.filters.gaussian's truncate=4, border 'nearest'
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t**2 / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    h = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    h = F.conv2d(F.pad(h, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return h.clamp(0, 1)


def _contrast(x, c, g):
    m = x.mean((2, 3), keepdim=True)
    return ((x - m) * c + m).clamp(0, 1)


def _brightness(x, c, g):
    v = x.max(1, keepdim=True).values  # HSV value; hue and saturation kept, so RGB scales with it
    v2 = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v2 / v.clamp_min(1e-12), v2.expand_as(x)).clamp(0, 1)


def _pixelate(x, c, g):
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


for _name, _fn, _what in (
        ("gaussian-noise", _gaussian_noise, "add N(0, c^2) noise"),
        ("shot-noise", _shot_noise, "Poisson photon noise: Poisson(x c) / c"),
        ("impulse-noise", _impulse_noise, "salt and pepper: a share c of values set to 0 or 1"),
        ("gaussian-blur", _gaussian_blur, "Gaussian blur of sigma c pixels"),
        ("contrast", _contrast, "(x - image mean) c + image mean"),
        ("brightness", _brightness, "HSV value + c (grey images: x + c)"),
        ("pixelate", _pixelate, "box-downsample to c of the side, upsample by nearest")):
    CORRUPTIONS.register(_name, _fn, description=_what, aliases=(_name.replace("-", "_"),))


def corrupt(images: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` [N, C, H, W] in [0, 1] corrupted by ``kind`` at ``severity`` 1..5 (0: unchanged), clipped to
    [0, 1]; the same seed gives the same images."""
    kind = CORRUPTIONS.canonical(kind)
    if not isinstance(severity, int) or not 0 <= severity <= 5:
        raise PruneError(f"Corruption severities are 0..5 (0: none); got {severity!r}.")
    if severity == 0:
        return images.clone()
    g = torch.Generator().manual_seed(int(seed) * 1009 + list(SEVERITY).index(kind) * 11 + severity)
    return CORRUPTIONS.get(kind).impl(images.float(), SEVERITY[kind][severity - 1], g)


def pixel_scale(dataset: str, x: torch.Tensor | None = None) -> tuple[float, float]:
    """(mean, std) with pixel = normalized * std + mean for the dataset's inputs: Fashion-MNIST's normalization;
    the synthetic task (no pixel range of its own) is mapped affinely onto [0, 1] from ``x``'s range."""
    if dataset == "fashion-mnist":
        from prunekit.vision.data import FASHION_MEAN, FASHION_STD

        return FASHION_MEAN, FASHION_STD
    if x is None:
        raise PruneError(f"Dataset {dataset!r} has no pixel scale; pass the images to map onto [0, 1].")
    lo, hi = float(x.min()), float(x.max())
    span = max(hi - lo, 1e-12)  # pixel = (x - lo) / span = x * std + mean
    return -lo / span, 1.0 / span


def corruption_robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kinds=None, severities=(1, 2, 3, 4, 5),
                          mean: float | None = None, std: float | None = None, seed: int = 0,
                          batch_size: int = 500, progress: bool = False) -> dict:
    """Accuracy on the test images ``x`` (normalized) under each corruption and severity: the images are mapped to
    [0, 1] (pixel = x * std + mean; Fashion-MNIST's by default), corrupted (:func:`corrupt`, seeded: two models see
    the same images), normalized again. ``{"clean", "accuracy": {kind: {severity: acc}}, "mean": {kind: mean over
    severities}, "overall"}``."""
    from prunekit.vision.data import FASHION_MEAN, FASHION_STD

    mean = FASHION_MEAN if mean is None else mean
    std = FASHION_STD if std is None else std
    kinds = [CORRUPTIONS.canonical(k) for k in (kinds if kinds is not None else CORRUPTIONS.names())]
    pix = (x * std + mean).clamp(0, 1)

    def acc(inputs):
        return float((outputs(model, inputs, batch_size).argmax(1) == y).float().mean())

    res: dict = {"clean": acc(x), "accuracy": {}, "mean": {}}
    for kind in bar(kinds, desc="corruptions", enabled=progress):
        res["accuracy"][kind] = {str(s): acc((corrupt(pix, kind, s, seed) - mean) / std) for s in severities}
        res["mean"][kind] = sum(res["accuracy"][kind].values()) / max(1, len(severities))
    res["overall"] = sum(res["mean"].values()) / len(res["mean"]) if res["mean"] else float("nan")
    return res


# -- where two models disagree in input space -----------------------------------------------------------------


@torch.no_grad()
def decision_plane(model_a: nn.Module, model_b: nn.Module, anchors: torch.Tensor, resolution: int = 41,
                   margin: float = 0.25, radius: float | None = None, seed: int = 0, batch_size: int = 500) -> dict:
    """Both models' predicted classes on a ``resolution`` x ``resolution`` grid of a 2-D plane in input space.
    ``anchors`` [3, C, H, W]: the plane through three (normalized) images, x0 at the origin, x1 on the first axis,
    the grid their bounding box widened by ``margin`` of its side. ``anchors`` [1, C, H, W]: the plane through the
    image and two random orthonormal directions (seeded), the grid ``radius`` (default half the image's norm)
    around it. Returns the axes, the anchors' plane coordinates, ``pred_a`` / ``pred_b`` [resolution, resolution]
    (row = second axis), ``disagree`` and ``disagreement``, the share of the grid where the classes differ."""
    if anchors.dim() != 4 or anchors.shape[0] not in (1, 3):
        raise PruneError("A decision plane takes 3 images (the plane through them) or 1 image (and two random directions).")
    if resolution < 2:
        raise PruneError(f"The plane's grid needs a resolution of at least 2 points, got {resolution}.")
    x0 = anchors[0].double()
    if anchors.shape[0] == 3:
        v1, v2 = (anchors[1] - anchors[0]).double().flatten(), (anchors[2] - anchors[0]).double().flatten()
        n1 = float(v1.norm())
        if n1 == 0:
            raise PruneError("The first two plane images are equal; choose three different images.")
        u1 = v1 / n1
        p = v2 - (v2 @ u1) * u1
        if float(p.norm()) <= 1e-6 * float(v2.norm()):
            raise PruneError("The three plane images lie on one line; choose three that span a plane.")
        u2 = p / p.norm()
        xy = [(0.0, 0.0), (n1, 0.0), (float(v2 @ u1), float(v2 @ u2))]
        lo_a, hi_a = min(q[0] for q in xy), max(q[0] for q in xy)
        lo_b, hi_b = min(q[1] for q in xy), max(q[1] for q in xy)
        pad_a, pad_b = margin * (hi_a - lo_a), margin * (hi_b - lo_b)
        ax_a = torch.linspace(lo_a - pad_a, hi_a + pad_a, resolution, dtype=torch.float64)
        ax_b = torch.linspace(lo_b - pad_b, hi_b + pad_b, resolution, dtype=torch.float64)
    else:
        g = torch.Generator().manual_seed(seed)
        d = torch.randn(2, x0.numel(), generator=g, dtype=torch.float64)
        u1 = d[0] / d[0].norm()
        p = d[1] - (d[1] @ u1) * u1
        u2 = p / p.norm()
        r = float(radius) if radius is not None else 0.5 * float(x0.norm())
        xy = [(0.0, 0.0)]
        ax_a = ax_b = torch.linspace(-r, r, resolution, dtype=torch.float64)
    bb, aa = torch.meshgrid(ax_b, ax_a, indexing="ij")
    pts = (x0.flatten()[None] + aa.reshape(-1, 1) * u1[None] + bb.reshape(-1, 1) * u2[None]).float()
    pts = pts.view(-1, *anchors.shape[1:])
    pa = outputs(model_a, pts, batch_size).argmax(1).view(resolution, resolution)
    pb = outputs(model_b, pts, batch_size).argmax(1).view(resolution, resolution)
    dis = pa != pb
    return {"axis_a": ax_a.tolist(), "axis_b": ax_b.tolist(), "anchors_xy": xy, "pred_a": pa, "pred_b": pb,
            "disagree": dis, "disagreement": float(dis.float().mean())}


def plot_planes(planes: list[dict], path: str | Path | None = None, names: tuple[str, str] = ("A", "B"),
                num_classes: int = 10):
    """One row per plane of :func:`decision_plane`: model A's classes, model B's, where they disagree (anchors
    marked). A matplotlib ``Figure`` (no pyplot state), saved as PNG to ``path`` when given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 3.2 * max(1, len(planes))))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(planes)), 3, squeeze=False)
    cmap = "tab10" if num_classes <= 10 else "tab20"
    for row, pl in zip(axes, planes):
        ext = (pl["axis_a"][0], pl["axis_a"][-1], pl["axis_b"][0], pl["axis_b"][-1])
        for ax, grid, title in ((row[0], pl["pred_a"], f"{names[0]}: class"), (row[1], pl["pred_b"], f"{names[1]}: class"),
                                (row[2], pl["disagree"].int(), f"disagree: {pl['disagreement']:.1%}")):
            if title.startswith("disagree"):
                ax.imshow(grid.numpy(), origin="lower", extent=ext, aspect="auto",
                          cmap=ListedColormap(["#f0f0f0", "#d62728"]), vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(grid.numpy(), origin="lower", extent=ext, aspect="auto", cmap=cmap, vmin=0,
                          vmax=num_classes - 1, interpolation="nearest")
            for i, (a, b) in enumerate(pl["anchors_xy"]):
                ax.plot([a], [b], "o", ms=6, mfc="white", mec="black")
                ax.annotate(pl.get("labels", [str(j) for j in range(3)])[i], (a, b), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path), dpi=90)
    return fig


def plane_anchors(x: torch.Tensor, y: torch.Tensor, planes: int = 3, seed: int = 0) -> list[list[int]]:
    """Indices of ``planes`` triples of test images, each of three different classes where the labels allow
    (seeded)."""
    g = torch.Generator().manual_seed(seed + 31)
    out = []
    for _ in range(planes):
        order = torch.randperm(len(y), generator=g).tolist()
        pick: list[int] = []
        for i in order:
            if all(int(y[i]) != int(y[j]) for j in pick):
                pick.append(i)
            if len(pick) == 3:
                break
        for i in order:  # fewer than 3 classes: fill with other images
            if len(pick) == 3:
                break
            if i not in pick:
                pick.append(i)
        out.append(pick)
    return out


# -- the three-regime diagnosis ------------------------------------------------------------------------------


def _check_same_shapes(model_a: nn.Module, model_b: nn.Module) -> None:
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if set(sa) != set(sb):
        extra = sorted(set(sa) ^ set(sb))[0]
        raise PruneError(f"Interpolating weights needs the same architecture; only one model has {extra!r}.")
    for k in sa:
        if sa[k].shape != sb[k].shape:
            raise PruneError(f"Interpolating weights needs the same architecture; {k} is {tuple(sa[k].shape)} in one "
                             f"model and {tuple(sb[k].shape)} in the other (channel pruning changed it).")


@torch.no_grad()
def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A copy of ``model_a`` with every floating tensor w_a + alpha (w_b - w_a) (alpha 0: A exactly, 1: B);
    integer buffers (BatchNorm's batch counts) from A."""
    _check_same_shapes(model_a, model_b)
    out = copy.deepcopy(model_a)
    sb = model_b.state_dict()
    new = {}
    for k, va in model_a.state_dict().items():
        if va.is_floating_point():
            new[k] = sb[k].clone() if alpha == 1 else va + alpha * (sb[k] - va)
        else:
            new[k] = va.clone()
    out.load_state_dict(new)
    return out


@torch.no_grad()
def _mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, batch_size: int) -> float:
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        total += float(loss_fn(model(x[i:i + batch_size]), y[i:i + batch_size])) * len(x[i:i + batch_size])
    model.train(was)
    return total / max(1, len(x))


def lmc_barrier(model_a: nn.Module, model_b: nn.Module, data: dict, alphas: int | list[float] = 11,
                examples: int = 1000, bn_batches: int = 20, batch_size: int = 128, seed: int = 0, loss_fn=None,
                progress: bool = False) -> dict:
    """Linear mode connectivity: the loss along the straight line between the two models' weights, at ``alphas``
    (a count of evenly spaced points in [0, 1], or the list), each point's BatchNorm statistics re-estimated on
    ``bn_batches`` training batches (:func:`prunekit.vision.train.recalibrate_bn`; the end points too, so the curve
    is measured one way), the loss (cross-entropy by default, ``loss_fn(logits, y)``) on ``examples`` seeded
    training images. barrier = max over alpha of loss(alpha) - ((1 - alpha) loss(0) + alpha loss(1)); 0 for two
    equal models, <= 0 when the path has no bump. ``{"alphas", "losses", "barrier", "barrier_alpha"}``."""
    from prunekit.vision.train import recalibrate_bn

    _check_same_shapes(model_a, model_b)
    grid = [i / (alphas - 1) for i in range(alphas)] if isinstance(alphas, int) else [float(a) for a in alphas]
    if len(grid) < 2 or grid[0] != 0.0 or grid[-1] != 1.0:
        raise PruneError("The interpolation points must start at 0 and end at 1 (at least 2 of them).")
    loss_fn = loss_fn or F.cross_entropy
    g = torch.Generator().manual_seed(seed + 13)
    idx = torch.randperm(len(data["y_train"]), generator=g)[:examples]
    x, y = data["x_train"][idx], data["y_train"][idx]
    losses = []
    for a in bar(grid, desc="LMC", enabled=progress):
        m = interpolate(model_a, model_b, a)
        recalibrate_bn(m, data, bn_batches, batch_size, seed)
        losses.append(_mean_loss(m, x, y, loss_fn, 500))
    excess = [loss - ((1 - a) * losses[0] + a * losses[-1]) for a, loss in zip(grid, losses)]
    k = max(range(len(grid)), key=lambda i: excess[i])
    return {"alphas": grid, "losses": losses, "barrier": excess[k], "barrier_alpha": grid[k],
            "examples": int(len(y)), "bn_batches": bn_batches}


REGIMES = {"I": "poorly connected", "II-A": "well connected, dissimilar outputs",
           "II-B": "well connected, similar outputs"}


def three_regime(model_a: nn.Module, model_b: nn.Module, data: dict, *, alphas: int | list[float] = 11,
                 examples: int = 1000, bn_batches: int = 20, batch_size: int = 128, barrier_threshold: float = 0.1,
                 similarity: str = "cka", similarity_threshold: float = 0.9, temperature=None, load=None,
                 seed: int = 0, loss_fn=None, progress: bool = False) -> dict:
    """The three-regime diagnosis (Zhou et al., ICML 2023) of two models (e.g. two pruned models fine-tuned from
    the same dense one with different seeds): the LMC barrier (:func:`lmc_barrier`, training loss) and the
    similarity of their outputs on up to ``examples`` test images (``similarity`` cka: linear CKA of the logits;
    agreement: top-1 agreement). Regime I (poorly connected): barrier > ``barrier_threshold``; otherwise II-A
    (well connected, dissimilar outputs) when similarity < ``similarity_threshold``, else II-B (well connected,
    similar outputs). ``temperature`` (the dense training's temperature-like parameter, as the caller names it,
    e.g. ``{"epochs": 40}``) and ``load`` (the pruned models' density) are reported with it."""
    if similarity not in ("cka", "agreement"):
        raise PruneError(f"Unknown output similarity {similarity!r}; choose one of: cka, agreement.")
    if not barrier_threshold >= 0 or not 0 <= similarity_threshold <= 1:
        raise PruneError("The barrier threshold must be >= 0 and the similarity threshold in [0, 1].")
    lmc = lmc_barrier(model_a, model_b, data, alphas, examples, bn_batches, batch_size, seed, loss_fn, progress)
    xt = data["x_test"][:examples]
    if similarity == "cka":
        sim = linear_cka(outputs(model_a, xt), outputs(model_b, xt))
    else:
        sim = agreement(model_a, model_b, xt)["agreement"]
    if lmc["barrier"] > barrier_threshold:
        regime = "I"
    else:
        regime = "II-B" if sim >= similarity_threshold else "II-A"
    return {"regime": regime, "meaning": REGIMES[regime], "barrier": lmc["barrier"], "lmc": lmc,
            "similarity": sim, "similarity_kind": similarity, "barrier_threshold": barrier_threshold,
            "similarity_threshold": similarity_threshold, "temperature": temperature, "load": load}


def regime_line(res: dict) -> str:
    """The diagnosis as one printed line."""
    sim = "logit CKA" if res["similarity_kind"] == "cka" else "top-1 agreement"
    conn = ">" if res["regime"] == "I" else "<="
    cmp_ = ">=" if res["similarity"] >= res["similarity_threshold"] else "<"
    extra = ""
    if res.get("temperature") is not None:
        t = res["temperature"]
        extra += "; temperature " + (", ".join(f"{k}={v}" for k, v in t.items()) if isinstance(t, dict) else str(t))
    if res.get("load") is not None:
        ld = res["load"]
        extra += "; load (density) " + (", ".join(f"{v:.4g}" for v in ld) if isinstance(ld, (list, tuple)) else f"{ld:.4g}")
    return (f"regime {res['regime']} ({res['meaning']}): LMC barrier {res['barrier']:.4f} {conn} "
            f"{res['barrier_threshold']:g} at alpha {res['lmc']['barrier_alpha']:.2f}, {sim} {res['similarity']:.4f} "
            f"{cmp_} {res['similarity_threshold']:g}{extra}")


# -- two runs ------------------------------------------------------------------------------------------------


def _manifest(path: Path, which: str) -> dict:
    if not path.exists():
        raise PruneError(f"{which} {path} does not exist; give a run directory written by prunekit train-prune.")
    f = path / "prunekit.json"
    if not path.is_dir() or not f.is_file() or not (path / "model.safetensors").is_file():
        raise PruneError(f"{which} {path} is not a prunekit vision run (no prunekit.json and model.safetensors); "
                         "give a directory written by prunekit train-prune.")
    try:
        man = json.loads(f.read_text())
    except (OSError, ValueError):
        raise PruneError(f"{which} {path}: its prunekit.json is not readable JSON.") from None
    if not isinstance(man, dict) or man.get("kind") not in ("vision", "prunekit-vision") or "recipe" not in man:
        raise PruneError(f"{which} {path} is a {man.get('kind', 'unknown') if isinstance(man, dict) else 'unknown'} "
                         "run, not a vision run; compare takes two run directories of prunekit train-prune.")
    return man


def _inputs(recipe: dict) -> tuple[str, int, bool]:
    effnet = recipe.get("model") == "efficientnet-lite0"
    return (recipe.get("dataset", "fashion-mnist"), recipe.get("image_size") or (64 if effnet else 28), effnet)


def _temperature(recipe: dict, name: str):
    """A recipe field, or a ratio of two ("lr/batch_size")."""
    parts = [p.strip().replace("-", "_") for p in name.split("/")]
    if len(parts) > 2 or any(p not in recipe or not isinstance(recipe[p], (int, float)) for p in parts):
        raise PruneError(f"--temperature {name!r}: give a numeric recipe field (epochs, lr, batch_size, "
                         "weight_decay, ...) or a ratio of two, e.g. lr/batch_size.")
    v = recipe[parts[0]]
    return v / recipe[parts[1]] if len(parts) == 2 else v


def _density(man: dict) -> float:
    m = man.get("metrics", {})
    summ = man.get("summary", {})
    if summ.get("params_ratio") is not None and not m.get("sparsity"):
        return float(summ["params_ratio"])  # channel runs: parameters after / before
    return 1.0 - float(m.get("sparsity", 0.0) or 0.0)


def compare_runs(model_a: nn.Module, model_b: nn.Module, data: dict, *, kinds=None, severities=(1, 2, 3, 4, 5),
                 plane: bool = True, planes: int = 3, resolution: int = 41, cka_examples: int = 1000,
                 regime: bool = False, regime_kw: dict | None = None, pixel: tuple[float, float] | None = None,
                 seed: int = 0, progress: bool = False) -> dict:
    """Every view on two models and one data set: per-layer CKA, agreement and accuracy, corruption accuracy per
    kind (``kinds`` None: all, [] none), the disagreement planes and, with ``regime``, the three-regime diagnosis
    (``regime_kw``: its keyword arguments). The planes' grids stay in ``res["plane"]["planes"]`` for plotting."""
    x, y = data["x_test"], data["y_test"]
    res: dict = {"test_images": int(len(y))}
    say(f"compare: CKA per layer on {min(cka_examples, len(x))} test images")
    res["cka"] = layer_cka(model_a, model_b, x[:cka_examples])
    res["agreement"] = agreement(model_a, model_b, x, y)
    if kinds is None or kinds:
        mean, std = pixel if pixel is not None else (None, None)
        say("compare: corruptions")
        res["corruptions"] = {
            "severities": list(severities),
            "a": corruption_robustness(model_a, x, y, kinds, severities, mean, std, seed, progress=progress),
            "b": corruption_robustness(model_b, x, y, kinds, severities, mean, std, seed, progress=progress)}
    if plane:
        say("compare: decision planes")
        pls = []
        for idx in plane_anchors(x, y, planes, seed):
            pl = decision_plane(model_a, model_b, x[idx], resolution=resolution, seed=seed)
            pl["test_indices"] = idx
            pl["labels"] = [f"#{i} (y={int(y[i])})" for i in idx]
            pls.append(pl)
        res["plane"] = {"planes": pls, "resolution": resolution,
                        "disagreement": sum(p["disagreement"] for p in pls) / max(1, len(pls))}
    if regime:
        say("compare: three-regime diagnosis (LMC)")
        res["regime"] = three_regime(model_a, model_b, data, seed=seed, progress=progress, **(regime_kw or {}))
    return res


def _json_ready(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k != "plane"}
    if "plane" in res:
        p = res["plane"]
        out["plane"] = {"disagreement": p["disagreement"], "resolution": p["resolution"],
                        "planes": [{"test_indices": q["test_indices"], "disagreement": q["disagreement"],
                                    "anchors_xy": q["anchors_xy"]} for q in p["planes"]]}
    return out


def _plot_cka(cka: dict, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 0.45 * len(cka) + 2), 3.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    vals = [v if v == v else 0.0 for v in cka.values()]
    ax.bar(range(len(cka)), vals, color="C0")
    ax.set_xticks(range(len(cka)))
    ax.set_xticklabels(list(cka), rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("linear CKA")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)


def _plot_corruptions(cor: dict, path: Path, names: tuple[str, str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = list(cor["a"]["accuracy"])
    fig = Figure(figsize=(3.0 * min(4, len(kinds)), 2.8 * math.ceil(len(kinds) / 4)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(math.ceil(len(kinds) / 4), min(4, len(kinds)), squeeze=False).ravel()
    sev = cor["severities"]
    for ax, kind in zip(axes, kinds):
        for key, name, st in (("a", names[0], "o-"), ("b", names[1], "s--")):
            ax.plot([0] + sev, [cor[key]["clean"]] + [cor[key]["accuracy"][kind][str(s)] for s in sev], st, label=name)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("severity", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in axes[len(kinds):]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    axes[0].set_ylabel("accuracy", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)


def _plot_lmc(reg: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lmc = reg["lmc"]
    a, l0, l1 = lmc["alphas"], lmc["losses"][0], lmc["losses"][-1]
    ax.plot(a, lmc["losses"], "o-", label="interpolated")
    ax.plot([0, 1], [l0, l1], "k--", lw=1, label="linear in the end losses")
    ax.set_xlabel("alpha (0: A, 1: B)")
    ax.set_ylabel("training loss")
    ax.set_title(f"regime {reg['regime']}: barrier {reg['barrier']:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)


def _print_table(res: dict, names: tuple[str, str]) -> None:
    a, b = names
    print(f"compare  A = {a}\n         B = {b}")
    ag = res["agreement"]
    print(f"test images {ag['examples']}: accuracy A {ag['acc_a']:.4f}, B {ag['acc_b']:.4f}; top-1 agreement "
          f"{ag['agreement']:.4f}")
    w = max(len(n) for n in res["cka"]) if res["cka"] else 5
    print(f"{'layer':<{w}}  linear CKA")
    for n, v in res["cka"].items():
        print(f"{n:<{w}}  {v:.4f}" if v == v else f"{n:<{w}}  n/a (constant output)")
    if "corruptions" in res:
        c = res["corruptions"]
        sev = ",".join(str(s) for s in c["severities"])
        print(f"{'corruption (mean over severities ' + sev + ')':<44} {'A':>7} {'B':>7}")
        print(f"{'clean':<44} {c['a']['clean']:>7.4f} {c['b']['clean']:>7.4f}")
        for k in c["a"]["mean"]:
            print(f"{k:<44} {c['a']['mean'][k]:>7.4f} {c['b']['mean'][k]:>7.4f}")
        print(f"{'all corruptions':<44} {c['a']['overall']:>7.4f} {c['b']['overall']:>7.4f}")
    if "plane" in res:
        p = res["plane"]
        print(f"decision planes: A and B disagree on {p['disagreement']:.1%} of the plane (mean of "
              f"{len(p['planes'])} planes through 3 test images, {p['resolution']}x{p['resolution']} grid)")
    if "regime" in res:
        print(regime_line(res["regime"]))


def compare(
    run_a: Annotated[Path, typer.Argument(help="a vision run directory (prunekit train-prune --out)")],
    run_b: Annotated[Path, typer.Argument(help="another vision run directory on the same data set")],
    out: Annotated[Optional[Path], out_option("write compare.json and the plots here (a new directory); "
                                              "without it only the table is printed")] = None,
    test_subset: Annotated[int, typer.Option(help="test images to compare on (the first N)")] = 1000,
    cka_examples: Annotated[int, typer.Option(help="test images for the per-layer CKA (memory grows with N^2)")] = 500,
    plane: Annotated[bool, typer.Option("--plane/--no-plane", help="decision planes through 3 test images: where "
                                        "the two models disagree in input space")] = True,
    plane_resolution: Annotated[int, typer.Option(help="points per side of each plane's grid")] = 41,
    corruptions: Annotated[str, typer.Option(help="comma-separated corruptions, 'all' or 'none': gaussian-noise, "
                                             "shot-noise, impulse-noise, gaussian-blur, contrast, brightness, "
                                             "pixelate")] = "all",
    severities: Annotated[str, typer.Option(help="comma-separated corruption severities 1..5")] = "1,2,3,4,5",
    regime: Annotated[bool, typer.Option("--regime/--no-regime", help="the three-regime diagnosis: LMC barrier "
                                         "between the two models' weights (same architecture) + logit CKA")] = False,
    lmc_points: Annotated[int, typer.Option(help="--regime: evenly spaced interpolation points from A (0) to B (1)")] = 11,
    temperature: Annotated[str, typer.Option(help="--regime: the recipe field reported as the temperature-like "
                                             "parameter (e.g. epochs, lr, batch_size, or lr/batch_size)")] = "epochs",
    barrier_threshold: Annotated[float, typer.Option(help="--regime: LMC barrier (training loss) above which the "
                                                     "two models are poorly connected (regime I)")] = 0.1,
    similarity_threshold: Annotated[float, typer.Option(help="--regime: logit CKA at or above which outputs are "
                                                        "similar (II-B; below: II-A)")] = 0.9,
    seed: Annotated[int, seed_option("seed of the corruptions, planes and LMC batches")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 1,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Compare two vision runs: per-layer CKA, top-1 agreement, accuracy under common corruptions, where they
    disagree on planes through test images and (--regime) the three-regime diagnosis."""
    start(progress)
    man_a, man_b = _manifest(run_a, "RUN_A"), _manifest(run_b, "RUN_B")
    ia, ib = _inputs(man_a["recipe"]), _inputs(man_b["recipe"])
    if ia != ib:
        def say_in(i):
            return f"{i[0]} {i[1]}px {'RGB' if i[2] else 'grey'}"

        raise PruneError(f"The runs were trained on different inputs ({say_in(ia)} vs {say_in(ib)}); compare needs "
                         "two runs on the same data set.")
    if test_subset < 1 or cka_examples < 2:
        raise PruneError("--test-subset must be at least 1 image and --cka-examples at least 2.")
    if threads < 1:
        raise PruneError(f"--threads must be at least 1, got {threads}.")
    if plane_resolution < 2 or lmc_points < 2:
        raise PruneError("--plane-resolution and --lmc-points must be at least 2.")
    if corruptions.strip().lower() == "none":
        kinds: list[str] = []
    elif corruptions.strip().lower() == "all":
        kinds = CORRUPTIONS.names()
    else:
        kinds = [CORRUPTIONS.canonical(k.strip()) for k in corruptions.split(",") if k.strip()]
    try:
        sev = [int(s) for s in severities.split(",") if s.strip()]
    except ValueError:
        raise PruneError(f"--severities takes numbers 1..5 separated by commas, got {severities!r}.") from None
    if not sev or any(not 1 <= s <= 5 for s in sev):
        raise PruneError(f"--severities takes numbers 1..5 separated by commas, got {severities!r}.")
    if not barrier_threshold >= 0 or not 0 <= similarity_threshold <= 1:
        raise PruneError("--barrier-threshold must be >= 0 and --similarity-threshold in [0, 1].")
    temps = None
    if regime:
        temps = {f"{temperature} (A)": _temperature(man_a["recipe"], temperature),
                 f"{temperature} (B)": _temperature(man_b["recipe"], temperature)}
    if out is not None:
        from prunekit.io import check_output

        if out.exists() and overwrite and (out / "compare.json").is_file():
            pass  # a compare directory this command wrote: replaced atomically below
        else:
            check_output(out, overwrite, inputs=(run_a, run_b))
    torch.set_num_threads(threads)
    from prunekit.vision.train import load_data, load_run

    model_a, _, _ = load_run(run_a)
    model_b, _, _ = load_run(run_b)
    ra = man_a["recipe"]
    data = load_data(ia[0], ra.get("train_subset"), test_subset, ra.get("seed", 0), ia[1], rgb=ia[2])
    with torch.no_grad():
        na, nb = model_a.eval()(data["x_test"][:1]).shape[-1], model_b.eval()(data["x_test"][:1]).shape[-1]
    if na != nb:
        raise PruneError(f"The runs predict different numbers of classes ({na} vs {nb}); compare needs the same classes.")
    if regime:
        _check_same_shapes(model_a, model_b)
    pixel = pixel_scale(ia[0], data["x_test"])
    regime_kw = {"barrier_threshold": barrier_threshold, "similarity_threshold": similarity_threshold,
                 "temperature": temps, "load": [_density(man_a), _density(man_b)],
                 "batch_size": int(ra.get("batch_size", 128)), "alphas": lmc_points}
    res = compare_runs(model_a, model_b, data, kinds=kinds, severities=sev, plane=plane, resolution=plane_resolution,
                       cka_examples=cka_examples,
                       regime=regime, regime_kw=regime_kw, pixel=pixel, seed=seed, progress=progress)
    names = (str(run_a), str(run_b))
    _print_table(res, names)
    if out is not None:
        from prunekit import __version__
        from prunekit.io import atomic_dir, dumps

        doc = {"kind": "vision-compare", "prunekit": __version__, "run_a": str(run_a), "run_b": str(run_b),
               "dataset": ia[0], "seed": seed, **_json_ready(res)}
        with atomic_dir(out) as tmp:
            (tmp / "compare.json").write_text(dumps(doc))
            _plot_cka(res["cka"], tmp / "cka.png", "per-layer linear CKA, A vs B")
            if "corruptions" in res:
                _plot_corruptions(res["corruptions"], tmp / "corruptions.png", ("A", "B"))
            if "plane" in res:
                plot_planes(res["plane"]["planes"], tmp / "plane.png", ("A", "B"), na)
            if "regime" in res:
                _plot_lmc(res["regime"], tmp / "lmc.png")
        print(f"saved {out} (compare.json, {', '.join(sorted(p.name for p in out.glob('*.png')))})")

"""How good a (pruned) diffusion pipeline is: class fidelity, FID on a classifier's features, sampling time, size.

- **Class fidelity**: the share of generated samples that the project's own Fashion-MNIST classifier (``SmallCNN``
  at the pipeline's resolution, trained once here and cached as safetensors) assigns to the class asked for.
- **FID** (Fréchet distance) between the classifier's penultimate features (128-d) of the samples and of the
  10,000 test images; not Inception FID, so its values are only comparable within this benchmark, at an equal
  number of samples.
- **Sampling time per image** at fixed DDIM steps and guidance, measured here, and the UNet's parameters and MACs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.diffusion.pipeline import Pipeline, count_macs, parameters, sample

CLASSIFIER_EPOCHS = 3


def _classifier_dir(size: int):
    from prunekit.zoo.models import cache_dir

    return cache_dir() / "diffusion" / f"classifier-{size}px-{CLASSIFIER_EPOCHS}ep"


_CLASSIFIERS: dict = {}


def classifier(size: int = 16, progress: bool = True):
    """The Fashion-MNIST classifier at ``size`` px (inputs in [-1, 1]), trained once and cached (loaded once per
    process)."""
    if size not in _CLASSIFIERS:
        _CLASSIFIERS[size] = _classifier(size, progress)
    return _CLASSIFIERS[size]


def _classifier(size: int, progress: bool):
    from safetensors.torch import load_file, save_file

    from prunekit.core.loop import make_optimizer, make_schedule, train_loop
    from prunekit.core.progress import say
    from prunekit.diffusion.reference import images
    from prunekit.io import atomic_dir, write_json
    from prunekit.zoo.nets import SmallCNN

    d = _classifier_dir(size)
    model = SmallCNN(10, width=32, in_ch=1, size=size)
    if (d / "model.safetensors").is_file():
        model.load_state_dict(load_file(d / "model.safetensors"))
        return model.eval()
    say(f"training the {size}px Fashion-MNIST classifier once ({CLASSIFIER_EPOCHS} epochs, cached in {d})")
    torch.manual_seed(0)
    x, y = images("train", size)
    g = torch.Generator().manual_seed(0)
    bs = 128
    steps = CLASSIFIER_EPOCHS * (len(x) // bs)
    opt = make_optimizer(model.parameters(), "adamw", 2e-3, weight_decay=0.01)
    sched = make_schedule(opt, "onecycle", steps, pct_start=0.1)

    def epoch():
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):
            idx = perm[i:i + bs]
            yield x[idx], y[idx]

    def loss_fn(m, b):
        out = m(b[0])
        return F.cross_entropy(out, b[1]), out

    train_loop(model, opt, (epoch() for _ in range(CLASSIFIER_EPOCHS)), loss_fn, scheduler=sched, total=steps,
               desc="train the fidelity classifier", progress=progress)
    model.eval()
    xt, yt = images("test", size)
    acc = float((predict(model, xt) == yt).float().mean())
    with atomic_dir(d) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        write_json(tmp / "train.json", {"size": size, "epochs": CLASSIFIER_EPOCHS, "test_accuracy": acc})
    return model


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])


@torch.no_grad()
def features(model, x: torch.Tensor, batch: int = 1000) -> np.ndarray:
    return torch.cat([model.embed(x[i:i + batch]) for i in range(0, len(x), batch)]).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows = samples)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


_TEST_FEATURES: dict = {}


def test_features(model, size: int) -> np.ndarray:
    from prunekit.diffusion.reference import images

    key = (id(model), size)
    if key not in _TEST_FEATURES:
        x, _ = images("test", size)
        _TEST_FEATURES[key] = features(model, x)
    return _TEST_FEATURES[key]


def generate(pipe: Pipeline, samples: int, *, steps: int = 20, guidance: float = 2.0, seed: int = 0,
             batch: int = 250) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``samples`` images, classes in turn (0, 1, ..., 9, 0, ...), from noise seeded by ``seed``; returns images,
    labels and the seconds spent sampling (the conditions' text encoding included)."""
    labels = torch.arange(samples) % 10
    t0 = time.perf_counter()
    with torch.no_grad():
        cond = pipe.condition(labels, guidance=guidance != 1.0)
        if "aptp" in pipe.extras:
            from prunekit.diffusion.aptp import sample_routed

            x = sample_routed(pipe, cond, steps=steps, guidance=guidance, seed=seed, batch=batch)
        else:
            x = sample(pipe, cond, steps=steps, guidance=guidance, seed=seed, batch=batch)
    return x.clamp(-1, 1), labels, time.perf_counter() - t0


def evaluate(pipe: Pipeline, samples: int = 1000, *, steps: int = 20, guidance: float = 2.0, seed: int = 0,
             batch: int = 250, progress: bool = True) -> dict:
    """Class fidelity, FID, sampling time per image, parameters and MACs of ``pipe`` (a Fashion-MNIST model)."""
    size = pipe.in_shape()[-1]
    clf = classifier(size, progress)
    x, y, seconds = generate(pipe, samples, steps=steps, guidance=guidance, seed=seed, batch=batch)
    pred = predict(clf, x)
    per_class = [float((pred[y == c] == c).float().mean()) for c in range(10)]
    out = {
        "class_fidelity": float((pred == y).float().mean()),
        "class_fidelity_per_class": per_class,
        "fid": frechet(features(clf, x), test_features(clf, size)),
        "seconds_per_image": seconds / samples,
        "samples": samples, "steps": steps, "guidance": guidance, "seed": seed,
        "unet_params": parameters(pipe.unet), "text_encoder_params": parameters(pipe.text_encoder),
        "unet_nonzero": int(sum(int((p != 0).sum()) for p in pipe.unet.parameters())),
        "unet_macs": count_macs(pipe),
    }
    if "aptp" in pipe.extras:
        from prunekit.diffusion.aptp import routed_macs

        with torch.no_grad():
            out["unet_macs"] = routed_macs(pipe, pipe.condition(y, guidance=False))  # the average under routing
    return out


def grid_image(x: torch.Tensor, rows: int = 10, cols: int = 10) -> np.ndarray:
    """A (rows x cols) mosaic of the first samples as a [0, 1] array (for the benchmark PNG)."""
    x = (x[: rows * cols].clamp(-1, 1) + 1) / 2
    n, _c, h, w = x.shape
    out = torch.ones(rows * (h + 1), cols * (w + 1))
    for i in range(min(n, rows * cols)):
        r, k = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = x[i, 0]
    return out.numpy()

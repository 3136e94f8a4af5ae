"""A self-supervised image encoder trained on the data set itself (SimCLR, Chen et al. 2020), for the prototype
score as "Beyond neural scaling laws" (Sorscher et al. 2022) defines it: the metric needs an encoder that never saw a
label (they used SwAV on ImageNet); k-means in its space, distance to the nearest prototype.

The encoder is a small CNN (three 3x3 convolutions with BatchNorm, global average pooling: ``width``, 2x, 2x
channels), a two-layer projection head for the NT-Xent loss (two augmented views of every image in a batch, the
other 2B - 2 views as negatives, temperature ``temperature``). Augmentation is batched in torch: random resized
crop (area 0.35-1, aspect 3/4-4/3) and horizontal flip (one affine grid, shared with prune-combine-augment),
brightness/contrast jitter, Gaussian noise. Embeddings are the pooled features before the projection head (as in SimCLR), L2-normalized.

``encoder_for(ds, cfg)`` trains it once per data set and config and caches it under
``$PRUNEKIT_CACHE/ssl/<key>/`` (safetensors weights + a JSON of the config and the data's fingerprint; never a
pickle); ``fingerprint`` hashes the weights, so embeddings cached for one encoder are not reused for another.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.core.config import Config
from prunekit.errors import PruneError


class SSLConfig(Config):
    steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    width: int = 16
    proj_dim: int = 64
    seed: int = 0

    what = "self-supervised encoder"

    def check(self) -> None:
        for name in ("steps", "batch_size", "width", "proj_dim"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise PruneError(f"The encoder's {name} must be an integer of at least 1, got {v}.")
        if self.batch_size < 2:
            raise PruneError("SimCLR needs a batch of at least 2 images (the other images are the negatives).")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise PruneError(f"The encoder's {name} must be a positive number, got {v}.")


class Encoder(nn.Module):
    """Conv-BN-ReLU x3 (strides 1, 2, 2), global average pooling; ``embed`` gives the 4*width features."""

    def __init__(self, in_ch: int = 1, width: int = 32, proj_dim: int = 64):
        super().__init__()
        w = width

        def block(i, o, s):
            return [nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(in_ch, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU(inplace=True), nn.Linear(4 * w, proj_dim))
        self.register_buffer("in_mean", torch.zeros(1))  # the training images' pixel mean / std (set by training)
        self.register_buffer("in_std", torch.ones(1))

    def embed(self, x):
        return self.features(x)

    def forward(self, x):
        return self.head(self.features(x))


def _as_images(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255)
    return t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of every image of the batch ``x`` [B, C, H, W] in [0, 1]: the data family's batched random
    resized crop + flip (:func:`prunekit.data.compose.random_resized_crop`, area 0.35-1), then brightness / contrast
    jitter and Gaussian noise."""
    from prunekit.data.compose import random_resized_crop

    b = x.shape[0]
    v = random_resized_crop(x, g, scale=(0.35, 1.0))
    bright = torch.empty(b, 1, 1, 1).uniform_(-0.2, 0.2, generator=g)
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.7, 1.3, generator=g)
    mean = v.mean((1, 2, 3), keepdim=True)
    v = (v - mean) * contrast + mean + bright
    v = v + 0.03 * torch.randn(v.shape, generator=g)
    return v.clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's positive is the other view of its image, the other 2B - 2 views are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def train_encoder(ds, cfg: SSLConfig | None = None, progress: bool = False) -> Encoder:
    """Train the encoder on the images of ``ds`` (labels unused). Deterministic for a seed."""
    from prunekit.core.loop import make_optimizer, make_schedule, train_loop

    cfg = cfg or SSLConfig()
    cfg.check()
    if ds.kind != "image":
        raise PruneError(f"The self-supervised encoder learns from images; {ds.name!r} holds {ds.kind} data.")
    x = _as_images(ds.x)
    mean, std = x.mean(), x.std().clamp_min(1e-6)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = Encoder(x.shape[1], cfg.width, cfg.proj_dim)
    model.in_mean.fill_(float(mean))
    model.in_std.fill_(float(std))
    bs = min(cfg.batch_size, len(x))
    opt = make_optimizer(model.parameters(), "adamw", cfg.lr, cfg.weight_decay)
    sched = make_schedule(opt, "onecycle", cfg.steps, pct_start=0.1)

    def batches():
        left = cfg.steps
        while left > 0:
            perm = torch.randperm(len(x), generator=g)
            steps = min(left, max(1, len(x) // bs))
            left -= steps
            yield (perm[s * bs:(s + 1) * bs] for s in range(steps))

    def loss_fn(m, idx):
        xb = x[idx]
        v1, v2 = augment(xb, g), augment(xb, g)
        z = m((torch.cat([v1, v2]) - m.in_mean) / m.in_std)
        loss = nt_xent(z[:len(idx)], z[len(idx):], cfg.temperature)
        return loss, None

    train_loop(model, opt, batches(), loss_fn, scheduler=sched, total=cfg.steps, desc="SimCLR encoder",
               progress=progress)
    return model.eval()


def fingerprint(model: nn.Module) -> str:
    """A hash of the encoder's weights: embeddings cached for another encoder are never reused."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + str(tuple(v.shape)).encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def embed_images(model: Encoder, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """[N, 4*width] L2-normalized pooled features of uint8 images."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        t = _as_images(x[i:i + batch_size])
        out.append(model.embed((t - model.in_mean) / model.in_std))
    z = torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 1), np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def _cache_root() -> Path:
    from prunekit.zoo.models import cache_dir

    return cache_dir() / "ssl"


def encoder_for(ds, cfg: SSLConfig | None = None, *, cache: Path | None = None, progress: bool = False) -> Encoder:
    """The encoder trained on ``ds`` with ``cfg``: loaded from the cache when there, else trained and saved (temp
    folder, then rename: never half-written)."""
    from safetensors.torch import load_file, save_file

    cfg = cfg or SSLConfig()
    cfg.check()
    key_src = json.dumps({"data": ds.fingerprint(), "cfg": cfg.model_dump()}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    folder = Path(cache or _cache_root()) / f"simclr-{key}"
    in_ch = 1 if ds.x.ndim == 3 else ds.x.shape[3]
    if (folder / "encoder.safetensors").exists():
        model = Encoder(in_ch, cfg.width, cfg.proj_dim)
        model.load_state_dict(load_file(str(folder / "encoder.safetensors")))
        return model.eval()
    model = train_encoder(ds, cfg, progress=progress)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "encoder.safetensors"))
    (tmp / "encoder.json").write_text(json.dumps({"kind": "prunekit-simclr-encoder", "data": ds.fingerprint(),
                                                  "data_name": ds.name, "config": cfg.model_dump(),
                                                  "fingerprint": fingerprint(model)}, indent=1))
    if folder.exists():  # another process finished first: theirs is the same encoder
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(folder)
    return model

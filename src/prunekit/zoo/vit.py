"""A ViT trained here on Fashion-MNIST (no pretrained ViT ships with the packages this project may use).

Hugging Face ``ViTForImageClassification``: 32x32 inputs (the 28x28 images padded by 2), 4x4 patches (64 tokens
+ the class token), hidden 128, 6 layers, 4 heads, MLP 512 (1.2M parameters). Five epochs (15 to 30 minutes on a
2-core CPU, once; three epochs reached only 78.5% top-1) with the project's one training loop (AdamW, one-cycle,
label smoothing 0.1, random shifts and flips) on the 60k training images, seed 0; cached under
``$PRUNEKIT_CACHE/models/vit-fashion-<epochs>ep`` as a stock ``save_pretrained`` directory with a ``train.json``
of the recipe and test accuracy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prunekit.zoo.models import cache_dir

EPOCHS = 5


def vit_config():
    from transformers import ViTConfig

    return ViTConfig(image_size=32, patch_size=4, num_channels=1, hidden_size=128, num_hidden_layers=6,
                     num_attention_heads=4, intermediate_size=512, num_labels=10, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, qkv_bias=True)


def images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as float (N, 1, 32, 32), normalized, and labels."""
    from prunekit.zoo.images import fashion_mnist

    x, y = fashion_mnist(split)
    x = F.pad(x.float().div(255.0), (2, 2, 2, 2))
    return ((x - 0.286) / 0.353)[:, None], y


@torch.no_grad()
def accuracy(model, x, y, batch: int = 500) -> float:
    model.eval()
    right = 0
    for i in range(0, len(x), batch):
        right += int((model(pixel_values=x[i:i + batch]).logits.argmax(-1) == y[i:i + batch]).sum())
    return right / len(x)


def fashion_vit(epochs: int = EPOCHS, progress: bool = True):
    """The trained model (eval mode), training it once if it is not cached."""
    from transformers import ViTForImageClassification

    from prunekit.core.loop import make_optimizer, make_schedule, train_loop
    from prunekit.core.progress import say
    from prunekit.io import atomic_dir, write_json

    out = cache_dir() / "models" / f"vit-fashion-{epochs}ep"
    if (out / "train.json").is_file():
        return ViTForImageClassification.from_pretrained(out, trust_remote_code=False).eval()
    say(f"training the Fashion-MNIST ViT once ({epochs} epochs, cached in {out})")
    torch.manual_seed(0)
    model = ViTForImageClassification(vit_config())
    x, y = images("train")
    g = torch.Generator().manual_seed(0)
    bs = 128
    steps = epochs * (len(x) // bs)
    opt = make_optimizer(model.parameters(), "adamw", 1e-3, weight_decay=0.05)
    sched = make_schedule(opt, "onecycle", steps, pct_start=0.1)

    def epoch_batches():
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):
            idx = perm[i:i + bs]
            xb = x[idx]
            flip = torch.rand(bs, generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dx, dy), dims=(-2, -1))
            yield xb, y[idx]

    def loss_fn(m, batch):
        xb, yb = batch
        logits = m(pixel_values=xb).logits
        return F.cross_entropy(logits, yb, label_smoothing=0.1), logits

    t0 = time.perf_counter()
    train_loop(model, opt, (epoch_batches() for _ in range(epochs)), loss_fn, scheduler=sched, total=steps,
               desc="train ViT", progress=progress)
    seconds = time.perf_counter() - t0
    model.eval()
    xt, yt = images("test")
    acc = accuracy(model, xt, yt)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        write_json(Path(tmp) / "train.json", {"epochs": epochs, "batch_size": bs, "optimizer": "adamw 1e-3 wd 0.05",
                                              "schedule": "onecycle", "label_smoothing": 0.1, "seed": 0,
                                              "augment": "flip + shift <= 2 px", "test_top1": acc,
                                              "train_seconds": seconds, "config": json.loads(model.config.to_json_string())})
    say(f"ViT trained in {seconds / 60:.1f} min: test top-1 {acc:.4f}")
    return model

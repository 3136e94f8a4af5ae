"""The reference diffusion model, trained here (no diffusion weights ship offline).

A text-conditioned DDPM on Fashion-MNIST at 16x16: a ``UNet2DConditionModel`` (channels 32/64/64, one resnet per
block, cross-attention at 8x8 and 4x4 and in the mid block, 1.7M parameters) and a 2-layer ``CLIPTextModel``
(width 64) reading the prompt "a photo of a <class>" through prunekit's word vocabulary; 10% of the prompts are
empty so that sampling can use classifier-free guidance. 16 px, not the issue's 32 px: at 32 px one training step
of 64 costs about 4x more on the 2-core CPU this project is built on, and a model trained long enough to draw
recognisable classes would not fit a session. Trained once with the project's one training loop (AdamW,
warmup-cosine, EMA of the weights), seed 0, and cached under ``$PRUNEKIT_CACHE/diffusion/`` as a pipeline
directory (``pipeline.save``) whose record holds the recipe and the training time.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prunekit.core.config import Config
from prunekit.diffusion.pipeline import Pipeline, Prompts, denoise_loss


class ReferenceConfig(Config):
    size: int = 16
    channels: tuple[int, ...] = (32, 64, 64)
    layers: int = 1
    text_width: int = 64
    text_layers: int = 2
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    p_uncond: float = 0.1
    seed: int = 0
    threads: int = 2

    def key(self) -> str:
        return f"fashion-ddpm-{self.size}px-{'x'.join(map(str, self.channels))}-l{self.layers}-{self.steps}"


@functools.lru_cache(maxsize=4)
def images(split: str = "train", size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST resized to ``size`` (area-preserving, antialiased) in [-1, 1], and labels (computed once per
    process; callers never change them in place)."""
    from prunekit.zoo.images import fashion_mnist

    x, y = fashion_mnist(split)
    x = x.float().div(255.0)[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 2 - 1), y


def build(cfg: ReferenceConfig) -> Pipeline:
    """The untrained pipeline of ``cfg`` (seeded)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from prunekit.zoo.images import FASHION_CLASSES

    torch.manual_seed(cfg.seed)
    prompts = Prompts.for_classes(list(FASHION_CLASSES))
    c = cfg.channels
    unet = UNet2DConditionModel(
        sample_size=cfg.size, in_channels=1, out_channels=1, layers_per_block=cfg.layers, block_out_channels=c,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(c) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(c) - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_width, attention_head_dim=4, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(prompts.words) + 3, hidden_size=cfg.text_width,
                                        intermediate_size=2 * cfg.text_width, num_hidden_layers=cfg.text_layers,
                                        num_attention_heads=4, max_position_embeddings=prompts.length,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    sched = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
             "clip_sample": True, "set_alpha_to_one": False}
    return Pipeline(unet, sched, text, None, prompts)


def train(cfg: ReferenceConfig, progress: bool = True) -> tuple[Pipeline, dict]:
    from prunekit.core.loop import make_optimizer, make_schedule, train_loop

    torch.set_num_threads(cfg.threads)
    pipe = build(cfg)
    x, y = images("train", cfg.size)
    g = torch.Generator().manual_seed(cfg.seed)
    ids = pipe.prompts.ids(pipe.prompts.prompts)
    null = pipe.prompts.ids([""])
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = make_optimizer(params, "adamw", cfg.lr, weight_decay=0.0)
    sched = make_schedule(opt, "warmup-cosine", cfg.steps, warmup=cfg.warmup, min_factor=0.05)
    live = torch.nn.ModuleDict({"unet": pipe.unet, "text": pipe.text_encoder})

    def batches():
        done = 0
        while done < cfg.steps:
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x) - cfg.batch_size + 1, cfg.batch_size):
                if done >= cfg.steps:
                    return
                idx = perm[i:i + cfg.batch_size]
                drop = torch.rand(len(idx), generator=g) < cfg.p_uncond
                tok = torch.where(drop[:, None], null.expand(len(idx), -1), ids[y[idx]])
                done += 1
                yield x[idx], tok

    def loss_fn(model, batch):
        xb, tok = batch
        from prunekit.diffusion.pipeline import Condition

        cond = Condition(hidden=pipe.text_encoder(input_ids=tok).last_hidden_state)
        return denoise_loss(pipe, xb, cond, generator=g)

    t0 = time.perf_counter()
    res = train_loop(live, opt, [batches()], loss_fn, scheduler=sched, ema=cfg.ema, total=cfg.steps,
                     desc="train the reference DDPM", progress=progress,
                     clip=(params, 1.0))
    seconds = time.perf_counter() - t0
    pipe.unet.eval()  # the loop left the weight average in the UNet and the text encoder
    pipe.text_encoder.eval()
    info = {"loss_last": res.summary()["loss_last"], "seconds": seconds, "threads": cfg.threads}
    return pipe, info


def reference_dir(cfg: ReferenceConfig | None = None) -> Path:
    from prunekit.zoo.models import cache_dir

    cfg = cfg or ReferenceConfig()
    return cache_dir() / "diffusion" / cfg.key()


def reference(cfg: ReferenceConfig | None = None, progress: bool = True) -> Path:
    """The cached reference pipeline directory, trained once if absent."""
    from prunekit.core.progress import say
    from prunekit.diffusion import pipeline
    from prunekit.io import record

    cfg = cfg or ReferenceConfig()
    out = reference_dir(cfg)
    if (out / "prunekit.json").is_file() and (out / "unet" / "config.json").is_file():
        return out
    say(f"training the reference diffusion model once ({cfg.steps} steps, cached in {out})")
    pipe, info = train(cfg, progress)
    rec = record("diffusion", {"method": "reference", **cfg.model_dump(mode="json"), "classes": 10},
                 timings={"train": info["seconds"]}, metrics={"loss_last": info["loss_last"]},
                 source="trained here: Fashion-MNIST, 16x16, text-conditioned DDPM", classes=10)
    pipeline.save(pipe, out, rec, overwrite=True)
    return out

"""A diffusion pipeline as prunekit reads and writes it: stock ``diffusers`` parts in stock sub-folders.

A pipeline directory holds ``unet/`` (``UNet2DConditionModel`` or ``UNet2DModel``, safetensors), ``scheduler/``
(its config), optionally ``text_encoder/`` (``transformers.CLIPTextModel``) and ``vae/`` (``AutoencoderKL``),
``prompts.json`` (the word vocabulary and one prompt per class of a model trained here: no tokenizer download)
and ``prunekit.json`` (the run record, kind ``diffusion``). Each part loads with plain
``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`` and so on; a Stable Diffusion directory
(``model_index.json``) is read the same way.

The condition of a denoising step is either class labels (through the prompts and the text encoder, or a UNet's
own class embedding) or prompt embeddings handed in directly (``Condition``). Sampling is deterministic DDIM from
seeded noise, with classifier-free guidance when the model was trained with an empty prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PruneError

UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")
PROMPTS = "prompts.json"
EXTRAS = "extras.json"  # settings of forward patches (token merging), re-applied by load


def _diffusers():
    try:
        import diffusers
    except ImportError:  # pragma: no cover - the dependency is declared
        raise PruneError("The diffusion family needs diffusers; run `pip install diffusers==0.42.1`.") from None
    import diffusers

    return diffusers


@dataclass
class Prompts:
    """A word-level tokenizer for a handful of fixed prompts (the class prompts of a model trained here):
    ids ``0`` = pad, ``1`` = start, ``2`` = end, then the words."""

    words: list[str]
    prompts: list[str]
    length: int = 8

    def ids(self, texts: list[str]) -> torch.Tensor:
        index = {w: i + 3 for i, w in enumerate(self.words)}
        rows = []
        for t in texts:
            toks = [1] + [index[w] for w in t.split()] + [2]
            if len(toks) > self.length:
                raise PruneError(f"Prompt {t!r} is longer than {self.length - 2} words.")
            rows.append(toks + [0] * (self.length - len(toks)))
        return torch.tensor(rows, dtype=torch.long)

    @classmethod
    def for_classes(cls, names: list[str], template: str = "a photo of a {}") -> Prompts:
        prompts = [template.format(n.lower().replace("/", " or ").replace("-", " ")) for n in names]
        words = sorted({w for p in prompts for w in p.split()})
        return cls(words, prompts, length=max(len(p.split()) for p in prompts) + 2)

    def to_json(self) -> dict:
        return {"words": self.words, "prompts": self.prompts, "length": self.length}


@dataclass
class Condition:
    """What one batch is conditioned on: ``hidden`` (encoder hidden states, batch x tokens x dim), or ``labels``
    (a UNet's own class embedding); ``null`` the unconditional counterpart for guidance (or None)."""

    hidden: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    null_hidden: torch.Tensor | None = None
    null_labels: torch.Tensor | None = None

    def kwargs(self, null: bool = False) -> dict:
        h = self.null_hidden if null else self.hidden
        y = self.null_labels if null else self.labels
        out = {}
        if h is not None:
            out["encoder_hidden_states"] = h
        if y is not None:
            out["class_labels"] = y
        return out

    @property
    def guided(self) -> bool:
        return self.null_hidden is not None or self.null_labels is not None

    def __len__(self) -> int:
        t = self.hidden if self.hidden is not None else self.labels
        return len(t)

    def take(self, idx) -> Condition:
        def f(t):
            return None if t is None else t[idx]
        return Condition(f(self.hidden), f(self.labels), f(self.null_hidden), f(self.null_labels))


@dataclass
class Pipeline:
    unet: nn.Module
    scheduler_config: dict
    text_encoder: nn.Module | None = None
    vae: nn.Module | None = None
    prompts: Prompts | None = None
    record: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # method-specific parts (APTP's router and experts)

    # -- the pieces of sampling -------------------------------------------------------------------------
    @property
    def unconditional_class(self) -> int | None:
        """The class label of "no class" when the UNet's own class embedding was trained with one."""
        n = getattr(self.unet.config, "num_class_embeds", None)
        k = self.record.get("classes") or self.record.get("recipe", {}).get("classes")
        return k if (n is not None and k is not None and n == k + 1) else None

    def scheduler(self):
        d = _diffusers()
        return d.DDIMScheduler.from_config({k: v for k, v in self.scheduler_config.items() if not k.startswith("_")})

    def in_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        s = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, s, s)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is None:
            raise PruneError("This pipeline has no text encoder; pass prompt embeddings instead of prompts.")
        return self.text_encoder(input_ids=ids).last_hidden_state

    def condition(self, labels: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                  guidance: bool = True) -> Condition:
        """The condition of ``labels`` (class indices) or of given ``hidden`` prompt embeddings."""
        if hidden is not None:
            return Condition(hidden=hidden)
        if labels is None:
            raise PruneError("Give class labels or prompt embeddings to condition on.")
        if self.prompts is not None and self.text_encoder is not None:
            texts = [self.prompts.prompts[int(i)] for i in labels]
            h = self.encode_ids(self.prompts.ids(texts))
            null = self.encode_ids(self.prompts.ids([""] * len(labels))) if guidance else None
            return Condition(hidden=h, null_hidden=null)
        if getattr(self.unet, "class_embedding", None) is not None:
            u = self.unconditional_class
            null = torch.full_like(labels, u) if (guidance and u is not None) else None
            return Condition(labels=labels, null_labels=null)
        raise PruneError("This pipeline has neither prompts with a text encoder nor a class embedding; "
                         "pass prompt embeddings.")

    def eps(self, x: torch.Tensor, t, cond: Condition, guidance: float = 1.0, unet: nn.Module | None = None):
        """The predicted noise, with classifier-free guidance ``guidance`` when the condition has a null part."""
        net = unet if unet is not None else self.unet
        if guidance != 1.0 and cond.guided:
            both = {}
            for k, v in cond.kwargs().items():
                both[k] = torch.cat([cond.kwargs(null=True)[k], v])
            e = net(torch.cat([x, x]), t, **both).sample
            e0, e1 = e.chunk(2)
            return e0 + guidance * (e1 - e0)
        return net(x, t, **cond.kwargs()).sample

    def clone(self) -> Pipeline:
        import copy

        return Pipeline(copy.deepcopy(self.unet), dict(self.scheduler_config), copy.deepcopy(self.text_encoder),
                        self.vae, self.prompts, json.loads(json.dumps(self.record)), dict(self.extras))

    def components(self) -> dict[str, nn.Module]:
        out = {"unet": self.unet}
        if self.text_encoder is not None:
            out["text_encoder"] = self.text_encoder
        if self.vae is not None:
            out["vae"] = self.vae
        return out


@torch.no_grad()
def sample(pipe: Pipeline, cond: Condition, *, steps: int = 25, guidance: float = 1.0, seed: int = 0,
           noise: torch.Tensor | None = None, batch: int = 250, unet: nn.Module | None = None,
           decode: bool = True, progress: Callable | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from seeded Gaussian noise: the final latents (decoded by the VAE when the
    pipeline has one and ``decode``). The noise of sample ``i`` depends only on ``seed`` and ``i``."""
    n = len(cond)
    if noise is None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *pipe.in_shape()), generator=g)
    sched = pipe.scheduler()
    sched.set_timesteps(steps)
    net = unet if unet is not None else pipe.unet
    was = net.training
    net.eval()
    outs = []
    for i in range(0, n, batch):
        x = noise[i:i + batch].clone() * sched.init_noise_sigma
        c = cond.take(slice(i, i + batch))
        for t in sched.timesteps:
            e = pipe.eps(sched.scale_model_input(x, t), t, c, guidance, unet=net)
            x = sched.step(e, t, x, eta=0.0).prev_sample
        if decode and pipe.vae is not None:
            x = pipe.vae.decode(x / getattr(pipe.vae.config, "scaling_factor", 1.0)).sample
        outs.append(x)
        if progress is not None:
            progress(min(n, i + batch))
    net.train(was)
    return torch.cat(outs)


def denoise_loss(pipe: Pipeline, x0: torch.Tensor, cond: Condition, *, generator: torch.Generator | None = None,
                 teacher: nn.Module | None = None, distill: float = 0.0, unet: nn.Module | None = None):
    """The DDPM training loss (noise prediction MSE at a uniform timestep) and, with a ``teacher``, BK-SDM's
    output-level distillation ``distill * MSE(student eps, teacher eps)``. Returns ``(loss, eps)``."""
    sched = pipe.scheduler()
    net = unet if unet is not None else pipe.unet
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=generator)
    xt = sched.add_noise(x0, noise, t)
    kw = cond.kwargs()
    e = net(xt, t, **kw).sample
    loss = torch.nn.functional.mse_loss(e, noise)
    if teacher is not None and distill > 0:
        with torch.no_grad():
            et = teacher(xt, t, **kw).sample
        loss = loss + distill * torch.nn.functional.mse_loss(e, et)
    return loss, e


# -- files ------------------------------------------------------------------------------------------------

def _load_part(root: Path, sub: str, cls):
    d = root / sub
    if not (d / "config.json").is_file():
        return None
    if not any(d.glob("*.safetensors")):
        raise PruneError(f"{d} has no safetensors weights; prunekit never unpickles weights.")
    return cls.from_pretrained(d, use_safetensors=True, trust_remote_code=False)  # stock classes only


def unet_class(root: Path):
    cfg = root / "unet" / "config.json"
    if not cfg.is_file():
        raise PruneError(f"{root} has no unet/ folder with a config.json; a diffusion pipeline directory needs one.")
    try:
        name = json.loads(cfg.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise PruneError(f"{cfg} is not valid JSON.") from None
    if name not in UNET_CLASSES:
        raise PruneError(f"{cfg} describes a {name!r}; prunekit prunes {' or '.join(UNET_CLASSES)}.")
    return getattr(_diffusers(), name)


def load(path: str | Path) -> Pipeline:
    """Open a pipeline directory (one prunekit wrote, or a diffusers / Stable Diffusion one)."""
    root = Path(path)
    if not root.is_dir():
        raise PruneError(f"{root} is not a directory.")
    d = _diffusers()
    cls = unet_class(root)
    from prunekit.io import read_manifest

    record = read_manifest(root) or {}
    unet = _load_part(root, "unet", cls)
    if unet is None:  # pragma: no cover - unet_class checked it
        raise PruneError(f"{root} has no unet/.")
    sc = root / "scheduler" / "scheduler_config.json"
    sched = json.loads(sc.read_text()) if sc.is_file() else {"num_train_timesteps": 1000}
    text = None
    if (root / "text_encoder" / "config.json").is_file():
        from transformers import CLIPTextModel

        text = _load_part(root, "text_encoder", CLIPTextModel)
    vae = _load_part(root, "vae", d.AutoencoderKL) if (root / "vae").is_dir() else None
    prompts = None
    if (root / PROMPTS).is_file():
        prompts = Prompts(**json.loads((root / PROMPTS).read_text()))
    pipe = Pipeline(unet.eval(), sched, text.eval() if text is not None else None,
                    vae.eval() if vae is not None else None, prompts, record)
    from prunekit.diffusion import aptp, tome

    aptp.load_extras(root, pipe)  # APTP's router and experts, saved beside the UNet
    ex = root / EXTRAS
    if ex.is_file():
        data = json.loads(ex.read_text())
        if "tome" in data:
            pipe.extras["tome"] = data["tome"]
            tome.reapply(pipe)  # token merging is a patch of the forward: applied again on load
    return pipe


def save(pipe: Pipeline, out: str | Path, record: dict | None = None, overwrite: bool = False,
         inputs: tuple = ()) -> Path:
    """Write the pipeline atomically: stock sub-folders, ``prompts.json``, ``prunekit.json``."""
    from prunekit.io import MANIFEST, atomic_dir, check_output, write_json

    out = check_output(out, overwrite, inputs)
    with atomic_dir(out) as tmp:
        pipe.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        sched = dict(pipe.scheduler_config)
        sched.setdefault("_class_name", "DDIMScheduler")
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        if pipe.text_encoder is not None:
            pipe.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        if pipe.vae is not None:
            pipe.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        if pipe.prompts is not None:
            (tmp / PROMPTS).write_text(json.dumps(pipe.prompts.to_json(), indent=2))
        from prunekit.diffusion import aptp

        aptp.save_extras(pipe, tmp)
        if "tome" in pipe.extras:
            (tmp / EXTRAS).write_text(json.dumps({"tome": pipe.extras["tome"]}, indent=2))
        write_json(tmp / MANIFEST, record if record is not None else pipe.record)
    return out


def parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_macs(pipe: Pipeline, unet: nn.Module | None = None, tokens: int | None = None) -> int:
    """Multiply-accumulates of one UNet call on one sample: convolutions, linear layers and the attention
    products (``QK^T`` and ``AV``), at the pipeline's sample size and condition length."""
    import math

    net = unet if unet is not None else pipe.unet
    total = [0]

    def conv(m, i, o):
        total[0] += o.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def lin(m, i, o):
        total[0] += o.numel() * m.in_features

    def attn(m, args, kwargs, o):
        h = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states")
        if ctx is None and len(args) > 1:
            ctx = args[1]
        nq = h.shape[-2] * h.shape[-1] if h.dim() == 4 else h.shape[1]
        nk = nq if ctx is None else ctx.shape[1]
        inner = m.to_q.out_features
        total[0] += 2 * h.shape[0] * nq * nk * inner

    d = _diffusers()
    hooks = []
    for m in net.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin))
        elif isinstance(m, d.models.attention_processor.Attention):
            hooks.append(m.register_forward_hook(attn, with_kwargs=True))
    try:
        x = torch.zeros((1, *pipe.in_shape()))
        kw = {}
        cfg = net.config
        if getattr(cfg, "cross_attention_dim", None) is not None and "encoder_hid" not in kw:
            n = tokens or (pipe.prompts.length if pipe.prompts is not None else 8)
            dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
            kw["encoder_hidden_states"] = torch.zeros(1, n, dim)
        if getattr(net, "class_embedding", None) is not None and getattr(cfg, "num_class_embeds", None):
            kw["class_labels"] = torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            net(x, torch.tensor([10]), **kw)
    finally:
        for h in hooks:
            h.remove()
    return total[0]

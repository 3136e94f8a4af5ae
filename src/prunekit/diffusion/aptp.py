"""APTP: prompt-based pruning (Ganjdanesh et al., "Not All Prompts Are Made Equal: Prompt-based Pruning of
Text-to-Image Diffusion Models", 2024), method ``aptp``.

Why: one pruned UNet has to serve every prompt, but easy prompts need less capacity than hard ones. APTP learns a
**router** from the condition to one of ``K`` pruned architectures (**experts**), so each prompt is denoised by a
UNet sized for it, and the average cost meets the budget.

How it is built here (the paper's recipe on prunekit's pieces):

* **Architecture codes.** Expert ``k`` has one logit per residual-stream channel of every prunable level
  (:func:`prunekit.diffusion.channels.default_levels`: every level but 0, whose width also sets the stock time
  encoding; levels joined by an identity shortcut share one vector). Logits start high, ordered by the channels'
  coupled-group L1 importance (:func:`channels.level_importance`), and are learned. During training a channel's
  mask is a Gumbel-sigmoid sample at ``temperature`` (hard-concrete style relaxation); it multiplies the output of
  every module that writes the level's residual stream (ResNets, transformers, samplers), per sample.
* **Router.** A small MLP on the condition: the mean-pooled encoder hidden states of the prompt
  (``pipe.condition(labels)``), or a learned class embedding for a class-conditional UNet. Its softmax mixes the
  experts' masks for each sample, so the denoising loss teaches it which expert serves which condition.
* **Balanced assignment.** Each batch's router logits go through Sinkhorn-Knopp optimal transport with uniform
  expert marginals; the router is also trained (cross-entropy, weight ``balance``) towards that balanced
  assignment, which keeps every expert in use (the paper's OT step that prevents collapse onto one expert).
* **Losses.** ``pipeline.denoise_loss`` of the masked UNet + ``distill`` x MSE to the dense UNet's prediction
  (``ctx.dense.unet``) + ``resource`` x (the batch's expected MACs under the routing / dense - (1 - ratio))^2:
  the budget is an average over conditions, as the paper's, so experts of different cost can coexist (they start
  apart: the largest near dense, the others ``spread`` logits lower). An expert's expected MACs are the exact MAC polynomial of :class:`channels.MacModel` at its expected widths (the
  sum of its mask probabilities). The UNet's weights are frozen while the codes and the router learn (the
  paper's pruning phase); the one training loop :func:`prunekit.core.loop.train_loop` runs it.
* **Experts.** After training, each code's probabilities give a width per level (rounded to the nearest width a
  stock config allows, :func:`channels.check_widths`) and its highest logits the kept channels (the same number
  per GroupNorm group); :func:`channels.shrink` turns the dense UNet into a stock UNet per expert. With
  ``recipe.finetune.steps > 0`` each expert is fine-tuned (``methods.finetune``) on the training images whose
  condition the router sends to it.

The pipeline keeps ``pipe.unet`` = the **largest expert** (most MACs): code that ignores the routing still gets a
pruned UNet no bigger than any expert, and ``pipeline.count_macs`` reports an upper bound. Routed sampling is
:func:`sample_routed`. ``pipe.extras["aptp"] = {"router", "experts", "codes"}`` is written beside the pipeline:
``experts/<k>/`` (stock diffusers folders, safetensors) and ``router/`` (``config.json`` + ``model.safetensors``;
never a pickle).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.config import Config
from prunekit.diffusion.methods import METHODS, check_ratio
from prunekit.diffusion.pipeline import Condition, Pipeline, count_macs, sample
from prunekit.errors import PruneError

ROUTER = "router"
EXPERTS = "experts"


class AptpOptions(Config):
    what = "aptp option"

    experts: int = 2
    steps: int = 200
    batch_size: int = 16
    lr: float = 0.05  # the architecture codes' mask logits (AdamW)
    router_lr: float = 0.01
    temperature: float = 0.5  # Gumbel-sigmoid temperature of the relaxed masks
    resource: float = 10.0  # weight of the MAC term
    distill: float = 1.0  # weight of the output distillation from the dense UNet
    balance: float = 1.0  # weight of the router's cross-entropy to the Sinkhorn-balanced assignment
    sinkhorn_eps: float = 0.05
    init: float = 3.0  # initial mask logit (sigmoid 0.95: the largest expert starts near dense)
    spread: float = 3.0  # the experts' initial logits are init, init - spread / (K - 1), ..., init - spread
    hidden: int = 64  # router MLP width
    levels: list[int] | None = None  # prunable levels; None = every level but 0


# -- the router ------------------------------------------------------------------------------------------

class Router(nn.Module):
    """Condition -> expert logits. ``mode`` ``hidden``: mean-pooled encoder hidden states of width ``dim``;
    ``labels``: a class embedding of ``classes`` rows (class-conditional UNets)."""

    def __init__(self, dim: int, experts: int, hidden: int = 64, mode: str = "hidden", classes: int = 0):
        super().__init__()
        if mode not in ("hidden", "labels"):
            raise PruneError(f"Unknown router input {mode!r}; choose hidden or labels.")
        self.config = {"dim": int(dim), "experts": int(experts), "hidden": int(hidden), "mode": mode,
                       "classes": int(classes)}
        self.embed = nn.Embedding(classes, dim) if mode == "labels" else None
        # a fixed standardisation of the pooled prompt embeddings (set from the training conditions by
        # ``standardize``): prompts of one template differ by a few words, which a plain LayerNorm leaves tiny
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, experts))

    @torch.no_grad()
    def standardize(self, cond: Condition) -> None:
        if self.embed is not None:
            return
        f = self.features(cond, raw=True)
        self.shift.copy_(f.mean(0))
        self.scale.copy_(f.std(0, unbiased=False).clamp_min(1e-4) if len(f) > 1 else torch.ones_like(self.scale))

    def features(self, cond: Condition, raw: bool = False) -> torch.Tensor:
        if self.embed is not None:
            if cond.labels is None:
                raise PruneError("This router reads class labels; the condition has none.")
            return self.embed(cond.labels.long())
        if cond.hidden is None:
            raise PruneError("This router reads prompt embeddings; the condition has none.")
        f = cond.hidden.float().mean(1)
        return f if raw else (f - self.shift) / self.scale

    def forward(self, cond: Condition) -> torch.Tensor:
        return self.net(self.features(cond))


def sinkhorn(logits: torch.Tensor, eps: float = 0.05, iters: int = 30) -> torch.Tensor:
    """Balanced soft assignment (rows: samples, columns: experts) by Sinkhorn-Knopp with uniform marginals:
    every expert receives about ``B / K`` of the batch. Rows sum to 1."""
    import math

    B, K = logits.shape
    lq = (logits.double() / eps).T  # in the log domain: no overflow for any logit scale
    for _ in range(iters):
        lq = lq - torch.logsumexp(lq, 1, keepdim=True) - math.log(K)
        lq = lq - torch.logsumexp(lq, 0, keepdim=True) - math.log(B)
    return torch.exp(lq + math.log(B)).T.float()


# -- masks on the residual streams ------------------------------------------------------------------------

def _stream_modules(unet: nn.Module) -> dict[int, list[nn.Module]]:
    """Per level, the modules whose output is that level's residual stream."""
    from prunekit.diffusion.channels import _walk

    out: dict[int, list[nn.Module]] = {}
    for kind, name, _, level in _walk(unet):
        if level is None or kind == "norm":
            continue
        out.setdefault(level, []).append(unet.get_submodule(name))
    return out


class StreamMasks:
    """Forward hooks multiplying each residual-stream producer's output by a per-sample channel mask
    (``set(level -> batch x channels)``); removed on ``close``."""

    def __init__(self, unet: nn.Module):
        self.masks: dict[int, torch.Tensor] = {}
        self.hooks = []
        for level, mods in _stream_modules(unet).items():
            for m in mods:
                self.hooks.append(m.register_forward_hook(self._hook(level)))

    def _hook(self, level):
        def apply(mod, args, out):
            m = self.masks.get(level)
            if m is None:
                return out
            if isinstance(out, tuple):
                return (out[0] * m[:, :, None, None].to(out[0].dtype),) + tuple(out[1:])
            if hasattr(out, "sample"):
                out.sample = out.sample * m[:, :, None, None].to(out.sample.dtype)
                return out
            return out * m[:, :, None, None].to(out.dtype)
        return apply

    def close(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []


def gumbel_sigmoid(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None):
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


# -- hard codes -> experts -------------------------------------------------------------------------------

def hard_widths(unet: nn.Module, groups: list[list[int]], probs: list[torch.Tensor], model) -> list[int]:
    """Per-level widths of a code: each group's expected width rounded to an allowed width (floor or ceiling,
    the valid combination whose MACs are nearest to those at the expected widths)."""
    import itertools

    from prunekit.diffusion.channels import check_widths, widths_of

    dense = widths_of(unet)
    expected = list(map(float, dense))
    for g, p in zip(groups, probs):
        for i in g:
            expected[i] = float(p.sum())
    target = float(model.macs(torch.tensor(expected)))
    choices = []
    for g in groups:
        opts = model.options(g)
        e = expected[g[0]]
        lo = [o for o in opts if o <= e]
        hi = [o for o in opts if o >= e]
        near = sorted(opts, key=lambda o: abs(o - e))[:4]
        choices.append(sorted(set(([lo[-1]] if lo else []) + ([hi[0]] if hi else []) + near)))
    best = None
    for combo in itertools.product(*choices):
        w = list(dense)
        for g, x in zip(groups, combo):
            for i in g:
                w[i] = x
        try:
            check_widths(unet, w)
        except PruneError:
            continue
        d = abs(float(model.macs(w)) - target)
        if best is None or d < best[0]:
            best = (d, w)
    if best is None:  # pragma: no cover - the dense widths are always valid
        return dense
    return best[1]


def expert_from_code(unet: nn.Module, groups, logits: list[torch.Tensor], model, scores: dict):
    """The stock UNet of one architecture code (``logits`` per tie group) and its code record."""
    from prunekit.diffusion.channels import _cfg, select, shrink

    probs = [torch.sigmoid(lg) for lg in logits]
    widths = hard_widths(unet, groups, probs, model)
    G = _cfg(unet)["norm_num_groups"]
    keep = {}
    for g, lg in zip(groups, logits):
        k = select(lg.detach(), widths[g[0]], blocks=G)
        for i in g:
            keep[i] = k
    net = shrink(unet, keep, scores=scores)
    return net, {"widths": widths, "keep": {str(i): v.tolist() for i, v in keep.items()}}


# -- routing and sampling --------------------------------------------------------------------------------

def _state(pipe: Pipeline) -> dict:
    st = pipe.extras.get("aptp")
    if not st:
        raise PruneError("This pipeline has no APTP router; prune it with method aptp first.")
    return st


@torch.no_grad()
def route(pipe: Pipeline, labels_or_condition) -> torch.Tensor:
    """The expert index of each condition (class labels are turned into conditions by the pipeline)."""
    st = _state(pipe)
    cond = labels_or_condition
    if not isinstance(cond, Condition):
        labels = torch.as_tensor(cond, dtype=torch.long)
        cond = pipe.condition(labels, guidance=False)
        if st["router"].config["mode"] == "labels" and cond.labels is None:
            cond = Condition(labels=labels)
    router = st["router"].eval()
    return router(cond).argmax(-1)


@torch.no_grad()
def sample_routed(pipe: Pipeline, cond: Condition, *, seed: int = 0, noise: torch.Tensor | None = None,
                  **sample_kwargs) -> torch.Tensor:
    """:func:`pipeline.sample` with each condition denoised by the expert the router picks; sample ``i`` starts
    from the same noise as in ``pipeline.sample(pipe, cond, seed=seed)``, so results compare one to one."""
    st = _state(pipe)
    n = len(cond)
    if noise is None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *pipe.in_shape()), generator=g)
    r = route(pipe, cond)
    out = None
    for k in r.unique().tolist():
        idx = (r == k).nonzero()[:, 0]
        x = sample(pipe, cond.take(idx), noise=noise[idx], unet=st["experts"][k], seed=seed, **sample_kwargs)
        if out is None:
            out = torch.zeros((n, *x.shape[1:]), dtype=x.dtype)
        out[idx] = x
    return out


# -- the method ------------------------------------------------------------------------------------------

def make_router(pipe: Pipeline, experts: int, hidden: int) -> Router:
    cfg = pipe.unet.config
    if pipe.text_encoder is not None and pipe.prompts is not None:
        return Router(pipe.text_encoder.config.hidden_size, experts, hidden)
    n = getattr(cfg, "num_class_embeds", None)
    if n:
        return Router(hidden, experts, hidden, mode="labels", classes=n)
    d = getattr(cfg, "cross_attention_dim", None)
    if d:
        return Router(d if isinstance(d, int) else d[0], experts, hidden)
    raise PruneError("APTP routes on prompts or class labels; this pipeline has neither.")


@METHODS.register("aptp", params=AptpOptions, trains_itself=True,
                  description="prompt-routed pruning (APTP, Ganjdanesh et al. 2024): a router sends each condition "
                              "to one of K stock pruned UNets learned with Gumbel-sigmoid width masks")
def run(pipe: Pipeline, recipe, opts: AptpOptions, ctx) -> dict:
    from prunekit.core.loop import make_optimizer, train_loop
    from prunekit.diffusion import channels as ch
    from prunekit.diffusion.methods import finetune, training_batches
    from prunekit.diffusion.pipeline import denoise_loss

    ratio = check_ratio(recipe.ratio)
    if opts.experts < 1:
        raise PruneError("APTP needs at least 1 expert.")
    if opts.steps < 1:
        raise PruneError("APTP trains its codes and router: give steps >= 1.")
    unet = pipe.unet.eval()
    ch._check_supported(unet)
    levels = ch.default_levels(unet, opts.levels)
    scores = ch.importances(unet)
    model = ch.MacModel(pipe, levels=levels)
    groups = model.groups
    target = 1.0 - ratio
    K = opts.experts
    torch.manual_seed(recipe.seed)
    # initial logits: init, plus up to +-1 by the channel's importance rank (important channels stay longest)
    codes = nn.ParameterList()
    for g in groups:
        s = scores["levels"][g[0]]
        rank = torch.argsort(torch.argsort(s)).float() / max(1, len(s) - 1)
        base = opts.init + 2.0 * (rank - 0.5)
        # the experts start apart (the largest near dense, the others smaller): the budget is the routed average,
        # as in APTP, so experts of different cost can serve the conditions that need them
        offs = torch.tensor([-opts.spread * k / max(1, K - 1) for k in range(K)])[:, None]
        codes.append(nn.Parameter(base[None] + offs + 0.01 * torch.randn(K, len(s))))
    router = make_router(pipe, K, opts.hidden)
    if ctx.labels is not None:
        with torch.no_grad():
            router.standardize(pipe.condition(ctx.labels.unique(), guidance=False))
    else:
        router.standardize(ctx.calib)
    learn = nn.ModuleDict({"router": router, "codes": nn.Module()})
    learn["codes"].logits = codes
    frozen = [(p, p.requires_grad) for p in unet.parameters()]
    for p in unet.parameters():
        p.requires_grad_(False)
    teacher = ctx.dense.unet.eval()  # read under no_grad only (denoise_loss)
    dense_w = ch.widths_of(unet)

    def expected_fracs() -> torch.Tensor:
        out = []
        for k in range(K):
            w = [torch.tensor(float(d)) for d in dense_w]
            for g, lg in zip(groups, codes):
                e = torch.sigmoid(lg[k]).sum()
                for i in g:
                    w[i] = e
            out.append(model.macs(torch.stack(w)) / model.dense_macs)
        return torch.stack(out).float()

    with torch.no_grad():
        first = expected_fracs().tolist()
    gen = torch.Generator().manual_seed(recipe.seed + 11)
    hooks = StreamMasks(unet)
    opt = make_optimizer([{"params": list(codes.parameters()), "lr": opts.lr},
                          {"params": list(router.parameters()), "lr": opts.router_lr}], "adamw", opts.lr)
    trace = {"resource": [], "balance": []}

    def loss_fn(_, batch):
        x0, y = batch
        with torch.no_grad():
            cond = pipe.condition(y, guidance=False)
        logits = router(cond)
        with torch.no_grad():  # balanced hard targets: each expert gets about B / K of the batch
            q = F.one_hot(sinkhorn(logits.detach(), opts.sinkhorn_eps).argmax(-1), K).float()
        mix = torch.softmax(logits, -1)
        for g, lg in zip(groups, codes):
            m = mix @ gumbel_sigmoid(lg, opts.temperature, gen)
            for i in g:
                hooks.masks[i] = m
        loss, e = denoise_loss(pipe, x0, cond, generator=gen, teacher=teacher, distill=opts.distill, unet=unet)
        # the resource loss on the batch's expected cost under the routing (APTP's budget is an average over
        # prompts, not a cap per expert)
        res = ((mix.mean(0) * expected_fracs()).sum() - target) ** 2
        bal = -(q * torch.log_softmax(logits, -1)).sum(-1).mean()
        trace["resource"].append(float(res.detach()))
        trace["balance"].append(float(bal.detach()))
        return loss + opts.resource * res + opts.balance * bal, e

    try:
        res = train_loop(learn, opt, [training_batches(ctx, pipe, opts.steps, opts.batch_size, gen)], loss_fn,
                         total=opts.steps, desc="aptp: codes and router", progress=ctx.progress,
                         clip=(list(learn.parameters()), 1.0))
    finally:
        hooks.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
    with torch.no_grad():
        last = expected_fracs().tolist()
    router.eval()
    experts, records = [], []
    for k in range(K):
        net, rec = expert_from_code(unet, groups, [lg[k].detach() for lg in codes], model, scores)
        rec["macs"] = count_macs(pipe, unet=net)
        rec["params"] = sum(p.numel() for p in net.parameters())
        experts.append(net)
        records.append(rec)
    macs_dense = model.dense_macs
    pipe.extras["aptp"] = {"router": router, "experts": experts, "codes": records}
    # per-expert fine-tune on the images whose condition goes to it
    tuned = []
    if recipe.finetune.steps > 0 and ctx.images is not None and ctx.labels is not None:
        r = route(pipe, ctx.labels)
        for k, net in enumerate(experts):
            idx = (r == k).nonzero()[:, 0]
            if len(idx) == 0:
                tuned.append({})
                continue
            sub = dataclasses.replace(ctx, images=ctx.images[idx], labels=ctx.labels[idx])
            tuned.append(finetune(pipe, sub, recipe.finetune, unet=net, desc=f"aptp: fine-tune expert {k}"))
    share = route(pipe, ctx.calib)
    shares = [float((share == k).float().mean()) for k in range(K)]
    avg = sum(s * rec["macs"] for s, rec in zip(shares, records))
    largest = max(range(K), key=lambda k: records[k]["macs"])
    pipe.unet = experts[largest]
    rows = {"macs_dense": macs_dense, "macs": avg, "macs_removed": 1 - avg / macs_dense,
            "macs_largest_expert": records[largest]["macs"], "unet": f"expert {largest} (the largest)",
            "experts": [{"macs": rec["macs"], "params": rec["params"], "widths": rec["widths"], "share": s}
                        for rec, s in zip(records, shares)],
            "expected_macs_first": first, "expected_macs_last": last, "target": target,
            "train": res.summary(), "resource_last": trace["resource"][-1] if trace["resource"] else None}
    if ctx.labels is not None:
        classes = ctx.labels.unique()
        rows["routing"] = {str(int(c)): int(k) for c, k in zip(classes, route(pipe, classes))}
    if tuned:
        rows["finetune"] = tuned
    return rows


# -- files (called by pipeline.load / pipeline.save) ------------------------------------------------------

def save_extras(pipe: Pipeline, tmp) -> None:
    """Write APTP's experts (``experts/<k>/``, stock diffusers folders) and router (``router/``: config.json
    with the codes, model.safetensors)."""
    st = pipe.extras.get("aptp")
    if not st:
        return
    from safetensors.torch import save_file

    root = Path(tmp)
    for k, net in enumerate(st["experts"]):
        net.save_pretrained(root / EXPERTS / str(k), safe_serialization=True)
    (root / ROUTER).mkdir(parents=True, exist_ok=True)
    router = st["router"]
    save_file({k: v.detach().contiguous() for k, v in router.state_dict().items()},
              str(root / ROUTER / "model.safetensors"))
    cfg = {"router": router.config, "codes": st["codes"], "experts": len(st["experts"])}
    (root / ROUTER / "config.json").write_text(json.dumps(cfg, indent=2))
    return


def load_extras(root, pipe: Pipeline) -> None:
    """Read what :func:`save_extras` wrote into ``pipe.extras["aptp"]`` (nothing when there is no router)."""
    root = Path(root)
    cfg_path = root / ROUTER / "config.json"
    if not cfg_path.is_file():
        return
    from safetensors.torch import load_file

    from prunekit.diffusion.pipeline import unet_class

    try:
        cfg = json.loads(cfg_path.read_text())
        rcfg, n = cfg["router"], int(cfg["experts"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise PruneError(f"{cfg_path} is not an APTP router config.") from None
    weights = root / ROUTER / "model.safetensors"
    if not weights.is_file():
        raise PruneError(f"{root / ROUTER} has no model.safetensors; prunekit never unpickles weights.")
    router = Router(**rcfg)
    router.load_state_dict(load_file(str(weights)))
    cls = unet_class(root)
    experts = []
    for k in range(n):
        d = root / EXPERTS / str(k)
        if not any(d.glob("*.safetensors")):
            raise PruneError(f"{d} has no safetensors weights; the APTP expert {k} is missing.")
        experts.append(cls.from_pretrained(d, use_safetensors=True, trust_remote_code=False).eval())
    pipe.extras["aptp"] = {"router": router.eval(), "experts": experts, "codes": cfg.get("codes", [])}
    return


def routed_macs(pipe: Pipeline, cond: Condition) -> float:
    """The average MACs of one UNet call under the routing of ``cond``."""
    st = _state(pipe)
    r = route(pipe, cond)
    macs = [count_macs(pipe, unet=e) for e in st["experts"]]
    return float(sum(macs[int(k)] for k in r)) / max(1, len(r))


__all__ = [
    "AptpOptions",
    "Router",
    "load_extras",
    "route",
    "routed_macs",
    "sample_routed",
    "save_extras",
    "sinkhorn",
]

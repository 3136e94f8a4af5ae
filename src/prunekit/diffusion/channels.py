"""Structured channel pruning of a diffusion UNet into a *stock* diffusers UNet (method ``channels``).

Why stock: a pruned UNet that only prunekit can rebuild is of little use; this one is saved as a plain
``UNet2DConditionModel`` / ``UNet2DModel`` config (smaller ``block_out_channels``) that ``from_pretrained`` loads
anywhere. A stock config has one width per resolution level, so the plan is per level:

* **Levels, not layers.** Level ``i`` is everything of width ``block_out_channels[i]``: its residual stream (down
  and up blocks, the down/up-sampling convolutions, for the last level the mid block) and, inside every block, the
  ResNet's hidden channels, the transformer's hidden width, the attention heads' dimensions and the feed-forward
  width (4x). All of them shrink to the level's new width, because that is what the stock config builds.
* **Which channels.** The residual stream of a level keeps the same channel indices in its down and up blocks
  (:func:`shrink` takes ``level -> kept indices``). Its importance is the L1 magnitude of the *coupled group* that
  Torch-Pruning's ``DependencyGraph`` finds for each stream (every producer's rows, every consumer's columns, the
  norms' affine entries, the skip concatenations' columns at their offsets), summed over the level's streams
  (:func:`level_importance`; ``criterion: taylor`` uses |weight x gradient| of the denoising loss instead). The
  hidden channels inside each block are chosen the same way from their own groups (the ResNet's ``conv1``, the
  transformer's ``proj_in``, each attention's ``to_q``, each feed-forward's first projection).
* **GroupNorm.** Kept counts are multiples of ``norm_num_groups`` (and of the attention head count, which a stock
  config fixes per level), and the kept channels are spread evenly over the dense model's groups (the same
  number from each) so that each pruned group consists of the survivors of one dense group: the statistics a
  pruned GroupNorm computes are those of the dense one restricted to the kept channels, which is what makes
  removal exactly "zero the channels, normalise over the survivors" (the test proves it). Widths asked for
  explicitly that break this are refused; widths from the MAC search are always allowed multiples.
* **Coupled levels.** Where the dense model adds a level's input to its output without a 1x1 shortcut (the first
  ResNet of a level as wide as the level before it), both levels are one residual stream: they share width and
  kept indices. Conversely, levels of different dense width keep different widths, because a stock ResNet has a
  shortcut convolution exactly when its widths differ.
* **Attention.** Head counts stay (``attention_head_dim`` is the head count in ``UNet2DConditionModel``), so each
  head keeps the same number of its dimensions; the queries are rescaled by ``sqrt(d_new / d_old)`` so that the
  softmax temperature ``1/sqrt(d)`` of the pruned head equals the dense one's (``UNet2DModel``'s fixed head
  dimension removes whole heads instead, no rescale). ``cross_attention_dim`` stays: the text encoder is not
  touched.
* **Level 0 and the time encoding.** In stock diffusers the sinusoidal time projection has
  ``block_out_channels[0]`` dimensions, so narrowing level 0 changes the time encoding itself (other frequencies,
  not a subset). By default (``levels``: every level but 0) level 0 stays whole: it is the full-resolution level,
  holds the image detail and is the only one whose pruning is not exact. When level 0 is included, the time
  embedding width is kept (``time_embedding_dim`` written into the config) and its first linear layer is refit by
  least squares over every training timestep to reproduce the dense embedding from the shorter encoding; the
  fit's relative error is reported.

The per-level widths that remove ``recipe.ratio`` of the UNet's MACs come from an exhaustive search over the
allowed multiples: MACs are a quadratic polynomial of the level widths, fitted exactly from a few shape-only
(meta-device) builds (:class:`MacModel`), so thousands of candidates cost nothing. Among the candidates within
budget the largest is taken (ties within 1%: the one that keeps the most importance).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.core.config import Config
from prunekit.core.progress import say
from prunekit.diffusion.methods import METHODS, check_ratio
from prunekit.diffusion.pipeline import Pipeline, count_macs
from prunekit.errors import PruneError
from prunekit.vision.channels import _tp

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


class ChannelOptions(Config):
    what = "channels option"

    levels: list[int] | None = None  # levels that may shrink; None = every level but 0 (see the module docstring)
    widths: list[int] | None = None  # explicit per-level widths instead of the MAC search
    criterion: str = "l1"  # l1 | taylor
    taylor_batches: int = 4  # denoising-loss batches for criterion taylor
    batch_size: int = 16


# -- the layout of a UNet -----------------------------------------------------------------------------------

def _cfg(unet) -> dict:
    """A deep copy of the UNet's config (a loaded config holds lists that editing would change in place)."""
    import copy

    return copy.deepcopy(dict(unet.config))


def _check_supported(unet: nn.Module) -> None:
    c = _cfg(unet)
    name = type(unet).__name__
    if name not in ("UNet2DConditionModel", "UNet2DModel"):
        raise PruneError(f"Channel pruning reads UNet2DConditionModel or UNet2DModel, not {name}.")
    bad = [t for t in c["down_block_types"] if t not in DOWN_BLOCKS] + \
          [t for t in c["up_block_types"] if t not in UP_BLOCKS]
    if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in MID_BLOCKS + (None,):
        bad.append(c.get("mid_block_type"))
    if bad:
        raise PruneError(f"Channel pruning does not know the block type {bad[0]}; it reads "
                         f"{', '.join(DOWN_BLOCKS + UP_BLOCKS + MID_BLOCKS)}.")
    if c.get("resnet_time_scale_shift", "default") != "default":
        raise PruneError("Channel pruning needs resnet_time_scale_shift 'default'.")
    for key in ("addition_embed_type", "encoder_hid_dim_type", "class_embed_type"):
        if c.get(key) not in (None,):
            raise PruneError(f"Channel pruning does not handle a UNet with {key} {c[key]!r}.")
    if c.get("dual_cross_attention"):
        raise PruneError("Channel pruning does not handle dual cross-attention.")
    if c.get("downsample_type", "conv") != "conv" or c.get("upsample_type", "conv") != "conv":
        raise PruneError("Channel pruning needs convolution down/up-samplers (downsample_type and upsample_type conv).")


def widths_of(unet: nn.Module) -> list[int]:
    return list(unet.config.block_out_channels)


def _heads(unet: nn.Module, level: int) -> int | None:
    """The head count a stock config fixes at ``level`` (UNet2DConditionModel), or None."""
    c = _cfg(unet)
    if type(unet).__name__ != "UNet2DConditionModel":
        return None
    h = c.get("num_attention_heads") or c.get("attention_head_dim")
    return h[level] if isinstance(h, (list, tuple)) else h


def units(unet: nn.Module) -> list[int]:
    """Per level, the multiple every kept width must be: ``norm_num_groups`` and the stock head constraint."""
    c = _cfg(unet)
    g = c["norm_num_groups"]
    out = []
    for i in range(len(c["block_out_channels"])):
        u = g
        if type(unet).__name__ == "UNet2DConditionModel":
            u = math.lcm(u, _heads(unet, i))
        elif c.get("attention_head_dim") is not None:
            attn = "Attn" in c["down_block_types"][i] or (i == len(c["block_out_channels"]) - 1 and c.get("add_attention", True))
            if attn:
                u = math.lcm(u, c["attention_head_dim"])
        out.append(u)
    return out


def tied_levels(unet: nn.Module) -> list[list[int]]:
    """Groups of levels that are one residual stream (an identity shortcut across a level change)."""
    n = len(widths_of(unet))
    groups = [[0]]
    for i in range(1, n):
        r = unet.down_blocks[i].resnets[0]
        if getattr(r, "conv_shortcut", None) is None:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def check_widths(unet: nn.Module, widths: list[int]) -> None:
    """One sentence when ``widths`` cannot be a stock config carrying this UNet's weights."""
    dense, u, G = widths_of(unet), units(unet), _cfg(unet)["norm_num_groups"]
    if len(widths) != len(dense):
        raise PruneError(f"Give one width per level ({len(dense)}), not {len(widths)}.")
    for i, (w, d, k) in enumerate(zip(widths, dense, u)):
        if not 0 < w <= d:
            raise PruneError(f"The width of level {i} must be in 1..{d} (its dense width); got {w}.")
        if w % G:
            raise PruneError(f"The width of level {i} ({w}) must be a multiple of norm_num_groups {G} so that every "
                             "GroupNorm keeps whole groups.")
        if w % k:
            h = _heads(unet, i)
            raise PruneError(f"The width of level {i} ({w}) must be a multiple of {k}: {G} groups and "
                             f"{h or _cfg(unet).get('attention_head_dim')} attention heads.")
    for g in tied_levels(unet):
        if len({widths[i] for i in g}) > 1:
            raise PruneError(f"Levels {g} are one residual stream (an identity shortcut joins them) and must keep "
                             "the same width.")
    for i in range(1, len(dense)):
        if dense[i - 1] != dense[i] and widths[i - 1] == widths[i] and \
                getattr(unet.down_blocks[i].resnets[0], "conv_shortcut", None) is not None:
            raise PruneError(f"Levels {i - 1} and {i} must keep different widths: a stock ResNet has a shortcut "
                             "convolution only between different widths, and the dense one has one there.")


def _pattern_ok(unet: nn.Module, widths: list[int]) -> bool:
    """Tied levels equal, and a ResNet shortcut convolution exactly where the dense model has one."""
    if any(len({widths[i] for i in g}) > 1 for g in tied_levels(unet)):
        return False
    return all(not (widths[i - 1] == widths[i] and getattr(unet.down_blocks[i].resnets[0], "conv_shortcut", None)
                    is not None) for i in range(1, len(widths)))


def stock_config(unet: nn.Module, widths: list[int]) -> dict:
    """The stock config of ``unet`` with per-level ``widths`` (the time embedding width kept)."""
    c = {k: v for k, v in _cfg(unet).items() if not k.startswith("_")}
    c["block_out_channels"] = list(widths)
    if widths[0] != widths_of(unet)[0]:
        if c.get("time_embedding_type", "positional") != "positional":
            raise PruneError("Level 0 of a UNet with Fourier time features cannot shrink; leave it out of levels.")
        c["time_embedding_dim"] = unet.time_embedding.linear_2.out_features
    return c


def build_like(unet: nn.Module, widths: list[int], device=None) -> nn.Module:
    cls = type(unet)
    cfg = stock_config(unet, widths)
    if device is not None:
        with torch.device(device):
            return cls.from_config(cfg)
    return cls.from_config(cfg)


# -- streams: who produces and consumes what --------------------------------------------------------------

def _walk(unet: nn.Module):
    """The UNet as a list of steps ``(kind, name, in_spec, level)``; a spec is ``("L", i)`` (level i's stream),
    ``("cat", a, b)`` (a skip concatenation) or None (not pruned: the image channels)."""
    L = len(widths_of(unet))
    steps = [("conv", "conv_in", None, 0)]
    cur = ("L", 0)
    skips = [cur]

    def attn_kind(m):
        return "transformer" if type(m).__name__ == "Transformer2DModel" else "attention"

    for i, blk in enumerate(unet.down_blocks):
        atts = getattr(blk, "attentions", None) or []
        for j, _ in enumerate(blk.resnets):
            steps.append(("resnet", f"down_blocks.{i}.resnets.{j}", cur, i))
            cur = ("L", i)
            if j < len(atts) and atts[j] is not None:
                steps.append((attn_kind(atts[j]), f"down_blocks.{i}.attentions.{j}", cur, i))
            skips.append(cur)
        if getattr(blk, "downsamplers", None):
            steps.append(("conv", f"down_blocks.{i}.downsamplers.0.conv", cur, i))
            skips.append(cur)
    mid = unet.mid_block
    if mid is not None:
        atts = getattr(mid, "attentions", None) or []
        steps.append(("resnet", "mid_block.resnets.0", cur, L - 1))
        for j in range(1, len(mid.resnets)):
            if j - 1 < len(atts) and atts[j - 1] is not None:
                steps.append((attn_kind(atts[j - 1]), f"mid_block.attentions.{j - 1}", cur, L - 1))
            steps.append(("resnet", f"mid_block.resnets.{j}", cur, L - 1))
    for k, blk in enumerate(unet.up_blocks):
        i = L - 1 - k
        atts = getattr(blk, "attentions", None) or []
        for j, _ in enumerate(blk.resnets):
            skip = skips.pop()
            steps.append(("resnet", f"up_blocks.{k}.resnets.{j}", ("cat", cur, skip), i))
            cur = ("L", i)
            if j < len(atts) and atts[j] is not None:
                steps.append((attn_kind(atts[j]), f"up_blocks.{k}.attentions.{j}", cur, i))
        if getattr(blk, "upsamplers", None):
            steps.append(("conv", f"up_blocks.{k}.upsamplers.0.conv", cur, i))
    if unet.conv_norm_out is not None:
        steps.append(("norm", "conv_norm_out", cur, 0))
    steps.append(("conv", "conv_out", cur, None))
    return steps


def _resolve(spec, keep: dict[int, torch.Tensor], dense: list[int]):
    """(kept indices, dense width) of a spec."""
    if spec is None:
        return None, None
    if spec[0] == "L":
        return keep[spec[1]], dense[spec[1]]
    a, da = _resolve(spec[1], keep, dense)
    b, db = _resolve(spec[2], keep, dense)
    return torch.cat([a, b + da]), da + db


# -- importance through the dependency graph ------------------------------------------------------------

def example_inputs(unet: nn.Module, batch: int = 1) -> dict:
    c = unet.config
    s = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    kw = {"sample": torch.zeros(batch, c.in_channels, s, s), "timestep": torch.tensor([10] * batch)}
    if getattr(c, "cross_attention_dim", None) is not None:
        d = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
        kw["encoder_hidden_states"] = torch.zeros(batch, 4, d)
    if getattr(unet, "class_embedding", None) is not None and getattr(c, "num_class_embeds", None):
        kw["class_labels"] = torch.zeros(batch, dtype=torch.long)
    return kw


def _roots(unet: nn.Module):
    """Root module names of every stream: ``("L", level, name)`` for residual-stream producers and
    ``("in", name)`` for the hidden channels inside a block."""
    out = []
    for kind, name, _, level in _walk(unet):
        if kind == "conv" and level is not None:
            out.append(("L", level, name))
        elif kind == "resnet":
            out.append(("L", level, name + ".conv2"))
            out.append(("in", name + ".conv1"))
        elif kind == "transformer":
            t = unet.get_submodule(name)
            out.append(("L", level, name + ".proj_out"))
            out.append(("in", name + ".proj_in"))
            for b, tb in enumerate(t.transformer_blocks):
                for a in ("attn1", "attn2"):
                    if getattr(tb, a, None) is not None:
                        out.append(("in", f"{name}.transformer_blocks.{b}.{a}.to_q"))
                out.append(("in", f"{name}.transformer_blocks.{b}.ff.net.0.proj"))
        elif kind == "attention":
            out.append(("L", level, name + ".to_out.0"))
            out.append(("in", name + ".to_q"))
    return out


def _taylor_grads(unet, pipe: Pipeline, ctx, batches: int, batch_size: int) -> dict:
    """Gradients of the denoising loss summed over ``batches`` training batches (core.gradients.gradient_pass)."""
    from prunekit.core.gradients import gradient_pass
    from prunekit.diffusion.methods import training_batches
    from prunekit.diffusion.pipeline import denoise_loss

    g = torch.Generator().manual_seed(ctx.seed + 7)
    params = list(unet.parameters())
    acc = [torch.zeros_like(p) for p in params]

    def loss_fn(model, batch):
        x0, y = batch
        with torch.no_grad():
            cond = pipe.condition(y, guidance=False)
        return denoise_loss(pipe, x0, cond, generator=g, unet=model)[0]

    def accumulate(i, p, grad):
        acc[i] += grad

    gradient_pass(unet, params, training_batches(ctx, pipe, batches, batch_size, g), loss_fn, accumulate)
    return dict(zip(params, acc))


def importances(unet: nn.Module, criterion: str = "l1", grads: dict | None = None) -> dict:
    """Channel importance of every stream from its coupled group on Torch-Pruning's dependency graph:
    ``{"levels": {level: scores}, "inner": {root module name: scores}}``. Levels joined by an identity shortcut
    get the same (summed) scores. ``criterion``: ``l1`` (sum of |w| over the group) or ``taylor`` (sum of
    |w x grad|; ``grads`` maps parameters to their gradients)."""
    tp = _tp()
    _check_supported(unet)
    if criterion not in ("l1", "taylor"):
        raise PruneError(f"Unknown channel criterion {criterion!r}; choose l1 or taylor.")
    if criterion == "taylor" and grads is None:
        raise PruneError("Channel criterion taylor needs training images for its gradients.")
    types = [nn.modules.conv._ConvNd, nn.Linear, nn.GroupNorm, nn.LayerNorm]
    if criterion == "l1":
        imp = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None, target_types=types)
    else:
        imp = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, target_types=types)
    was = unet.training
    unet.eval()
    saved = {}
    if grads is not None:
        for p, gr in grads.items():
            saved[p] = p.grad
            p.grad = gr
    try:
        with torch.enable_grad():  # the graph is traced through autograd
            dg = tp.DependencyGraph().build_dependency(unet, example_inputs=example_inputs(unet),
                                                       output_transform=lambda o: o.sample)
        mods = dict(unet.named_modules())
        dense = widths_of(unet)
        levels = {i: torch.zeros(d) for i, d in enumerate(dense)}
        inner, seen = {}, set()
        for r in _roots(unet):
            mod = mods[r[-1]]
            pr = dg.get_pruner_of_module(mod)
            n = pr.get_out_channels(mod)
            group = dg.get_pruning_group(mod, pr.prune_out_channels, list(range(n)))
            with torch.no_grad():
                s = imp(group)
            s = torch.zeros(n) if s is None else s.detach().float().abs()
            if r[0] == "L":
                sig = frozenset(id(it.dep.target.module) for it in group
                                if dg.is_out_channel_pruning_fn(it.dep.handler))
                if sig in seen:  # the same coupled stream reached from another producer
                    continue
                seen.add(sig)
                levels[r[1]] += s
            else:
                inner[r[1]] = s
    finally:
        for p, gr in saved.items():
            p.grad = gr
        unet.train(was)
    for g in tied_levels(unet):
        tot = sum(levels[i] for i in g)
        for i in g:
            levels[i] = tot.clone()
    return {"levels": levels, "inner": inner}


def level_importance(unet: nn.Module, criterion: str = "l1", grads: dict | None = None) -> dict[int, torch.Tensor]:
    """Per level, the importance of each residual-stream channel (higher = keep), summed over the level's
    down and up streams (see :func:`importances`)."""
    return importances(unet, criterion, grads)["levels"]


def select(scores: torch.Tensor, n: int, blocks: int = 1) -> torch.Tensor:
    """The sorted indices of the ``n`` highest ``scores``, the same number from each of ``blocks`` contiguous
    equal blocks (GroupNorm groups, attention heads) when ``n`` divides evenly; ties go to the lower index."""
    c = len(scores)
    if n >= c:
        return torch.arange(c)
    if blocks > 1 and c % blocks == 0 and n % blocks == 0:
        size, per = c // blocks, n // blocks
        out = [b * size + _top(scores[b * size:(b + 1) * size], per) for b in range(blocks)]
        return torch.cat(out).sort().values
    return _top(scores, n).sort().values


def _top(s: torch.Tensor, n: int) -> torch.Tensor:
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    return torch.tensor(order[:n], dtype=torch.long)


# -- the plan and the copy ------------------------------------------------------------------------------

@dataclass
class Plan:
    """Every tensor slice of a shrink: ``lin[name] = (kept output rows or None, kept input columns or None)`` for
    convolutions and linear layers (a GEGLU projection's rows cover both halves), ``norm[name] = kept channels``
    for GroupNorm / LayerNorm, ``qscale[name]`` the factor folded into a query projection, ``keep`` the
    residual-stream indices per level. What the equivalence test zeroes in the dense model."""

    widths: list[int]
    keep: dict[int, torch.Tensor]
    lin: dict[str, tuple] = field(default_factory=dict)
    norm: dict[str, torch.Tensor] = field(default_factory=dict)
    qscale: dict[str, float] = field(default_factory=dict)
    time_refit_error: float | None = None


def _attn_plan(plan: Plan, name: str, src, dst, q_in, kv_in, stream_out, scores):
    H, inner = src.heads, src.to_q.out_features
    H2, inner2 = dst.heads, dst.to_q.out_features
    d, d2 = inner // H, inner2 // H2
    if H2 == H:
        q = select(scores, inner2, blocks=H)
    elif d2 == d:
        per_head = scores.reshape(H, d).sum(1)
        heads = _top(per_head, H2).sort().values
        q = (heads[:, None] * d + torch.arange(d)[None]).reshape(-1)
    else:  # pragma: no cover - stock configs change either the head count or the head size
        raise PruneError(f"Attention {name} changes both its head count and head size; cannot shrink it.")
    plan.lin[name + ".to_q"] = (q, q_in)
    plan.lin[name + ".to_k"] = (q, kv_in)
    plan.lin[name + ".to_v"] = (q, kv_in)
    plan.lin[name + ".to_out.0"] = (stream_out, q)
    if d2 != d:
        plan.qscale[name + ".to_q"] = math.sqrt(d2 / d)
    if getattr(src, "group_norm", None) is not None:
        plan.norm[name + ".group_norm"] = q_in
    for extra in ("norm_q", "norm_k", "spatial_norm", "norm_cross"):
        if getattr(src, extra, None) is not None:
            raise PruneError(f"Attention {name} has {extra}; channel pruning does not handle it.")


def make_plan(unet: nn.Module, new: nn.Module, keep: dict[int, torch.Tensor], scores: dict) -> Plan:
    """The slices that turn ``unet`` into ``new`` (a stock UNet of the kept widths): residual streams from
    ``keep``, each block's hidden channels from ``scores["inner"]`` (GroupNorm- and head-balanced)."""
    dense = widths_of(unet)
    widths = widths_of(new)
    plan = Plan(widths, keep)
    inner = scores["inner"]
    for kind, name, spec, level in _walk(unet):
        src, dst = unet.get_submodule(name), new.get_submodule(name)
        idx_in, _ = _resolve(spec, keep, dense)
        out = keep[level] if level is not None else None
        if kind == "conv":
            plan.lin[name] = (out, idx_in)
        elif kind == "norm":
            plan.norm[name] = idx_in
        elif kind == "resnet":
            h = select(inner[name + ".conv1"], dst.conv1.out_channels, blocks=src.norm2.num_groups)
            plan.norm[name + ".norm1"] = idx_in
            plan.lin[name + ".conv1"] = (h, idx_in)
            if src.time_emb_proj is not None:
                plan.lin[name + ".time_emb_proj"] = (h, None)
            plan.norm[name + ".norm2"] = h
            plan.lin[name + ".conv2"] = (out, h)
            has, will = src.conv_shortcut is not None, getattr(dst, "conv_shortcut", None) is not None
            if has != will:  # check_widths prevents it
                raise PruneError(f"{name}: the pruned widths change whether it has a shortcut convolution.")
            if has:
                plan.lin[name + ".conv_shortcut"] = (out, idx_in)
        elif kind == "transformer":
            t = select(inner[name + ".proj_in"], dst.proj_in.out_features if isinstance(dst.proj_in, nn.Linear)
                       else dst.proj_in.out_channels)
            plan.norm[name + ".norm"] = out
            plan.lin[name + ".proj_in"] = (t, out)
            plan.lin[name + ".proj_out"] = (out, t)
            for b, tb in enumerate(src.transformer_blocks):
                pre = f"{name}.transformer_blocks.{b}"
                dtb = dst.transformer_blocks[b]
                for nn_ in ("norm1", "norm2", "norm3"):
                    m = getattr(tb, nn_, None)
                    if m is None:
                        continue
                    if not isinstance(m, nn.LayerNorm):
                        raise PruneError(f"{pre}.{nn_} is a {type(m).__name__}; channel pruning reads LayerNorm.")
                    plan.norm[f"{pre}.{nn_}"] = t
                for a in ("attn1", "attn2"):
                    at = getattr(tb, a, None)
                    if at is None:
                        continue
                    kv = None if at.is_cross_attention else t  # keys and values from the text: not pruned
                    _attn_plan(plan, f"{pre}.{a}", at, getattr(dtb, a), t, kv, t, inner[f"{pre}.{a}.to_q"])
                proj = tb.ff.net[0].proj
                F = tb.ff.net[2].in_features
                F2 = dtb.ff.net[2].in_features
                s = inner[pre + ".ff.net.0.proj"]
                if proj.out_features == 2 * F:
                    f = select(s[:F] + s[F:], F2)
                    rows = torch.cat([f, f + F])
                else:
                    f = select(s, F2)
                    rows = f
                plan.lin[pre + ".ff.net.0.proj"] = (rows, t)
                plan.lin[pre + ".ff.net.2"] = (t, f)
        elif kind == "attention":
            _attn_plan(plan, name, src, dst, out, out, out, inner[name + ".to_q"])
    return plan


@torch.no_grad()
def _refit_time(unet: nn.Module, new: nn.Module) -> float:
    """Least-squares refit of the new time embedding's first layer on the shorter sinusoidal encoding, over every
    training timestep; returns the relative error of the embedding."""
    t = torch.arange(1000)
    target = unet.time_embedding.linear_1(unet.time_proj(t).float())
    feats = new.time_proj(t).float()
    a = torch.cat([feats, torch.ones(len(t), 1)], 1).double()
    sol = torch.linalg.lstsq(a, target.double()).solution
    new.time_embedding.linear_1.weight.copy_(sol[:-1].T.float())
    new.time_embedding.linear_1.bias.copy_(sol[-1].float())
    fit = (a @ sol).float()
    return float((fit - target).norm() / target.norm().clamp_min(1e-12))


@torch.no_grad()
def apply_plan(unet: nn.Module, new: nn.Module, plan: Plan) -> nn.Module:
    """Copy ``unet``'s kept weights into ``new`` following ``plan``; every other tensor must have equal shapes."""
    done = set()
    for name, (o, i) in plan.lin.items():
        s, d = unet.get_submodule(name), new.get_submodule(name)
        w = s.weight
        if o is not None:
            w = w.index_select(0, o)
        if i is not None:
            w = w.index_select(1, i)
        w = w * plan.qscale.get(name, 1.0)
        if w.shape != d.weight.shape:
            raise RuntimeError(f"{name}: plan gives {tuple(w.shape)}, the stock model has {tuple(d.weight.shape)}")
        d.weight.copy_(w)
        done.add(name + ".weight")
        if s.bias is not None:
            b = s.bias if o is None else s.bias.index_select(0, o)
            d.bias.copy_(b * plan.qscale.get(name, 1.0))
            done.add(name + ".bias")
    for name, k in plan.norm.items():
        s, d = unet.get_submodule(name), new.get_submodule(name)
        for attr in ("weight", "bias"):
            if getattr(s, attr, None) is not None:
                getattr(d, attr).copy_(getattr(s, attr).index_select(0, k))
                done.add(f"{name}.{attr}")
    if new.time_embedding.linear_1.in_features != unet.time_embedding.linear_1.in_features:
        plan.time_refit_error = _refit_time(unet, new)
        done.update({"time_embedding.linear_1.weight", "time_embedding.linear_1.bias"})
    src = unet.state_dict()
    for k, v in new.state_dict().items():
        if k in done:
            continue
        if src[k].shape != v.shape:
            raise RuntimeError(f"{k} is not covered by the plan ({tuple(src[k].shape)} -> {tuple(v.shape)})")
        v.copy_(src[k])
    return new


def _keep_from(unet, keep: dict, widths: list[int] | None = None) -> tuple[dict[int, torch.Tensor], list[int]]:
    dense = widths_of(unet)
    out = {}
    for i, d in enumerate(dense):
        k = keep.get(i) if keep is not None else None
        if k is None:
            out[i] = torch.arange(d)
            continue
        k = torch.as_tensor(k, dtype=torch.long).unique(sorted=True)
        if len(k) == 0 or int(k.min()) < 0 or int(k.max()) >= d:
            raise PruneError(f"The kept channels of level {i} must be indices in 0..{d - 1}, at least one.")
        out[i] = k
    for g in tied_levels(unet):
        ref = out[g[0]]
        for i in g[1:]:
            if keep is not None and (g[0] in keep or i in keep) and not torch.equal(out[i], ref):
                raise PruneError(f"Levels {g} are one residual stream and must keep the same channels.")
    w = [len(out[i]) for i in range(len(dense))]
    if widths is not None and w != list(widths):
        raise RuntimeError("widths and kept indices disagree")
    return out, w


def shrink(unet: nn.Module, keep: dict[int, torch.Tensor], scores: dict | None = None,
           return_plan: bool = False):
    """A stock UNet of the same class keeping, per level, the residual-stream channels ``keep[level]`` (dense
    indices; the same in the down and up blocks; a level not in ``keep`` stays whole). The hidden channels inside
    each block are chosen by ``scores`` (default: L1 of their coupled groups, :func:`importances`). Widths must
    pass :func:`check_widths`. ``return_plan``: also return the :class:`Plan`."""
    _check_supported(unet)
    k, widths = _keep_from(unet, {int(a): b for a, b in keep.items()})
    check_widths(unet, widths)
    if scores is None:
        scores = importances(unet)
    new = build_like(unet, widths)
    dtype = next(unet.parameters()).dtype
    if dtype != torch.float32:
        new = new.to(dtype)
    plan = make_plan(unet, new, k, scores)
    apply_plan(unet, new, plan)
    new.eval()
    return (new, plan) if return_plan else new


def keep_for(unet: nn.Module, widths: list[int], level_scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per level, the ``widths[i]`` most important residual channels, the same number per GroupNorm group."""
    G = _cfg(unet)["norm_num_groups"]
    return {i: select(level_scores[i], w, blocks=G) for i, w in enumerate(widths)}


# -- MACs as a function of the widths ---------------------------------------------------------------------

class MacModel:
    """The UNet's MACs (``pipeline.count_macs``) as an exact quadratic polynomial of the free tie-groups' widths,
    fitted from shape-only (meta-device) builds. ``macs(widths)`` takes per-level widths (floats allowed: the
    expected widths of soft masks, differentiable)."""

    def __init__(self, pipe: Pipeline, unet: nn.Module | None = None, levels: list[int] | None = None):
        self.unet = unet if unet is not None else pipe.unet
        self.dense = widths_of(self.unet)
        self.units = units(self.unet)
        self.groups = [g for g in tied_levels(self.unet) if levels is None or any(i in levels for i in g)]
        self.dense_macs = count_macs(pipe, unet=self.unet)
        self.pipe = pipe
        n = len(self.groups)
        self.pairs = [(a, b) for a in range(n) for b in range(a, n)]
        need = 1 + n + len(self.pairs)
        # sample points: any widths that keep the shortcut pattern (norms and heads do not count MACs, so the
        # fitting builds use 1 group and 1-dimensional heads and need no allowed multiples)
        grids = [sorted({max(1, round(self.dense[g[0]] * f)) for f in (0.2, 0.4, 0.6, 0.8, 1.0)} |
                        {self.dense[g[0]] - 1} - {0}) for g in self.groups]
        gen = torch.Generator().manual_seed(0)
        xs, ys, tried = [], [], set()
        points = [tuple(gr[-1] for gr in grids)] + [
            tuple(gr[int(torch.randint(len(gr), (1,), generator=gen))] for gr in grids) for _ in range(60 * need)]
        for p in points:
            if p in tried or len(xs) >= need + 3:
                continue
            tried.add(p)
            w = self._widths(p)
            if not _pattern_ok(self.unet, w):
                continue
            xs.append(p)
            ys.append(self._count(w, loose=True))
        a = torch.stack([self._features(torch.tensor(p, dtype=torch.float64)) for p in xs])
        self.coef = torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64)[:, None]).solution[:, 0]
        self.max_fit_error = float(((a @ self.coef) - torch.tensor(ys, dtype=torch.float64)).abs().max())

    def options(self, group: list[int]) -> list[int]:
        u = math.lcm(*[self.units[i] for i in group])
        d = self.dense[group[0]]
        return list(range(u, d + 1, u)) or [d]

    def _widths(self, point) -> list[int]:
        w = list(self.dense)
        for g, x in zip(self.groups, point):
            for i in g:
                w[i] = x
        return w

    def _count(self, widths: list[int], loose: bool = False) -> int:
        with torch.device("meta"):
            if loose:
                cfg = stock_config(self.unet, widths)
                cfg["norm_num_groups"] = 1
                if cfg.get("attention_head_dim") is not None:
                    cfg["attention_head_dim"] = 1
                if cfg.get("num_attention_heads") is not None:
                    cfg["num_attention_heads"] = 1
                if "attn_norm_num_groups" in cfg:
                    cfg["attn_norm_num_groups"] = None
                net = type(self.unet).from_config(cfg)
            else:
                net = build_like(self.unet, widths)
            return count_macs(self.pipe, unet=net)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        one = torch.ones((), dtype=x.dtype)
        return torch.stack([one, *x, *[x[a] * x[b] for a, b in self.pairs]])

    def macs(self, widths) -> torch.Tensor:
        """MACs at per-level ``widths`` (a list or a tensor; only the free groups' entries are read)."""
        w = torch.as_tensor(widths) if not torch.is_tensor(widths) else widths
        x = torch.stack([w[g[0]] for g in self.groups]).to(self.coef.dtype)
        return self._features(x) @ self.coef

    def count(self, widths: list[int]) -> int:
        """The MACs of a stock build of ``widths`` (counted, not fitted)."""
        return self._count(list(widths))


def search_widths(pipe: Pipeline, ratio: float, levels: list[int], level_scores: dict[int, torch.Tensor],
                  model: MacModel | None = None) -> list[int]:
    """The per-level widths that remove at least ``ratio`` of the MACs and keep the most of them (ties within
    1%: the most retained importance, each level's kept share of its total weighted equally)."""
    unet = pipe.unet
    model = model or MacModel(pipe, levels=levels)
    budget = (1.0 - ratio) * model.dense_macs
    opts = [model.options(g) for g in model.groups]
    sizes = [len(o) for o in opts]
    if math.prod(sizes) > 200_000:
        raise PruneError("Too many width combinations to search; give widths explicitly or fewer levels.")
    srt = {i: level_scores[i].sort(descending=True).values.cumsum(0) for i in level_scores}
    best = []
    for p in itertools.product(*opts):
        w = model._widths(p)
        m = float(model.macs(w))
        if m > budget * (1 + 1e-9):
            continue
        try:
            check_widths(unet, w)
        except PruneError:
            continue
        kept = sum(float(srt[g[0]][w[g[0]] - 1] / srt[g[0]][-1].clamp_min(1e-12)) for g in model.groups)
        best.append((m, kept, w))
    if not best:
        smallest = model._widths([o[0] for o in opts])
        frac = 1 - float(model.macs(smallest)) / model.dense_macs
        raise PruneError(f"Removing {ratio:.0%} of the UNet MACs is out of reach with levels {levels}: the narrowest "
                         f"allowed widths remove {frac:.0%}; add levels or lower the ratio.")
    top = max(b[0] for b in best)
    near = [b for b in best if b[0] >= 0.99 * top]
    return max(near, key=lambda b: (b[1], b[0]))[2]


# -- the method --------------------------------------------------------------------------------------------

def default_levels(unet: nn.Module, levels: list[int] | None) -> list[int]:
    n = len(widths_of(unet))
    lv = list(range(1, n)) if levels is None else sorted({int(i) for i in levels})
    bad = [i for i in lv if not 0 <= i < n]
    if bad:
        raise PruneError(f"Level {bad[0]} does not exist; this UNet has levels 0..{n - 1}.")
    if not lv:
        raise PruneError("Give at least one level to prune.")
    return lv


@METHODS.register("channels", params=ChannelOptions,
                  description="structured channel pruning into a stock diffusers UNet: per-level widths that remove "
                              "the ratio of MACs, channels by coupled-group L1 (or Taylor) importance")
def run(pipe: Pipeline, recipe, opts: ChannelOptions, ctx) -> dict:
    unet = pipe.unet
    _check_supported(unet)
    macs_dense = count_macs(pipe)
    grads = None
    if opts.criterion == "taylor":
        grads = _taylor_grads(unet, pipe, ctx, opts.taylor_batches, opts.batch_size)
    scores = importances(unet, opts.criterion, grads)
    levels = default_levels(unet, opts.levels)
    if opts.widths is not None:
        widths = list(opts.widths)
        check_widths(unet, widths)
    else:
        ratio = check_ratio(recipe.ratio)
        widths = search_widths(pipe, ratio, levels, scores["levels"])
    keep = keep_for(unet, widths, scores["levels"])
    new, plan = shrink(unet, keep, scores=scores, return_plan=True)
    if widths != widths_of(unet):
        say(f"channels: level widths {widths_of(unet)} -> {widths}")
    pipe.unet = new
    macs = count_macs(pipe)
    rows = {"macs_dense": macs_dense, "macs": macs, "macs_removed": 1 - macs / macs_dense,
            "params": sum(p.numel() for p in new.parameters()), "widths": widths, "criterion": opts.criterion}
    if plan.time_refit_error is not None:
        rows["time_embedding_refit_error"] = plan.time_refit_error
        say(f"channels: level 0 shrank, so the time encoding changed; its embedding was refit "
            f"(relative error {plan.time_refit_error:.3g})")
    return rows

"""Token merging in a diffusion UNet: ToMe for Stable Diffusion (Bolya & Hoffman 2023).

Every ``BasicTransformerBlock`` of a diffusers UNet gets a forward (replaced on the instance) that, at the
resolutions allowed by ``max_downsample``, matches its input tokens once (the token family's
:func:`prunekit.tokens.merge.bipartite_soft_matching` on the block's input, cosine similarity) and merges
``ratio`` of them before self-attention (and, when asked, before cross-attention and the MLP); each sub-layer's
output is unmerged (every merged token takes its destination's value) before its residual sum, so the block's
input and output keep every token.

The destinations (set B of the matching) are one token in each ``sy`` x ``sx`` cell of the block's token grid,
the top-left one, or (``use_rand``) a random one; the rest are the sources (set A). The grid comes from the
sample size the UNet is called with (a forward pre-hook records it) and the block's token count: the block sits at
``downsample = ceil(sqrt(H W / tokens))``. The random cells of one UNet call come from a generator seeded by
``(seed, timestep)``: a run is reproducible whatever ran before it, the conditional and the unconditional call of
one step get the same destinations, and each step gets new ones.

Blocks that merge nothing (``ratio`` 0, a resolution above ``max_downsample``) run their stock forward, bit for
bit; :meth:`Handle.remove` restores the UNet exactly. The merged sub-layers are still the UNet's own ``attn1`` /
``attn2`` / ``ff`` modules called on fewer tokens, so ``pipeline.count_macs`` measures the saving itself.

The method ``tome`` (registry :data:`prunekit.diffusion.methods.METHODS`) applies it with the recipe's ``ratio``
and keeps the settings in ``pipe.extras["tome"]`` (a plain dict), which :func:`reapply` patches again after a
load. :func:`tomesd_peer` patches a copy with the PyPI ``tomesd`` package for comparison.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from pydantic import Field
from torch import nn

from prunekit.core.config import Config
from prunekit.diffusion.methods import METHODS, check_ratio
from prunekit.errors import PruneError
from prunekit.tokens import merge as M

NORMS = ("layer_norm", "layer_norm_i2vgen", "ada_norm", "ada_norm_zero")  # BasicTransformerBlock norm types patched
SETTINGS = ("ratio", "max_downsample", "sx", "sy", "use_rand", "seed", "merge_attn", "merge_crossattn", "merge_mlp")


class TomeOptions(Config):
    """ToMe for Stable Diffusion's settings besides the ratio (the recipe's ``ratio`` = share of tokens merged)."""

    what = "tome options"

    max_downsample: int = Field(1, ge=1, description="merge in blocks downsampled at most this much (1: only the "
                                "highest resolution, as tomesd's default; 2, 4, 8: deeper ones too)")
    sx: int = Field(2, ge=1, description="destination stride along the width: one destination per sy x sx cell")
    sy: int = Field(2, ge=1, description="destination stride along the height")
    use_rand: bool = Field(True, description="a random destination in each cell (False: the top-left one)")
    merge_attn: bool = Field(True, description="merge before self-attention")
    merge_crossattn: bool = Field(False, description="merge before cross-attention")
    merge_mlp: bool = Field(False, description="merge before the MLP")


def _diffusers_block():
    from diffusers.models.attention import BasicTransformerBlock

    return BasicTransformerBlock


def destinations(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None = None):
    """The positions (row-major over an ``h`` x ``w`` grid) of sets A (sources) and B (destinations): one
    destination per full ``sy`` x ``sx`` cell, its top-left token or (``generator``) a random one; the rows and
    columns beyond the last full cell are sources. None: the grid has no full cell."""
    hs, ws = h // sy, w // sx
    if hs == 0 or ws == 0:
        return None
    if generator is None:
        pick = torch.zeros(hs, ws, dtype=torch.long)
    else:
        pick = torch.randint(sy * sx, (hs, ws), generator=generator, device=generator.device).cpu()
    rows = torch.arange(hs)[:, None] * sy + pick // sx
    cols = torch.arange(ws)[None, :] * sx + pick % sx
    b_idx = (rows * w + cols).flatten()
    is_dst = torch.zeros(h * w, dtype=torch.bool)
    is_dst[b_idx] = True
    return (~is_dst).nonzero().squeeze(1), b_idx


def _call_seed(seed: int, timestep) -> int:
    t = 0.0
    if isinstance(timestep, torch.Tensor) and timestep.numel():
        t = float(timestep.flatten()[0])
    elif isinstance(timestep, (int, float)):
        t = float(timestep)
    return (int(seed) * 1_000_003 + round(t * 1000)) % (1 << 63)


class Handle:
    """A UNet patched with ToMe: ``remove()`` restores it; ``tokens`` is the last UNet call's
    ``(tokens, tokens while merged)`` per block (equal where the block merged nothing); ``enabled = False`` runs
    every block's stock forward (A/B timing without re-patching)."""

    def __init__(self, unet: nn.Module, blocks: list[nn.Module], ratio: float, opts: TomeOptions, seed: int):
        self.unet, self.blocks, self.ratio, self.opts, self.seed = unet, blocks, float(ratio), opts, int(seed)
        self.size: tuple[int, int] | None = None  # (H, W) of the sample of the UNet call in progress
        self.generator = torch.Generator()
        self.tokens: list[tuple[int, int]] = []
        self.enabled = True
        self.active = False
        self._fixed: dict = {}  # (h, w, device) -> the top-left destinations
        self._saved: list = []
        self._hooks: list = []

    @property
    def settings(self) -> dict:
        """The arguments of :func:`apply` that rebuild this patch (a plain dict)."""
        return {"ratio": self.ratio, "seed": self.seed, **self.opts.model_dump()}

    # -- the UNet's pre-hook: the sample size and this call's generator ---------------------------------------
    def _start(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample")
        self.size = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None
        if self.opts.use_rand:
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            self.generator.manual_seed(_call_seed(self.seed, t))
        self.tokens = []

    def _split(self, h: int, w: int, device):
        o = self.opts
        if o.use_rand:
            split = destinations(h, w, o.sx, o.sy, self.generator)
            return None if split is None else (split[0].to(device), split[1].to(device))
        key = (h, w, str(device))
        if key not in self._fixed:
            split = destinations(h, w, o.sx, o.sy)
            self._fixed[key] = None if split is None else (split[0].to(device), split[1].to(device))
        return self._fixed[key]

    def matching(self, x: torch.Tensor) -> M.Merge | None:
        """The block's merge for its input ``x`` (B, N, C), or None where it merges nothing (resolution above
        ``max_downsample``, a token count that is not the sample's grid at that level, ratio 0)."""
        if not self.enabled or self.ratio <= 0 or self.size is None or x.dim() != 3:
            return None
        n = x.shape[1]
        big_h, big_w = self.size
        if n == 0 or n > big_h * big_w:
            return None
        down = math.ceil(math.sqrt((big_h * big_w) // n))
        if down > self.opts.max_downsample:
            return None
        h, w = math.ceil(big_h / down), math.ceil(big_w / down)
        r = int(n * self.ratio)
        if h * w != n or r <= 0:
            return None
        split = self._split(h, w, x.device)
        if split is None:
            return None
        return M.bipartite_soft_matching(x, r, split=split)

    # -- the patched block -------------------------------------------------------------------------------------
    def _forward(self, index: int, block, hidden_states, attention_mask=None, encoder_hidden_states=None,
                 encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                 added_cond_kwargs=None, **rest):
        args = dict(attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                    cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels,
                    added_cond_kwargs=added_cond_kwargs, **rest)
        m = None if rest else self.matching(hidden_states)
        n = hidden_states.shape[1] if hidden_states.dim() == 3 else 0
        self.tokens.append((n, n if m is None else n - m.r))
        if m is None:
            saved = self._saved[index]
            if saved is not None:
                return saved(hidden_states, **args)
            return type(block).forward(block, hidden_states, **args)
        args.pop("added_cond_kwargs")
        return merged_block(block, hidden_states, m, self.opts, **args)

    def patch(self) -> Handle:
        for i, block in enumerate(self.blocks):
            self._saved.append(block.__dict__.get("forward"))
            block.forward = functools.partial(self._forward, i, block)
        self._hooks.append(self.unet.register_forward_pre_hook(self._start, with_kwargs=True))
        self.unet._prunekit_tome = self
        self.active = True
        return self

    def remove(self) -> None:
        """Restore the UNet exactly as it was (idempotent)."""
        if not self.active:
            return
        for block, saved in zip(self.blocks, self._saved):
            if saved is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = saved
        for h in self._hooks:
            h.remove()
        self._hooks, self._saved = [], []
        if self.unet.__dict__.get("_prunekit_tome") is self:
            del self.unet.__dict__["_prunekit_tome"]
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def merged_block(block, hidden_states, m: M.Merge | None, opts: TomeOptions, attention_mask=None,
                 encoder_hidden_states=None, encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                 class_labels=None):
    """A ``BasicTransformerBlock`` forward (norm types :data:`NORMS`, as diffusers 0.42 computes them) with the
    tokens merged by ``m`` before the sub-layers ``opts`` names and unmerged after each; ``m`` None: the stock
    computation."""
    norm = block.norm_type
    rows = None if m is None else m.row_map()

    def merge(x, on: bool):
        return m.apply(x, "mean") if on else x

    def unmerge(x, on: bool):
        return M.unmerge(x, rows)[0] if on else x

    on_a = m is not None and opts.merge_attn and attention_mask is None  # a key mask would need the merged keys
    on_c = m is not None and opts.merge_crossattn
    on_m = m is not None and opts.merge_mlp

    if norm == "ada_norm":
        nh = block.norm1(hidden_states, timestep)
    elif norm == "ada_norm_zero":
        nh, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, timestep, class_labels,
                                                                   hidden_dtype=hidden_states.dtype)
    else:
        nh = block.norm1(hidden_states)
    if block.pos_embed is not None:
        nh = block.pos_embed(nh)
    kw = dict(cross_attention_kwargs) if cross_attention_kwargs is not None else {}
    gligen = kw.pop("gligen", None)

    out = block.attn1(merge(nh, on_a),
                      encoder_hidden_states=encoder_hidden_states if block.only_cross_attention else None,
                      attention_mask=attention_mask, **kw)
    if norm == "ada_norm_zero":
        out = gate_msa.unsqueeze(1) * out
    hidden_states = unmerge(out, on_a) + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    if gligen is not None:
        hidden_states = block.fuser(hidden_states, gligen["objs"])

    if block.attn2 is not None:
        nh = block.norm2(hidden_states, timestep) if norm == "ada_norm" else block.norm2(hidden_states)
        if block.pos_embed is not None:
            nh = block.pos_embed(nh)
        out = block.attn2(merge(nh, on_c), encoder_hidden_states=encoder_hidden_states,
                          attention_mask=encoder_attention_mask, **kw)
        hidden_states = unmerge(out, on_c) + hidden_states

    nh = block.norm3(hidden_states)
    if norm == "ada_norm_zero":
        nh = nh * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    if block._chunk_size is not None and not on_m:
        from diffusers.models.attention import _chunked_feed_forward

        out = _chunked_feed_forward(block.ff, nh, block._chunk_dim, block._chunk_size)
    else:  # merged tokens need no chunking (and rarely divide the chunk size)
        out = block.ff(merge(nh, on_m))
    if norm == "ada_norm_zero":
        out = gate_mlp.unsqueeze(1) * out
    hidden_states = unmerge(out, on_m) + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states


def transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    cls = _diffusers_block()
    return [m for m in unet.modules() if isinstance(m, cls)]


def apply(unet: nn.Module, ratio: float, max_downsample: int = 1, sx: int = 2, sy: int = 2, use_rand: bool = True,
          seed: int = 0, merge_attn: bool = True, merge_crossattn: bool = False, merge_mlp: bool = False) -> Handle:
    """Patch every ``BasicTransformerBlock`` of ``unet`` with ToMe for Stable Diffusion, merging ``ratio`` (in
    [0, 1)) of the tokens of each block at most ``max_downsample`` times downsampled. A UNet patched before is
    unpatched first. Returns the :class:`Handle` (``remove()`` restores the UNet)."""
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise PruneError(f"The ToMe ratio must be a number in [0, 1) (got {ratio!r}).") from None
    if not 0.0 <= ratio < 1.0:
        raise PruneError(f"The ToMe ratio must be in [0, 1) (got {ratio}).")
    opts = TomeOptions.make(max_downsample=max_downsample, sx=sx, sy=sy, use_rand=use_rand, merge_attn=merge_attn,
                            merge_crossattn=merge_crossattn, merge_mlp=merge_mlp)
    old = unet.__dict__.get("_prunekit_tome")
    if old is not None:
        old.remove()
    blocks = transformer_blocks(unet)
    if not blocks:
        raise PruneError(f"{type(unet).__name__} has no BasicTransformerBlock; ToMe merges tokens in the attention "
                         "blocks of a UNet2DConditionModel (Stable Diffusion's kind).")
    odd = sorted({b.norm_type for b in blocks if b.norm_type not in NORMS})
    if odd:
        raise PruneError(f"ToMe cannot patch transformer blocks with norm type {', '.join(odd)}; it supports "
                         f"{', '.join(NORMS)}.")
    return Handle(unet, blocks, ratio, opts, seed).patch()


def handle_of(unet: nn.Module) -> Handle | None:
    """The active ToMe patch of ``unet``, or None."""
    return unet.__dict__.get("_prunekit_tome")


def reapply(pipe) -> Handle | None:
    """Patch ``pipe.unet`` again from ``pipe.extras["tome"]`` (after a load); None when the pipeline has none."""
    s = pipe.extras.get("tome") if pipe.extras else None
    if not s:
        return None
    unknown = sorted(set(s) - set(SETTINGS))
    if unknown:
        raise PruneError(f"The saved ToMe settings have unknown fields {', '.join(unknown)}; this prunekit reads "
                         f"{', '.join(SETTINGS)}.")
    return apply(pipe.unet, **s)


@METHODS.register("tome", params=TomeOptions, training_free=True,
                  description="ToMe for Stable Diffusion: merge ratio of the tokens before each attention block's "
                  "self-attention (strided random destinations), unmerge after; no weights change")
def run(pipe, recipe, opts: TomeOptions, ctx) -> dict:
    from prunekit.diffusion.pipeline import count_macs

    ratio = check_ratio(recipe.ratio)
    dense = count_macs(pipe)
    h = apply(pipe.unet, ratio, seed=recipe.seed, **opts.model_dump())
    macs = count_macs(pipe)  # the patched forward calls the UNet's own modules on the merged tokens
    pipe.extras["tome"] = h.settings
    merging = [t for t in h.tokens if t[1] < t[0]]
    if not merging:
        h.remove()
        pipe.extras.pop("tome", None)
        raise PruneError(f"ToMe at max_downsample {opts.max_downsample} merges in none of the UNet's "
                         f"{len(h.blocks)} attention blocks (its attention starts deeper); raise max_downsample, "
                         "e.g. --options '{\"max_downsample\": 2}'.")
    ctx.log(f"tome: ratio {ratio} merges in {len(merging)} of {len(h.blocks)} attention blocks; "
            f"UNet MACs {macs / dense:.3f} of dense")
    return {"tome": h.settings, "macs": macs, "macs_dense": dense, "macs_fraction": macs / dense,
            "blocks": len(h.blocks), "merging_blocks": len(merging),
            "tokens": [list(t) for t in h.tokens]}


def tomesd_peer(unet: nn.Module, ratio: float, max_downsample: int = 1, sx: int = 2, sy: int = 2,
                use_rand: bool = True, seed: int | None = 0, merge_attn: bool = True, merge_crossattn: bool = False,
                merge_mlp: bool = False) -> nn.Module:
    """A copy of ``unet`` patched by the PyPI ``tomesd`` package (``tomesd.apply_patch``, the authors' code) with
    the same settings, for the benchmark. ``seed``: its generator (tomesd forks the global one otherwise; it is
    never re-seeded, so its destinations depend on the calls before). Note tomesd switches ``use_rand`` off for
    odd batch sizes."""
    try:
        import tomesd
    except ImportError:
        raise PruneError("The tomesd peer needs the tomesd package; run `pip install tomesd==0.1.3`.") from None
    peer = copy.deepcopy(unet)
    h = handle_of(peer)
    if h is not None:  # a copy of a UNet prunekit patched: tomesd gets the stock blocks
        h.remove()
    tomesd.apply_patch(peer, ratio=float(ratio), max_downsample=max_downsample, sx=sx, sy=sy, use_rand=use_rand,
                       merge_attn=merge_attn, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp)
    if use_rand and seed is not None:
        dev = next(peer.parameters()).device
        peer._tome_info["args"]["generator"] = torch.Generator(device=dev).manual_seed(int(seed))
    return peer

"""Block removal in the BK-SDM manner (Kim et al. 2023): fewer resnet/attention pairs per block, no attention in
a block, no mid block — every result a STOCK diffusers config, so ``UNet2DConditionModel.from_pretrained`` /
``UNet2DModel.from_pretrained`` loads it with no prunekit code.

An *operator* is one named, stock-expressible removal (:func:`candidates` lists a UNet's):

- ``mid``: the mid block (``mid_block_type: null``);
- ``mid.attention``: the mid block's attention and its second resnet (``UNetMidBlock2D`` with one resnet; for a
  ``UNet2DModel``, ``add_attention: false``);
- ``down.<i>.attention`` / ``up.<j>.attention``: every attention of one down / up block (its type becomes the
  plain ``DownBlock2D`` / ``UpBlock2D``);
- ``level.<i>.pair``: one resnet(+attention) pair of level ``i`` (``layers_per_block[i]`` - 1): the down block
  drops its last pair and the matching up block its second-to-last, whose shapes are the same as the pair that
  consumed the removed skip, so every kept weight is reused as is (needs ``layers_per_block >= 2`` there; a
  ``UNet2DModel`` has one count for all levels, so only ``UNet2DConditionModel`` takes it).

:func:`apply_ops` builds the new UNet from the edited config and copies every kept weight by name (indices shifted
where a pair went). The method ``bk-sdm`` applies a preset (``base``: one pair per level where there are two;
``small``: + the mid block; ``tiny``: + the attention of the highest-resolution attention blocks) or, with
``ratio``, operators in that order until the UNet's MACs fall by ``ratio``.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import nn

from prunekit.core.config import Config
from prunekit.core.progress import say
from prunekit.diffusion.methods import METHODS, Context
from prunekit.diffusion.pipeline import Pipeline, count_macs
from prunekit.errors import PruneError

PLAIN = {"CrossAttnDownBlock2D": "DownBlock2D", "AttnDownBlock2D": "DownBlock2D",
         "CrossAttnUpBlock2D": "UpBlock2D", "AttnUpBlock2D": "UpBlock2D"}


def _config(unet: nn.Module) -> dict:
    """A copy of the UNet's config to edit (a loaded config holds lists: copied, never changed in place)."""
    return {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in dict(unet.config).items()
            if not k.startswith("_")}


def _layers(cfg: dict) -> list[int]:
    n = len(cfg["down_block_types"])
    lp = cfg.get("layers_per_block", 2)
    return list(lp) if isinstance(lp, (list, tuple)) else [lp] * n


def _conditional(unet: nn.Module) -> bool:
    return type(unet).__name__ == "UNet2DConditionModel"


def candidates(unet: nn.Module) -> list[str]:
    """Every operator :func:`apply_ops` can remove from ``unet`` as it is."""
    cfg = _config(unet)
    out = []
    if cfg.get("mid_block_type", "x") is not None and getattr(unet, "mid_block", None) is not None:
        out.append("mid")
        has_attn = any(a is not None for a in getattr(unet.mid_block, "attentions", []) or [])
        if has_attn:
            out.append("mid.attention")
    for i, t in enumerate(cfg["down_block_types"]):
        if t in PLAIN:
            out.append(f"down.{i}.attention")
    for j, t in enumerate(cfg["up_block_types"]):
        if t in PLAIN:
            out.append(f"up.{j}.attention")
    if _conditional(unet):
        for i, n in enumerate(_layers(cfg)):
            if n >= 2:
                out.append(f"level.{i}.pair")
    return out


_OP = re.compile(r"^(mid|mid\.attention|(down|up)\.(\d+)\.attention|level\.(\d+)\.pair)$")


def check_ops(unet: nn.Module, ops: list[str]) -> list[str]:
    """``ops`` validated against ``unet`` (a pair op may repeat while the level keeps >= 1 pair)."""
    cfg = _config(unet)
    layers = _layers(cfg)
    seen = set()
    for op in ops:
        if not _OP.match(op):
            raise PruneError(f"Unknown operator {op!r}; operators look like mid, mid.attention, down.1.attention, "
                             "up.0.attention, level.1.pair.")
        if op.startswith("level."):
            i = int(op.split(".")[1])
            if not _conditional(unet):
                raise PruneError(f"{op}: a UNet2DModel has one layers_per_block for every level; pairs can only be "
                                 "removed from a UNet2DConditionModel.")
            if i >= len(layers):
                raise PruneError(f"{op}: the UNet has {len(layers)} levels.")
            layers[i] -= 1
            if layers[i] < 1:
                raise PruneError(f"{op}: level {i} would keep no resnet; a down block needs at least one.")
            continue
        if op in seen:
            raise PruneError(f"Operator {op!r} is given twice.")
        seen.add(op)
        if op not in candidates(unet) and not (op == "mid.attention" and "mid" in seen):
            raise PruneError(f"Operator {op!r} is not in this UNet; it has: {', '.join(candidates(unet))}.")
    if "mid" in seen and "mid.attention" in seen:
        raise PruneError("Give mid or mid.attention, not both (mid removes the whole mid block).")
    return list(ops)


def _renamed(state: dict, prefix: str, kind: str, drop: set[int], shift_from: int | None) -> dict:
    """Drop ``prefix.kind.<k>.*`` for k in ``drop``; indices above the dropped one shift down by one."""
    out = {}
    pat = re.compile(rf"^{re.escape(prefix)}\.{kind}\.(\d+)\.(.*)$")
    for k, v in state.items():
        m = pat.match(k)
        if not m:
            out[k] = v
            continue
        idx = int(m.group(1))
        if idx in drop:
            continue
        if shift_from is not None and idx > shift_from:
            idx -= 1
        out[f"{prefix}.{kind}.{idx}.{m.group(2)}"] = v
    return out


def apply_ops(unet: nn.Module, ops: list[str]) -> nn.Module:
    """A new stock UNet of ``unet``'s class without the operators ``ops``, every kept weight copied."""
    ops = check_ops(unet, list(ops))
    cfg = _config(unet)
    state = dict(unet.state_dict())
    n = len(cfg["down_block_types"])
    layers = _layers(cfg)
    cond = _conditional(unet)
    for op in ops:
        if op == "mid":
            cfg["mid_block_type"] = None
            state = {k: v for k, v in state.items() if not k.startswith("mid_block.")}
        elif op == "mid.attention":
            state = {k: v for k, v in state.items() if not k.startswith("mid_block.attentions.")}
            if cond:
                cfg["mid_block_type"] = "UNetMidBlock2D"
                state = {k: v for k, v in state.items() if not k.startswith("mid_block.resnets.")
                         or k.startswith("mid_block.resnets.0.")}
            else:
                cfg["add_attention"] = False
        elif op.endswith(".attention"):
            side, i, _ = op.split(".")
            key = "down_block_types" if side == "down" else "up_block_types"
            cfg[key][int(i)] = PLAIN[cfg[key][int(i)]]
            pre = f"{side}_blocks.{i}.attentions."
            state = {k: v for k, v in state.items() if not k.startswith(pre)}
        else:  # level.<i>.pair
            i = int(op.split(".")[1])
            L = layers[i]
            state = _renamed(state, f"down_blocks.{i}", "resnets", {L - 1}, None)
            state = _renamed(state, f"down_blocks.{i}", "attentions", {L - 1}, None)
            j = n - 1 - i
            state = _renamed(state, f"up_blocks.{j}", "resnets", {L - 1}, L - 1)
            state = _renamed(state, f"up_blocks.{j}", "attentions", {L - 1}, L - 1)
            layers[i] -= 1
    if cond:
        cfg["layers_per_block"] = layers if len(set(layers)) > 1 else layers[0]
    new = type(unet).from_config(cfg)
    missing, unexpected = new.load_state_dict(state, strict=False)
    if missing or unexpected:  # pragma: no cover - a mapping bug, not a user's mistake
        raise RuntimeError(f"block removal mapped weights wrongly: missing {missing[:3]}, unexpected {unexpected[:3]}")
    dtype = next(unet.parameters()).dtype
    return (new if dtype == torch.float32 else new.to(dtype)).eval()


def preset_ops(unet: nn.Module, preset: str) -> list[str]:
    cfg = _config(unet)
    ops = [f"level.{i}.pair" for i, n in enumerate(_layers(cfg)) if n >= 2 and _conditional(unet)]
    if preset in ("small", "tiny") and "mid" in candidates(unet):
        ops.append("mid")
    if preset == "tiny":
        downs = [i for i, t in enumerate(cfg["down_block_types"]) if t in PLAIN]
        ups = [j for j, t in enumerate(cfg["up_block_types"]) if t in PLAIN]
        if downs:
            ops.append(f"down.{downs[0]}.attention")
        if ups:
            ops.append(f"up.{ups[-1]}.attention")
    return ops


def ordered_until(pipe: Pipeline, order: list[str], ratio: float) -> tuple[list[str], int]:
    """The shortest prefix of ``order`` whose removal cuts the UNet's MACs by at least ``ratio`` (all of
    ``order`` when none does) and its MACs. Operators that cannot follow earlier ones (e.g. mid.attention after
    mid) are skipped."""
    dense = count_macs(pipe)
    chosen: list[str] = []
    macs = dense
    for op in order:
        try:
            trial = apply_ops(pipe.unet, chosen + [op])
        except PruneError:
            continue
        chosen.append(op)
        macs = count_macs(pipe, trial)
        if macs <= (1 - ratio) * dense:
            break
    return chosen, macs


class BlockOptions(Config):
    what = "bk-sdm options"

    preset: Literal["base", "small", "tiny"] = "small"
    ops: list[str] | None = None  # explicit operators instead of a preset


@METHODS.register("bk-sdm", params=BlockOptions, aliases=("blocks",),
                  description="BK-SDM block removal: fewer resnet/attention pairs, no mid block (a stock config)")
def run(pipe: Pipeline, recipe, opts: BlockOptions, ctx: Context) -> dict:
    dense = count_macs(pipe)
    if opts.ops is not None:
        ops = check_ops(pipe.unet, opts.ops)
    elif recipe.ratio is not None:
        from prunekit.diffusion.methods import check_ratio

        ratio = check_ratio(recipe.ratio)
        order = preset_ops(pipe.unet, "tiny")
        rest = [o for o in candidates(pipe.unet) if o not in order and o != "mid.attention"]
        ops, macs = ordered_until(pipe, order + rest, ratio)
        if macs > (1 - ratio) * dense:
            say(f"bk-sdm: every removable block removed cuts the UNet's MACs by {1 - macs / dense:.1%}, "
                f"less than the {ratio:.0%} asked")
    else:
        ops = preset_ops(pipe.unet, opts.preset)
    if not ops:
        raise PruneError("This UNet has no block BK-SDM can remove (one pair per level, no mid block, no attention).")
    before = sum(p.numel() for p in pipe.unet.parameters())
    pipe.unet = apply_ops(pipe.unet, ops)
    return {"ops": ops, "unet_macs_dense": dense, "unet_macs": count_macs(pipe),
            "unet_params_dense": before, "unet_params": sum(p.numel() for p in pipe.unet.parameters())}


@torch.no_grad()
def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor, t, **kw) -> float:
    """Largest absolute difference of two UNets' outputs (a helper for checks and tests)."""
    return float((a(x, t, **kw).sample - b(x, t, **kw).sample).abs().max())

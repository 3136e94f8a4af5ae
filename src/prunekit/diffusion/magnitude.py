"""Unstructured and N:M pruning of a diffusion pipeline, each component at its own sparsity.

"Insights from pruning Stable Diffusion" finds that the text encoder and the UNet tolerate different amounts of
sparsity, so the recipe gives each its own: ``ratio`` is the UNet's sparsity, ``text_sparsity`` the text
encoder's. Scores are ``|W|`` (magnitude) or Wanda's ``|W| * ||X_j||`` with the input norms collected on the
calibration denoising trajectories (the UNet) and the class prompts (the text encoder). Selection is the core's:
per output row (Wanda's group) or per layer, or N:M; masks are the one :class:`~prunekit.core.masks.Masks` and
are kept by the fine-tune. Convolutions are scored on their ``[out, in * kh * kw]`` view.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from prunekit.core.config import Config
from prunekit.core.masks import Masks, kept_total, layer_keep_mask, prunable
from prunekit.diffusion.methods import METHODS, Context, check_ratio
from prunekit.diffusion.pipeline import Pipeline
from prunekit.errors import PruneError

# the first and last convolutions map pixels (or latents) in and out: as in the LLM family's embeddings, kept whole
UNET_EXCLUDE = ("conv_in", "conv_out")


class MagnitudeOptions(Config):
    what = "magnitude options"

    criterion: Literal["magnitude", "wanda"] = "magnitude"
    text_sparsity: float = 0.0
    nm: str | None = None  # "2:4": N zeros in every M inputs (both components)
    group: Literal["row", "layer"] = "row"
    exclude: list[str] = list(UNET_EXCLUDE)


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    if nm is None:
        return None
    try:
        n, m = (int(v) for v in nm.split(":"))
    except ValueError:
        raise PruneError(f"--nm {nm!r} must look like 2:4 (N zeros in every M weights).") from None
    if not 0 < n < m:
        raise PruneError(f"--nm {nm!r} needs 0 < N < M.")
    return n, m


def _matrix(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def input_norms(model: nn.Module, names: list[str], run) -> dict[str, torch.Tensor]:
    """Per parameter name, the L2 norm of each input feature over every call made by ``run()`` (convolutions: per
    input channel, repeated over the kernel positions so it lines up with the ``[out, in*kh*kw]`` view)."""
    mods = {n.rsplit(".", 1)[0]: n for n in names}
    sq: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(mname):
        def f(m, args, out):
            x = args[0].detach().float()
            if isinstance(m, nn.Conv2d):
                s = x.pow(2).sum(dim=(0, 2, 3))
            else:
                s = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sq[mname] = sq.get(mname, 0) + s
        return f

    for mname, mod in model.named_modules():
        if mname in mods:
            hooks.append(mod.register_forward_hook(hook(mname)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    params = dict(model.named_parameters())
    for mname, pname in mods.items():
        w = params[pname]
        s = sq.get(mname)
        if s is None:
            continue
        norm = s.sqrt()
        if w.dim() == 4:
            norm = norm[:, None].expand(-1, w.shape[2] * w.shape[3]).reshape(-1)
        out[pname] = norm
    return out


def component_masks(model: nn.Module, sparsity: float, opts: MagnitudeOptions, exclude=(), norms=None) -> Masks:
    """Masks of one component at ``sparsity`` (or ``opts.nm``)."""
    nm = parse_nm(opts.nm)
    params = prunable(model, exclude)
    masks = {}
    for name, p in params.items():
        w = _matrix(p.detach())
        if nm is not None and w.shape[1] % nm[1]:
            continue  # a layer whose inputs do not split into groups of M stays dense (N:M kernels skip it too)
        score = w.abs()
        if opts.criterion == "wanda" and norms is not None and name in norms:
            score = score * norms[name][None, :]
        keep = None if nm else kept_total(w.numel(), sparsity)
        masks[name] = layer_keep_mask(score, keep, nm, opts.group).reshape(p.shape)
    return Masks(masks)


@METHODS.register("magnitude", params=MagnitudeOptions,
                  description="unstructured / N:M, |W| or Wanda scores, the UNet and the text encoder each at its own "
                              "sparsity")
def run(pipe: Pipeline, recipe, opts: MagnitudeOptions, ctx: Context) -> dict:
    unet_s = check_ratio(recipe.ratio, "--ratio (the UNet's sparsity)") if recipe.ratio is not None else 0.0
    if not 0.0 <= opts.text_sparsity < 1.0:
        raise PruneError(f"text_sparsity must be in [0, 1) (got {opts.text_sparsity}).")
    if opts.text_sparsity > 0 and pipe.text_encoder is None:
        raise PruneError("text_sparsity needs a pipeline with a text encoder.")
    if unet_s == 0 and opts.text_sparsity == 0 and opts.nm is None:
        raise PruneError("Give --ratio (the UNet's sparsity) and/or text_sparsity.")
    nm = parse_nm(opts.nm)
    all_masks: dict[str, torch.Tensor] = {}
    rows = {}
    if unet_s > 0 or nm is not None:
        norms = None
        if opts.criterion == "wanda":
            names = list(prunable(pipe.unet, opts.exclude))
            norms = input_norms(pipe.unet, names, lambda: ctx.latents(pipe))
        m = component_masks(pipe.unet, unet_s, opts, opts.exclude, norms)
        m.apply(pipe.unet)
        all_masks.update(m.masks)
        rows["unet"] = m.stats()
    if opts.text_sparsity > 0 or (nm is not None and pipe.text_encoder is not None and opts.text_sparsity > 0):
        enc = pipe.text_encoder
        norms = None
        if opts.criterion == "wanda":
            names = list(prunable(enc))
            ids = pipe.prompts.ids(pipe.prompts.prompts + [""]) if pipe.prompts else None
            if ids is None:
                raise PruneError("Wanda on the text encoder needs the pipeline's prompts.")
            norms = input_norms(enc, names, lambda: enc(input_ids=ids))
        m = component_masks(enc, opts.text_sparsity, opts, (), norms)
        m.apply(enc)
        rows["text_encoder"] = m.stats()
        # the fine-tune trains the UNet only; the text encoder's masks are applied once here
    rows["_masks"] = Masks(all_masks) if all_masks else None
    return rows

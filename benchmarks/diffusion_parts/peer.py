"""Channel pruning side by side with Torch-Pruning's own diffusion example settings (Diff-Pruning's
``ddpm_prune.py``: ``MagnitudePruner`` with magnitude importance, one step, the same channel ratio in every layer
(0.3), ``conv_out`` ignored, the Up/Downsample ``channels`` attributes fixed after pruning) on the same model, then
the same fine-tune and metric; prunekit's ``channels`` at the MAC cut Torch-Pruning reached. Torch-Pruning's
result is not a stock config (its script pickles the module); prunekit's reloads with ``from_pretrained``."""

from __future__ import annotations

import copy

import torch

TP_RATIO = 0.3  # the example's --pruning_ratio


def _ft(ctx, lr: float | None = None) -> dict:
    """The fine-tune every '+ft' row uses, or the same at learning rate ``lr`` (its settings are part of the memo
    key)."""
    from prunekit.diffusion.methods import FinetuneConfig

    return FinetuneConfig(steps=ctx.finetune, batch_size=64, **({"lr": lr} if lr else {})).model_dump(mode="json")


def _tp_build(ctx, lr: float | None = None):
    def build(ref):
        import torch_pruning as tp
        from diffusers.models.resnet import Downsample2D, Upsample2D

        from prunekit.diffusion.methods import FinetuneConfig, build_context, finetune

        pipe = ref.clone()
        m = copy.deepcopy(ref.unet).eval()
        ex = {"sample": torch.randn(1, *ref.in_shape()), "timestep": torch.ones((1,)).long(),
              "encoder_hidden_states": torch.randn(1, ref.prompts.length, m.config.cross_attention_dim)}
        pr = tp.pruner.MagnitudePruner(m, ex, importance=tp.importance.MagnitudeImportance(), iterative_steps=1,
                                       pruning_ratio=TP_RATIO, ignored_layers=[m.conv_out])
        pr.step()
        for mod in m.modules():
            if isinstance(mod, (Upsample2D, Downsample2D)):
                mod.channels, mod.out_channels = mod.conv.in_channels, mod.conv.out_channels
        pipe.unet = m
        rec = ctx.recipe("channels", 0.3)
        c = build_context(ref, rec, progress=True)
        info = {"finetune": finetune(pipe, c, FinetuneConfig(**_ft(ctx, lr)))}
        return pipe, info
    return build


def run(ctx) -> dict:
    from prunekit.diffusion.methods import FinetuneConfig

    dense = ctx.measure("dense")
    rows, findings = [dense], []
    # the default fine-tune (lr 1e-4: it leaves the dense model where it was), then the larger 5e-4 that a cut
    # this deep needs (and that damages the dense control by 7 points, see part control)
    for lr in (None, 5e-4):
        tag = "" if lr is None else f" lr {lr:g}"
        spec = {"tp_ratio": TP_RATIO, "finetune": ctx.finetune, "ft": _ft(ctx, lr)}
        peer = ctx.measure(f"torch-pruning example (ratio {TP_RATIO}) +ft{tag}", build=_tp_build(ctx, lr), spec=spec)
        cut = 1 - peer["unet_macs_M"] / dense["unet_macs_M"]
        # the width search keeps the largest model within the budget; widths come in steps of 8, so a little slack
        # lands it next to Torch-Pruning's cost instead of a step below
        ours = ctx.measure(f"prunekit channels {cut:.0%} +ft{tag}",
                           ctx.recipe("channels", round(cut - 0.02, 3), ft_lr=lr))
        rows += [peer, ours]
        findings.append(f"At {cut:.0%} fewer UNet MACs, fine-tune lr {lr or FinetuneConfig().lr:g}: Torch-Pruning's "
                        f"example settings {peer['class_fidelity']} fidelity / FID {peer['fid']} vs prunekit channels "
                        f"{ours['class_fidelity']} / FID {ours['fid']} (widths {ours.get('info', {}).get('widths')}).")
    for r in rows:
        r["macs_cut_%"] = round(100 * (1 - r["unet_macs_M"] / dense["unet_macs_M"]), 1)
        r.pop("info", None) if not r["label"].startswith("prunekit") else None
    return {"setup": f"Both fine-tuned {ctx.finetune} steps (denoising + distillation from the dense UNet) at the "
                     f"default lr {FinetuneConfig().lr:g} and at 5e-4; {ctx.samples} samples.", "rows": rows,
            "findings": findings}

"""The control every '+ft' row needs: the dense reference fine-tuned with the same recipe and steps (the denoising
loss + distillation from itself, 10% null prompts). The reference is trained for 4,000 steps only, so more
training alone moves its figures; a pruned model is compared with this row as well as with the dense one."""

from __future__ import annotations


def control_row(ctx, lr: float | None = None, ema: float | None = None) -> dict:
    """The dense reference fine-tuned with the recipe every '+ft' row uses, or with another learning rate / weight
    average (memoized)."""
    from prunekit.diffusion.methods import FinetuneConfig

    changed = {k: v for k, v in (("lr", lr), ("ema", ema)) if v is not None}
    ft_cfg = FinetuneConfig(steps=ctx.finetune, batch_size=64, **changed)

    def build(ref):
        from prunekit.diffusion.methods import build_context, finetune

        pipe = ref.clone()
        c = build_context(ref, ctx.recipe("magnitude", 0.5), progress=True)
        return pipe, {"finetune": finetune(pipe, c, ft_cfg)}

    label = "dense +ft (control)" + "".join(f" {k} {v:g}" for k, v in changed.items())
    return ctx.measure(label, build=build, spec={"finetune": ft_cfg.model_dump(mode="json")})


def run(ctx) -> dict:
    from prunekit.diffusion.methods import FinetuneConfig

    dense = ctx.measure("dense")
    ft = control_row(ctx)
    d = FinetuneConfig()
    # which part of the fine-tune recipe moves an unpruned model: the learning rate, the weight average, both
    grid = [control_row(ctx, lr=lr, ema=ema) for lr, ema in ((d.lr, 0.0), (5e-4, d.ema), (5e-4, 0.0))]
    return {"setup": f"The dense UNet fine-tuned {ctx.finetune} steps with the recipe every '+ft' row uses (lr "
                     f"{d.lr:g}, weight average {d.ema:g}), then with the weight average off and/or lr 5e-4.",
            "rows": [dense, ft, *grid],
            "top_level": {"dense_ft_class_fidelity": ft["class_fidelity"], "dense_ft_fid": ft["fid"]}}

"""The control every '+ft' row needs: the dense reference fine-tuned with the same recipe and steps (the denoising
loss + distillation from itself, 10% null prompts). The reference is trained for 4,000 steps only, so more
training alone moves its figures; a pruned model is compared with this row as well as with the dense one."""

from __future__ import annotations


def control_row(ctx) -> dict:
    """The dense reference fine-tuned with the recipe every '+ft' row uses (memoized)."""
    from prunekit.diffusion.methods import FinetuneConfig

    ft_cfg = FinetuneConfig(steps=ctx.finetune, batch_size=64)

    def build(ref):
        from prunekit.diffusion.methods import build_context, finetune

        pipe = ref.clone()
        c = build_context(ref, ctx.recipe("magnitude", 0.5), progress=True)
        return pipe, {"finetune": finetune(pipe, c, ft_cfg)}

    return ctx.measure("dense +ft (control)", build=build, spec={"finetune": ft_cfg.model_dump(mode="json")})


def run(ctx) -> dict:
    dense = ctx.measure("dense")
    ft = control_row(ctx)
    return {"setup": f"The dense UNet fine-tuned {ctx.finetune} steps with the recipe every '+ft' row uses.",
            "rows": [dense, ft],
            "top_level": {"dense_ft_class_fidelity": ft["class_fidelity"], "dense_ft_fid": ft["fid"]}}

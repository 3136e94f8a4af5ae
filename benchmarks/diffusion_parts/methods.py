"""Every method at two or three compression levels, each followed by the same short fine-tune (the denoising loss
+ BK-SDM's output distillation from the dense UNet, masks kept): class fidelity, FID, parameters, MACs, speed.
Target: 30% fewer UNet MACs with class fidelity within 3 points of dense after the fine-tune."""

from __future__ import annotations


def run(ctx) -> dict:
    dense = ctx.measure("dense")
    specs = [
        ("magnitude 50% +ft", ctx.recipe("magnitude", 0.5)),
        ("magnitude 70% +ft", ctx.recipe("magnitude", 0.7)),
        ("wanda 2:4 +ft", ctx.recipe("magnitude", None, nm="2:4", criterion="wanda")),
        ("bk-sdm small +ft", ctx.recipe("bk-sdm", None, preset="small")),
        ("bk-sdm tiny +ft", ctx.recipe("bk-sdm", None, preset="tiny")),
        ("ld-pruner 15% +ft", ctx.recipe("ld-pruner", 0.15)),
        ("ld-pruner 25% +ft", ctx.recipe("ld-pruner", 0.25)),
        ("channels 30% +ft", ctx.recipe("channels", 0.3)),
        ("channels 44% +ft", ctx.recipe("channels", 0.44)),  # widths come in steps of 8: 0.45 would land on 64.6%
        ("channels 30% no ft", ctx.recipe("channels", 0.3, finetune=0)),
    ]
    from diffusion_parts.control import control_row

    control = control_row(ctx)
    rows = [dense, control]
    for label, rec in specs:
        rows.append(ctx.measure(label, rec))
    for r in rows:
        r["macs_cut_%"] = round(100 * (1 - r["unet_macs_M"] / dense["unet_macs_M"]), 1)
    ok = [r for r in rows[1:] if r["macs_cut_%"] >= 30 and "+ft" in r["label"]]
    best = max(ok, key=lambda r: r["class_fidelity"]) if ok else None
    targets = [{"target": "30% fewer UNet MACs, class fidelity within 3 points of dense after a short fine-tune",
                "met": bool(best and best["class_fidelity"] >= dense["class_fidelity"] - 3),
                "detail": (f"best at >= 30% fewer MACs: {best['label']} {best['class_fidelity']} "
                           f"({best['macs_cut_%']}% fewer MACs, FID {best['fid']}) vs dense {dense['class_fidelity']} "
                           f"(FID {dense['fid']}); the dense model fine-tuned alone (control) {control['class_fidelity']} "
                           f"(FID {control['fid']})") if best else "no method reached 30% fewer MACs"}]
    from diffusion import RESULTS, sample_grid

    if not ctx.quick:
        sample_grid(rows, ctx, RESULTS / "diffusion_samples.png")
    from prunekit.diffusion.methods import FinetuneConfig

    ft = FinetuneConfig()
    return {"setup": f"{ctx.finetune} fine-tune steps of 64 (AdamW {ft.lr:g}, warmup-cosine, weight average "
                     f"{ft.ema:g}) for every '+ft' row; "
                     f"{ctx.samples} samples, {ctx.steps} DDIM steps, guidance {ctx.guidance}.",
            "rows": rows, "targets": targets}

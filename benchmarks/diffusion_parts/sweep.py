"""Sparsity per component (the "Insights from pruning Stable Diffusion" question): magnitude pruning of the UNet
alone and of the text encoder alone, no fine-tune, and where quality collapses. Also Wanda scores and 2:4 on the
UNet."""

from __future__ import annotations

UNET = (0.3, 0.5, 0.7, 0.8, 0.9)
TEXT = (0.3, 0.5, 0.7, 0.9)


def _collapse(rows, dense, prefix):
    """The lowest sparsity whose class fidelity is more than 10 points below dense (None: never)."""
    for r in rows:
        if r["label"].startswith(prefix) and r["class_fidelity"] < dense - 10:
            return r["sparsity"]
    return None


def run(ctx) -> dict:
    dense = ctx.measure("dense")
    rows = []
    for s in UNET:
        r = ctx.measure(f"unet {s:.0%}", ctx.recipe("magnitude", s, finetune=0))
        rows.append({**r, "component": "unet", "sparsity": s})
    for s in TEXT:
        r = ctx.measure(f"text {s:.0%}", ctx.recipe("magnitude", None, finetune=0, text_sparsity=s))
        rows.append({**r, "component": "text_encoder", "sparsity": s})
    for s in (0.5, 0.7):
        r = ctx.measure(f"unet wanda {s:.0%}", ctx.recipe("magnitude", s, finetune=0, criterion="wanda"))
        rows.append({**r, "component": "unet", "sparsity": s})
    r = ctx.measure("unet 2:4", ctx.recipe("magnitude", None, finetune=0, nm="2:4"))
    rows.append({**r, "component": "unet", "sparsity": 0.5})
    cu = _collapse([r for r in rows if r["label"].startswith("unet ") and "wanda" not in r["label"]
                    and "2:4" not in r["label"]], dense["class_fidelity"], "unet")
    ct = _collapse(rows, dense["class_fidelity"], "text")
    findings = [f"UNet magnitude pruning collapses (class fidelity > 10 points below dense {dense['class_fidelity']}) "
                f"at {cu if cu is not None else 'none of the tested'} sparsity; the text encoder at "
                f"{ct if ct is not None else 'none of the tested'} (no fine-tune)."]
    for r in rows:
        r.pop("info", None)
    return {"setup": "Magnitude (|W|, per output row) pruning of one component at a time, no fine-tune; conv_in / "
                     "conv_out kept. The text encoder is the pipeline's 2-layer CLIPTextModel.",
            "rows": [{**dense, "component": "-", "sparsity": 0.0}] + rows, "findings": findings,
            "top_level": {"collapse_unet": cu, "collapse_text_encoder": ct}}

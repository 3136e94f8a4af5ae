"""UDFC (Bai et al., ICCV 2023), data-free channel removal with compensation + int8 weights, no fine-tuning,
against plain data-free L1 channel removal (same channels, no compensation) on EfficientNet-Lite0; the paper's
layer-by-layer split (l1, uniform) and prunekit's default (expected-error ranking, global over the sites, at most
30% of one site), each with and without the compensation.

* photos: top-1 agreement with the dense ImageNet model on the bundled sample photos (``models.sample_photos``) at
  ``RATIOS`` of each site's channels removed (the 16 MBConv hidden groups, the last projection, the head);
* transfer: test accuracy of the Fashion-MNIST transfer model (``Ctx.lite0_fashion``) at the same ratios.

Data-free (no seeds to average over): one run each.
"""

from __future__ import annotations

import copy

import torch

from prunekit.vision.learn.udfc import compress, quantize_int8
from prunekit.vision.models import efficientnet_lite0, sample_photos
from prunekit.vision.train import evaluate

RATIOS = (0.05, 0.1, 0.2)
# label, compensation, int8, select, allocation
VARIANTS = (("plain L1 removal", False, False, "l1", "uniform"),
            ("udfc l1/uniform", True, False, "l1", "uniform"),
            ("udfc l1/uniform + int8", True, True, "l1", "uniform"),
            ("error/global, no compensation", False, False, "error", "global"),
            ("udfc error/global", True, False, "error", "global"),
            ("udfc error/global + int8", True, True, "error", "global"))


def judge(rows: list[dict], photos: int) -> list[dict]:
    """The target at 10%, for the whole of UDFC (compensation + int8) and for the compensated removal alone."""
    at10 = {x["variant"]: x["photos_agree"] for x in rows if x["ratio"] == 0.1}
    every = ", ".join(f"{v[0]} {at10[v[0]]}" for v in VARIANTS)
    out = []
    for what, quant in (("with int8 weights", True), ("pruning + compensation alone (no int8)", False)):
        best = max((at10[v[0]], v[0]) for v in VARIANTS if v[1] and v[2] == quant)
        out.append({"target": f"UDFC keeps >= 8 of 16 photos' top-1 at 10% of channels removed, {what}",
                    "met": best[0] >= 8, "detail": f"best: {best[1]} {best[0]} of {photos} (all variants: {every})"})
    return out


def run(ctx) -> dict:
    names, photos = sample_photos()
    dense = efficientnet_lite0().eval()
    with torch.no_grad():
        logits = dense(photos)
    ref, p_ref = logits.argmax(1), logits.softmax(1)
    fashion, data = ctx.lite0_fashion()
    x_test, y_test = data["x_test"], data["y_test"]
    # int8 alone (nothing removed): how much of the photos' agreement the quantization costs by itself
    m, f = copy.deepcopy(dense), copy.deepcopy(fashion)
    quantize_int8(m)
    quantize_int8(f)
    with torch.no_grad():
        out = m(photos)
    int8_only = {"label": "int8 only 0%", "variant": "int8 only", "ratio": 0.0,
                 "photos_agree": int((out.argmax(1) == ref).sum()),
                 "photos_kl": round(float((p_ref * (p_ref.log() - out.log_softmax(1))).sum(1).mean()), 4),
                 "photos": len(names), "acc": round(evaluate(f, x_test, y_test), 4),
                 "params": sum(p.numel() for p in m.parameters())}
    fashion_dense = evaluate(fashion, x_test, y_test)
    rows = [int8_only]
    for r in RATIOS:
        for label, comp, quant, select, alloc in VARIANTS:
            m = copy.deepcopy(dense)
            rep = compress(m, photos[:1], r, select, comp, quant, allocation=alloc)
            with torch.no_grad():
                out = m(photos)
            agree = int((out.argmax(1) == ref).sum())
            kl = float((p_ref * (p_ref.log() - out.log_softmax(1))).sum(1).mean())
            f = copy.deepcopy(fashion)
            compress(f, x_test[:1], r, select, comp, quant, allocation=alloc)
            acc = evaluate(f, x_test, y_test)
            rows.append({"label": f"{label} {r:.0%}", "variant": label, "ratio": r, "photos_agree": agree, "photos_kl": round(kl, 4),
                         "photos": len(names), "acc": round(acc, 4), "bytes": rep["bytes_after"],
                         "params": sum(p.numel() for p in m.parameters())})
    targets = judge(rows, len(names))
    findings = [f"At {r:.0%} removed: photos agreeing " + ", ".join(
        f"{x['variant']} {x['photos_agree']}/{x['photos']}" for x in rows if x["ratio"] == r)
        + "; Fashion-MNIST transfer accuracy " + ", ".join(f"{x['variant']} {x['acc']:.4f}" for x in rows
                                                           if x["ratio"] == r) + f" (dense {fashion_dense:.4f})."
        for r in RATIOS]
    setup = (f"EfficientNet-Lite0 (real ImageNet weights), {len(names)} sample photos at 224 px, top-1 agreement with "
             f"the dense model; Fashion-MNIST transfer model (Ctx.lite0_fashion, {len(y_test)} test images at 64 px, "
             f"dense {fashion_dense:.4f}). Each ratio removes that fraction of every compensable site's channels "
             "(l1/uniform: that fraction of every site, lowest producer-filter L1 first; error/global: that fraction of "
             "all the sites' channels, lowest expected error relative to the site first, at most 30% of a site); no "
             "data, no fine-tuning, no BatchNorm re-estimation. udfc: learner `udfc` (Gaussian BatchNorm model of "
             "ReLU6, ridge 0.1); photos_kl: mean KL(dense || compressed) of the photos' class distributions; int8: "
             "per-output-channel symmetric weights. Bytes: int8 weights + fp32 scales + fp32 rest.")
    return {"setup": setup, "rows": rows, "targets": targets, "findings": findings, "plot": "photos_agree"}

"""ToMe for Stable Diffusion in the UNet's attention: prunekit's (the token family's merge code) side by side with
the PyPI tomesd package on the same model, noise and metric; merge ratios 0.3 / 0.5 / 0.7 of the self-attention
tokens at the reference's highest attention resolution (8x8: downsample 2, so max_downsample=2; level 0 has no
attention)."""

from __future__ import annotations

RATIOS = (0.3, 0.5, 0.7)


def run(ctx) -> dict:
    dense = ctx.measure("dense")
    rows = [dense]
    for r in RATIOS:
        rows.append(ctx.measure(f"tome {r}", ctx.recipe("tome", r, finetune=0, max_downsample=2)))

    def peer(ratio):
        def build(ref):
            from prunekit.diffusion.tome import tomesd_peer

            pipe = ref.clone()
            pipe.unet = tomesd_peer(ref.unet, ratio, max_downsample=2)
            return pipe, {}
        return build

    findings = []
    try:
        import tomesd  # noqa: F401

        for r in RATIOS:
            rows.append(ctx.measure(f"tomesd {r}", build=peer(r), spec={"max_downsample": 2}))
    except ImportError:
        findings.append("tomesd is not installed (pip install tomesd==0.1.3, the peers extra): no peer rows.")
    for r in rows:
        r.pop("info", None) if r is not dense else None
    return {"setup": "No fine-tune (training-free). MACs count the attention products on the merged tokens. "
                     "Sampling time at 16x16 / 64 tokens: merging saves little here; ToMe pays at Stable "
                     "Diffusion's 4096 tokens.", "rows": rows, "findings": findings}

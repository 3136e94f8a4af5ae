"""LD-Pruner's ranking against random operator removal at equal compression (no fine-tune, so the ranking alone
decides). Operators come in discrete sizes, so "equal" is matched to what LD-Pruner reached: each random baseline
is a seeded random order of the same candidates, cut at the prefix whose UNet MACs are closest to LD-Pruner's."""

from __future__ import annotations

import statistics

import torch

RATIOS = (0.1, 0.2)
SEEDS = (0, 1, 2)


def _random_ops(ctx, seed: int, target_macs: float) -> list[str]:
    from prunekit.diffusion.blocks import apply_ops, candidates
    from prunekit.diffusion.pipeline import count_macs

    ref = ctx.reference()
    ops = candidates(ref.unet)
    g = torch.Generator().manual_seed(seed)
    order = [ops[i] for i in torch.randperm(len(ops), generator=g).tolist()]
    best, chosen = None, []
    for op in order:
        if op.startswith("mid") and any(o.startswith("mid") for o in chosen):
            continue  # the whole mid block and its attention exclude each other
        chosen = chosen + [op]
        gap = abs(count_macs(ref, apply_ops(ref.unet, chosen)) - target_macs)
        if best is None or gap < best[0]:
            best = (gap, list(chosen))
    return best[1]


def run(ctx) -> dict:
    dense = ctx.measure("dense")
    rows, targets = [dense], []
    for ratio in RATIOS:
        ld = ctx.measure(f"ld-pruner {ratio:.0%}", ctx.recipe("ld-pruner", ratio, finetune=0))
        rnd = []
        for s in SEEDS:
            ops = _random_ops(ctx, s, ld["unet_macs_M"] * 1e6)
            rnd.append(ctx.measure(f"random ops ~{ratio:.0%} seed {s}", ctx.recipe("bk-sdm", None, finetune=0, ops=ops)))
        rows += [ld] + rnd
        mf = statistics.mean(r["class_fidelity"] for r in rnd)
        sf = statistics.pstdev(r["class_fidelity"] for r in rnd)
        mfid = statistics.mean(r["fid"] for r in rnd)
        targets.append({"target": f"LD-Pruner's ranking beats random operator removal at equal compression "
                                  f"(LD-Pruner asked for {ratio:.0%} fewer MACs)",
                        "met": ld["class_fidelity"] > mf and ld["fid"] < mfid,
                        "detail": f"LD-Pruner fidelity {ld['class_fidelity']} / FID {ld['fid']} ({ld['unet_macs_M']} M "
                                  f"MACs, ops {ld['info'].get('ops')}) vs random {mf:.2f} ± {sf:.2f} / FID "
                                  f"{mfid:.3f} (MACs {[r['unet_macs_M'] for r in rnd]}, ops "
                                  f"{[r['info'].get('ops') for r in rnd]})"})
    for r in rows:
        r.pop("info", None) if r is not dense else None
    return {"setup": "Candidate operators: the mid block or its attention, each block's attentions (the reference "
                     "has one resnet per level, so no pair removal). Latents from 32 fixed noises x conditions, 10 "
                     "DDIM steps. No fine-tune. Random: 3 seeds.", "rows": rows, "targets": targets}

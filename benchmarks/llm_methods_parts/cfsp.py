"""CFSP vs FLAP vs LLM-Pruner (Taylor): heads + MLP structure at 20% and 30%, no recovery."""

from __future__ import annotations

import prunekit
from prunekit.structure.shrink import count_params

SPARSITIES = (0.2, 0.3)
RUNS = (  # label, structure fields besides kinds / sparsity
    ("CFSP", {"criterion": "cfsp"}),
    ("CFSP + bias comp.", {"criterion": "cfsp", "bias_compensation": True}),  # FLAP's add-on, composed
    ("FLAP", {"criterion": "fluctuation", "global_rank": True, "bias_compensation": True}),
    ("LLM-Pruner (taylor)", {"criterion": "taylor"}),
)


def run(ctx) -> dict:
    calib = ctx.calib("shakespeare", 32, seed=0)
    model, _ = ctx.load()
    dense_params = count_params(model)
    rows = [{"label": "dense", "sparsity": 0.0, "params": dense_params, "ppl": ctx.ppl(model, "shakespeare"),
             "ppl_pydoc": ctx.ppl(model, "pydoc")}]
    got = {}
    for s in SPARSITIES:
        for label, fields in RUNS:
            model, _ = ctx.load()
            rec = {"structure": {"kinds": ["heads", "mlp"], "sparsity": s, **fields}}
            model, rep = prunekit.prune(model, rec, calib, progress=False)
            row = {"label": f"{label} {s:.0%}", "sparsity": s, "params": count_params(model),
                   "ppl": ctx.ppl(model, "shakespeare"), "ppl_pydoc": ctx.ppl(model, "pydoc"),
                   "prune_s": round(rep.times.get("prune_s", 0.0), 1)}
            if "block_ratios" in rep.summary:
                r = rep.summary["block_ratios"]
                row["block_ratio_range"] = f"{min(r):.3f}-{max(r):.3f}"
            rows.append(row)
            got[(label, s)] = row
            print("    ", row, flush=True)
    c, f = got[("CFSP", 0.2)], got[("FLAP", 0.2)]
    ppl = {k: v["ppl"] for k, v in got.items()}
    detail = (f"shakespeare ppl {c['ppl']} vs FLAP {f['ppl']} ({c['params']:,} vs {f['params']:,} params; pydoc "
              f"{c['ppl_pydoc']} vs {f['ppl_pydoc']}); at 30%: {ppl[('CFSP', 0.3)]} vs {ppl[('FLAP', 0.3)]}; "
              f"LLM-Pruner (taylor) {ppl[('LLM-Pruner (taylor)', 0.2)]} / {ppl[('LLM-Pruner (taylor)', 0.3)]}; "
              f"CFSP with FLAP's bias compensation {ppl[('CFSP + bias comp.', 0.2)]} / "
              f"{ppl[('CFSP + bias comp.', 0.3)]}")
    targets = [{"target": "CFSP beats FLAP at 20% without recovery", "met": c["ppl"] < f["ppl"], "detail": detail}]
    levels = ", ".join(f"{s:.0%}" for s in SPARSITIES)
    setup = (f"SmolLM2-135M, structure heads + MLP (query-head slices, one per kv group) at {levels} of each "
             f"sublayer's weights, no recovery. Calibration: 32 windows x {ctx.seqlen} tokens of shakespeare's "
             "calibration split. CFSP: block ratios from the blocks' angular distance (sigmoid of the relative "
             "deviation, parameter-weighted mean = the sparsity, within [0, 0.9]), channels / heads by relative weight "
             "importance x activation norm, as many units in total as FLAP's global ranking removes. FLAP: "
             "fluctuation, standardized scores ranked over all layers, bias compensation (also composed with CFSP in "
             "one row). LLM-Pruner: first-order Taylor, the same share per layer. Perplexity on 32 held-out windows "
             "of shakespeare and of pydoc (out of domain).")
    return {"setup": setup, "rows": rows, "targets": targets}

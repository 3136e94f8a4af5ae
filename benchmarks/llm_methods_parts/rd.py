"""Rate-distortion allocation vs uniform and OWL, Wanda 50% (and 60%) on SmolLM2-135M."""

from __future__ import annotations

import prunekit


def run(ctx) -> dict:
    cal = ctx.calib("shakespeare", 32, seed=0)
    rows, res = [], {}
    for s in (0.5, 0.6):
        for kind, alloc in (("uniform", {"kind": "uniform"}), ("owl", {"kind": "owl"}),
                            ("rd", {"kind": "rd", "rd_windows": 4})):
            model, _ = ctx.load()
            _, rep = prunekit.prune(model, {"method": "wanda", "sparsity": s, "allocation": alloc}, cal, progress=False)
            row = {"label": f"{kind} {s:g}", "sparsity": s, "allocation": kind, "ppl": ctx.ppl(model, "shakespeare"),
                   "ppl_pydoc": ctx.ppl(model, "pydoc", 16), "allocate_s": round(rep.times.get("allocate_s", 0.0), 1),
                   "block_sparsity_range": [round(min(rep.summary["block_sparsity"]), 3),
                                            round(max(rep.summary["block_sparsity"]), 3)]}
            rows.append(row)
            res[(kind, s)] = row
            print("    ", row, flush=True)
    rd, owl = res[("rd", 0.5)], res[("owl", 0.5)]
    targets = [{"target": "RD allocation <= OWL's perplexity at 50%", "met": rd["ppl"] <= owl["ppl"],
                "detail": f"rd {rd['ppl']} vs OWL {owl['ppl']} (uniform {res[('uniform', 0.5)]['ppl']})"}]
    setup = ("SmolLM2-135M, Wanda, 32 calibration windows x 256 tokens of the Shakespeare calibration plays; rd: the "
             "logits' mean squared change on the first 4 calibration windows with one decoder block pruned alone to "
             "0.1..0.9, dynamic program at the exact total; OWL M 5, lambda 0.08. Perplexity on 32 held-out windows "
             "(16 of pydoc).")
    return {"setup": setup, "rows": rows, "targets": targets}

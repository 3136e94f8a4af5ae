"""D-Pruner vs Wanda / SparseGPT calibrated on the domain alone and on the mixture, 50% unstructured, both ways
(domain pydoc / general shakespeare, then the reverse)."""

from __future__ import annotations

import torch

import prunekit

SPARSITY = 0.5
LAM = 1.0  # the default, fixed before any run: domain Taylor and general saliency, each mean 1 per layer, weighed alike


def run(ctx) -> dict:
    rows, targets = [], []
    for domain, general in (("pydoc", "shakespeare"), ("shakespeare", "pydoc")):
        dom = ctx.calib(domain, 32, seed=0)
        gen = ctx.calib(general, 32, seed=0)
        mix = torch.cat([dom[: len(dom) // 2], gen[: len(gen) // 2]])  # the same 32 windows' budget, half each
        model, _ = ctx.load()
        dense = {"domain": ctx.ppl(model, domain, 16), "general": ctx.ppl(model, general, 16)}
        rows.append({"label": f"dense ({domain})", "domain": domain, "method": "dense",
                     "ppl_domain": dense["domain"], "ppl_general": dense["general"]})
        runs = [("wanda", "domain", {}, dom), ("wanda", "mixture", {}, mix), ("sparsegpt", "domain", {}, dom),
                ("sparsegpt", "mixture", {}, mix), ("d-pruner", "domain+general", {"lam": 0.0}, dom),
                ("d-pruner", "domain+general", {"lam": LAM}, dom)]
        got = {}
        for method, calib, options, batches in runs:
            model, _ = ctx.load()
            rec = {"method": method, "sparsity": SPARSITY, "options": options}
            kw = {"general_batches": gen} if method == "d-pruner" and options.get("lam") else {}
            _, rep = prunekit.prune(model, rec, batches, progress=False, **kw)
            label = f"{method}{'' if method != 'd-pruner' else ' lam=' + format(options['lam'], 'g')} [{calib}]"
            row = {"label": f"{label} ({domain})", "domain": domain, "method": method, "calibration": calib,
                   "ppl_domain": ctx.ppl(model, domain, 16), "ppl_general": ctx.ppl(model, general, 16),
                   "prune_s": round(rep.times.get("prune_s", 0.0), 1)}
            rows.append(row)
            got[label] = row
            print("    ", row, flush=True)
        d, w = got[f"d-pruner lam={LAM:g} [domain+general]"], got["wanda [domain]"]
        met = d["ppl_domain"] < w["ppl_domain"] and d["ppl_general"] < w["ppl_general"]
        targets.append({"target": f"D-Pruner holds the domain's perplexity at 50% better than Wanda calibrated on the "
                                  f"domain while losing less on the other domain (domain {domain})", "met": met,
                        "detail": f"domain ppl {d['ppl_domain']} vs Wanda {w['ppl_domain']}; other domain "
                                  f"{d['ppl_general']} vs {w['ppl_general']} (dense {dense['domain']} / {dense['general']})"})
    setup = (f"SmolLM2-135M, {SPARSITY:.0%} unstructured, uniform allocation. Calibration: 32 windows x {ctx.seqlen} "
             "tokens of the domain's calibration split (mixture: 16 domain + 16 general). D-Pruner: domain Taylor "
             "importance from the calibration windows' gradients, general importance = SparseGPT's OBS saliency from "
             f"32 windows of the other text, lambda {LAM} (the default, fixed a priori; lambda 0 = the domain's "
             "gradient-only Taylor importance). Perplexity on 16 held-out windows of each "
             "text's evaluation split.")
    return {"setup": setup, "rows": rows, "targets": targets, "plot": "ppl_domain"}

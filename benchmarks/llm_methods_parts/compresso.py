"""Compresso (hard-concrete masks learned with LoRA) vs LLM-Pruner's Taylor one-shot, and Taylor + the same LoRA
steps of recovery: heads + MLP at 20%."""

from __future__ import annotations

import prunekit
from prunekit.recipe import Recovery
from prunekit.structure.shrink import count_params
from prunekit.train import recover

SPARSITY = 0.2
STEPS = 120  # LoRA steps in all, for Compresso and for Taylor's recovery
LORA = {"lora_lr": 5e-4, "lora_rank": 8, "lora_alpha": 16.0, "lora_batch_size": 4}


def run(ctx) -> dict:
    steps = ctx.steps(STEPS)
    calib = ctx.calib("shakespeare", 32, seed=0)
    train = ctx.calib("shakespeare", 128, seed=1)
    structure = {"kinds": ["heads", "mlp"], "sparsity": SPARSITY}

    def row(label, model, seconds, **extra):
        r = {"label": label, "params": count_params(model), "ppl": ctx.ppl(model, "shakespeare"),
             "ppl_pydoc": ctx.ppl(model, "pydoc"), "seconds": round(seconds, 1), **extra}
        print("    ", r, flush=True)
        return r

    model, _ = ctx.load()
    rows = [row("dense", model, 0.0)]
    model, _ = ctx.load()
    model, rep = prunekit.prune(model, {"structure": {**structure, "criterion": "taylor"},
                                        "calibration": {"batch_size": 4}}, calib, progress=False)
    rows.append(row("LLM-Pruner taylor, one-shot", model, rep.times["prune_s"]))
    r = Recovery(method="lora", steps=steps, lr=LORA["lora_lr"], lora_rank=LORA["lora_rank"],
                 lora_alpha=LORA["lora_alpha"], batch_size=LORA["lora_batch_size"])
    model, stats = recover(model, r, train, structured=True, progress=False)
    rows.append(row(f"LLM-Pruner taylor + {steps} LoRA steps", model, rep.times["prune_s"] + stats["seconds"]))
    model, _ = ctx.load()
    model, rep = prunekit.prune(model, {"structure": {**structure, "learn": "compresso", "lora_steps": steps, **LORA}},
                                train, progress=False)
    c = rep.summary["compresso"]
    g = c["gates"]
    rows.append(row(f"Compresso ({steps} LoRA steps)", model, rep.times["prune_s"], format=rep.summary["format"],
                    expected_kept=f"heads {g['heads']['expected_kept']} (target {g['heads']['target_kept']}), "
                                  f"mlp {g['mlp']['expected_kept']} (target {g['mlp']['target_kept']})"))
    _, one, tr, cp = rows
    detail = (f"shakespeare ppl: Compresso {cp['ppl']}, Taylor one-shot {one['ppl']}, Taylor + {steps} LoRA steps "
              f"{tr['ppl']} (pydoc {cp['ppl_pydoc']} / {one['ppl_pydoc']} / {tr['ppl_pydoc']}); the same parameter "
              f"count ({cp['params']:,} vs {tr['params']:,}); gates at the end of training: {cp['expected_kept']}")
    targets = [
        {"target": "Compresso's learned masks beat LLM-Pruner's one-shot Taylor masks", "met": cp["ppl"] < one["ppl"],
         "detail": detail},
        {"target": "Compresso matches Taylor + the same LoRA steps of recovery (at most 10% higher perplexity)",
         "met": cp["ppl"] <= 1.10 * tr["ppl"], "detail": detail},
    ]
    setup = (f"SmolLM2-135M, heads + MLP at {SPARSITY:.0%} of each sublayer's weights (query-head slices; the same "
             "count per layer, so the output is a stock config). Compresso: one hard-concrete gate per head slice "
             "and MLP channel, trained with LoRA (rank 8, alpha 16, lr 5e-4; gates' log-alpha lr 0.1) under the "
             "Lagrangian lambda1 (s - t) + lambda2 (s - t)^2 per layer (s: expected kept share, target reached over "
             f"the first 40% of the gate steps), half of {steps} steps; then the highest log-alpha kept per layer, "
             "test-time gates folded into o_proj / down_proj, the rest removed, and the other half of the steps LoRA "
             f"fine-tuning; no collaborative prompt (a base model). LLM-Pruner: Taylor |w dL/dw| from 32 calibration "
             f"windows, then {steps} steps of LoRA recovery (same rank, lr, 4 windows per step). Training on the same "
             f"128 windows x {ctx.seqlen} tokens of shakespeare's calibration split; perplexity on 32 held-out "
             "windows of shakespeare and pydoc.")
    return {"setup": setup, "rows": rows, "targets": targets}

"""LoRAPrune vs LLM-Pruner's full-gradient Taylor (+ the same LoRA steps of recovery): perplexity and peak memory,
each method in a fresh process (its peak resident set, ``ru_maxrss``, read before any evaluation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SPARSITY = 0.2
STEPS = 80  # LoRA steps in all, for both
ROUNDS = 2
LORA = {"lora_lr": 5e-4, "lora_rank": 8, "lora_alpha": 16.0, "lora_batch_size": 4}


def _rss_mb() -> tuple[float, float]:
    """(resident now, peak so far) of this process in MiB."""
    import resource

    now = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(method: str, quick: bool) -> dict:
    """One method in this (fresh) process: load, prune (+ recover), read the peak RSS, then evaluate."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llm_methods import Ctx

    from prunekit.recipe import Recipe, Recovery
    from prunekit.structure import prune_structured
    from prunekit.structure.shrink import count_params
    from prunekit.train import recover

    ctx = Ctx(quick=quick)
    model, _ = ctx.load()
    train = ctx.calib("shakespeare", 128, seed=1)  # the LoRA training windows of both methods
    steps = ctx.steps(STEPS)
    rounds = min(ROUNDS, steps - 1)
    loaded, _ = _rss_mb()
    out: dict = {"method": method}
    if method == "loraprune":
        rec = Recipe.make(structure={"kinds": ["heads", "mlp"], "sparsity": SPARSITY, "criterion": "loraprune",
                                     "rounds": rounds, "lora_steps": steps, **LORA})
        model, rep = prune_structured(model, rec, train, progress=False)
        out["seconds"] = round(rep.times["prune_s"], 1)
    elif method == "taylor":
        calib = ctx.calib("shakespeare", 32, seed=0)
        rec = Recipe.make(structure={"kinds": ["heads", "mlp"], "sparsity": SPARSITY, "criterion": "taylor"},
                          calibration={"batch_size": LORA["lora_batch_size"]})
        model, rep = prune_structured(model, rec, calib, progress=False)
        _, out["peak_prune_mb"] = _rss_mb()
        r = Recovery(method="lora", steps=steps, lr=LORA["lora_lr"], lora_rank=LORA["lora_rank"],
                     lora_alpha=LORA["lora_alpha"], batch_size=LORA["lora_batch_size"])
        model, stats = recover(model, r, train, structured=True, progress=False)
        out["seconds"] = round(rep.times["prune_s"] + stats["seconds"], 1)
    _, peak = _rss_mb()
    out.update(rss_loaded_mb=round(loaded), peak_rss_mb=round(peak), peak_above_loaded_mb=round(peak - loaded),
               params=count_params(model), ppl=ctx.ppl(model, "shakespeare"), ppl_pydoc=ctx.ppl(model, "pydoc"))
    if "peak_prune_mb" in out:
        out["peak_prune_mb"] = round(out["peak_prune_mb"])
    return out


def _fresh(method: str, quick: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), method] + (["--quick"] if quick else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{method} failed in its process:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(ctx) -> dict:
    steps = ctx.steps(STEPS)
    rows = []
    for method, label in (("dense", "dense"), ("taylor", f"LLM-Pruner taylor + {steps} LoRA steps"),
                          ("loraprune", f"LoRAPrune ({min(ROUNDS, steps - 1)} rounds, {steps} LoRA steps)")):
        res = _fresh(method, ctx.quick)
        res["label"] = label
        rows.append(res)
        print("    ", res, flush=True)
    _, ty, lp = rows
    less = lp["peak_rss_mb"] < ty["peak_rss_mb"]
    close = lp["ppl"] <= 1.10 * ty["ppl"]
    detail = (f"peak RSS {lp['peak_rss_mb']} MiB vs {ty['peak_rss_mb']} MiB (above the loaded model: "
              f"{lp['peak_above_loaded_mb']} vs {ty['peak_above_loaded_mb']} MiB; Taylor's gradient pass alone "
              f"{ty.get('peak_prune_mb')} MiB); shakespeare ppl {lp['ppl']} vs {ty['ppl']} (comparable = at most 10% "
              f"higher), pydoc {lp['ppl_pydoc']} vs {ty['ppl_pydoc']}")
    targets = [{"target": "LoRAPrune uses less peak memory than full-gradient Taylor at comparable perplexity",
                "met": bool(less and close), "detail": detail}]
    setup = (f"SmolLM2-135M (fp32, CPU), heads + MLP at {SPARSITY:.0%} of each sublayer's weights (query-head slices, "
             "the same count per layer). Each method runs in a fresh Python process; its peak resident set "
             "(ru_maxrss) is read after pruning and training, before any evaluation. LLM-Pruner: first-order Taylor "
             f"|w dL/dw| from full-weight gradients over 32 calibration windows x {ctx.seqlen} tokens (batches of 4), "
             f"then {steps} steps of LoRA recovery (rank 8, alpha 16, lr 5e-4, 4 windows per step). LoRAPrune: base "
             "weights frozen, importance |(W + sBA) * (gB A + B gA - gB gA)| from the LoRA adapters only, moving "
             f"average beta 0.9, {min(ROUNDS, steps - 1)} rounds of pruning with LoRA training before each, then LoRA "
             f"fine-tuning of the final model ({steps} LoRA steps in all, in {min(ROUNDS, steps - 1) + 1} equal "
             "segments; same rank, lr, batch). Both train on the same 128 "
             "windows of shakespeare's calibration split; perplexity on 32 held-out windows of shakespeare and pydoc.")
    return {"setup": setup, "rows": rows, "targets": targets, "plot": "peak_rss_mb"}


if __name__ == "__main__":
    name = sys.argv[1]
    quick = "--quick" in sys.argv
    if name == "dense":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from llm_methods import Ctx

        from prunekit.structure.shrink import count_params

        c = Ctx(quick=quick)
        m, _ = c.load()
        now, peak = _rss_mb()
        res = {"method": "dense", "rss_loaded_mb": round(now), "peak_rss_mb": round(peak), "params": count_params(m),
               "ppl": c.ppl(m, "shakespeare"), "ppl_pydoc": c.ppl(m, "pydoc")}
    else:
        res = _child(name, quick)
    print(json.dumps(res))

"""Peak memory of one training step on SmolLM2-135M (4 windows x 256 tokens, 2 threads, fp32, CPU), by what
needs a gradient, each mode in a fresh process (peak resident set, ``ru_maxrss``, above the loaded model):

* ``full``: every weight (what LLM-Pruner's Taylor importance needs);
* ``lora``: peft LoRA adapters (rank 8) on every block linear, the base frozen (what LoRAPrune and Compresso train);
* ``none``: no weight gradient at all (the input embedding's only): the activations alone.

Why: benchmarks/llm_methods.py --parts loraprune found LoRAPrune's peak above full-gradient Taylor's; this
separates the training step's own cost from the methods. Writes benchmarks/results/lora_step_memory.json.

    python benchmarks/lora_step_memory.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

MODES = ("full", "lora", "none")


def _child(mode: str) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llm_methods import Ctx

    torch.set_num_threads(2)
    ctx = Ctx()
    model, _ = ctx.load()
    x = ctx.calib("shakespeare", 4, seed=0)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.train()
    if mode == "lora":
        from prunekit.structure.loraprune import LoRA

        LoRA(model, 8, 16.0)
        model.train()
    else:
        for p in model.parameters():
            p.requires_grad_(mode == "full")
        model.get_input_embeddings().weight.requires_grad_(True)
    for _ in range(2):
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "loaded_mb": round(loaded), "peak_mb": round(peak), "above_loaded_mb": round(peak - loaded)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2])))
        return
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    res = Path(__file__).resolve().parent / "results"
    res.mkdir(exist_ok=True)
    tmp = res / ".lora_step_memory.json.tmp"
    tmp.write_text(json.dumps({"rows": rows, "command": "python benchmarks/lora_step_memory.py"}, indent=1))
    tmp.replace(res / "lora_step_memory.json")


if __name__ == "__main__":
    main()

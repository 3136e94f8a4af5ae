"""Structured pruning of SmolLM2-135M: quality and measured CPU speed of really smaller models.

Every row: perplexity on the held-out plays (16 x 256 tokens), parameters, and measured prefill throughput
(tokens/s) at batch 1 and 8 with 256-token prompts, torch threads as given (default 2), median of --runs timed
runs after one warm-up. Prefill = what ``generate`` does first: one forward pass over the prompt that fills the
KV cache and computes the logits of the last position only (``logits_to_keep=1``). Dense and pruned are timed
alternately (pairs), so a change in the machine's load hits both; the speed-up is the median of the pairs' ratios.
Calibration: 32 x 256 tokens of the calibration plays. Writes benchmarks/results/llm_structured.{md,json}.

    .venv/bin/python benchmarks/llm_structured.py            # the full table (about an hour on a 2-core CPU)
    .venv/bin/python benchmarks/llm_structured.py --quick    # 50% only, fluctuation and magnitude, depth rows
    .venv/bin/python benchmarks/llm_structured.py --tiny     # smoke test on a tiny random Llama (seconds)
    python benchmarks/llm_structured.py --device-check       # on a GPU machine: device="cuda" vs "cpu" plans
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.batches import bos_id, calibration_batches, evaluation_windows, tokenize
from prunekit.evaluate import perplexity
from prunekit.structure import count_params

HERE = Path(__file__).resolve().parent
CRITERIA = ("magnitude", "fluctuation", "taylor", "random")


def configs(n_layers: int, quick: bool, greedy: bool) -> list[tuple[str, dict]]:
    rows = []
    for ratio in (0.5,) if quick else (0.2, 0.3, 0.5):
        for crit in ("fluctuation", "magnitude") if quick else CRITERIA:
            for comp in (False, True):
                label = f"heads+mlp {ratio:.0%} {crit}" + (" + bias comp." if comp else "")
                rows.append((label, {"kinds": ["heads", "mlp"], "sparsity": ratio, "criterion": crit, "bias_compensation": comp}))
        # FLAP as published: fluctuation, standardized scores ranked over all layers, bias compensation
        rows.append((f"heads+mlp {ratio:.0%} FLAP (global + bias comp.)",
                     {"kinds": ["heads", "mlp"], "sparsity": ratio, "criterion": "fluctuation", "global_rank": True,
                      "bias_compensation": True}))
    # MLP channels only: the configuration Torch-Pruning can also prune on this model (see torch_pruning_mlp)
    rows.append(("mlp 50% magnitude", {"kinds": ["mlp"], "sparsity": 0.5, "criterion": "magnitude"}))
    rows.append(("mlp 50% fluctuation + bias comp.", {"kinds": ["mlp"], "sparsity": 0.5, "criterion": "fluctuation",
                                                      "bias_compensation": True}))
    rows.append(("mlp 50% Torch-Pruning (group L2 magnitude)", {"peer": "torch-pruning", "sparsity": 0.5}))
    # hidden size (Minitron): the residual stream loses channels everywhere
    if not quick:
        for crit in ("fluctuation", "magnitude"):
            rows.append((f"hidden 25% {'activation (Minitron)' if crit == 'fluctuation' else crit}",
                         {"kinds": ["hidden"], "sparsity": 0.25, "criterion": crit}))
    for frac in (0.15, 0.25):
        k = int(frac * n_layers + 0.5)
        rows.append((f"blocks {frac:.0%} ({k} of {n_layers})", {"remove_layers": k}))
    for frac in (0.15, 0.25):
        k = int(frac * 2 * n_layers + 0.5)
        rows.append((f"sublayers {frac:.0%} ({k} of {2 * n_layers})", {"remove_sublayers": k}))
        if greedy:
            rows.append((f"sublayers {frac:.0%} ({k}) greedy", {"remove_sublayers": k, "sublayer_method": "greedy"}))
    return rows


def torch_pruning_mlp(model, ratio: float, vocab: int):
    """Torch-Pruning (DepGraph, ``MetaPruner`` with its group L2 magnitude importance, as its LLM example) on the MLP
    channels only: attention projections, down_proj and lm_head ignored, so the only groups left are the MLP
    channels (gate/up rows + down columns). Its GQA head groups do not build on this model (see the notes), and its
    hidden-size groups need the heads too. Torch-Pruning does not update the config: done here by hand, as its
    example does, so that the model saves and reloads."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    ignored = [m.lm_head]
    for b in m.model.layers:
        a = b.self_attn
        ignored += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, b.mlp.down_proj]
    example = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    pruner = tp.pruner.MetaPruner(m, example_inputs=example, importance=imp, global_pruning=False, pruning_ratio=ratio,
                                  output_transform=lambda o: o.logits, ignored_layers=ignored)
    pruner.step()
    m.config.intermediate_size = m.model.layers[0].mlp.gate_proj.out_features
    for b in m.model.layers:
        b.mlp.intermediate_size = b.mlp.gate_proj.out_features
    return m, {"format": "stock after a manual config fix", "mlp_removed":
               f"{sum(model.model.layers[i].mlp.gate_proj.out_features - b.mlp.gate_proj.out_features for i, b in enumerate(m.model.layers))}"
               f"/{sum(b.mlp.gate_proj.out_features for b in model.model.layers)}", "tp_version": tp.__version__}


def _timer(model, ids):
    def once() -> float:
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0

    return once


@torch.no_grad()
def paired_prefill(dense, pruned, batch: int, seqlen: int, runs: int, vocab: int) -> dict:
    """Prefill of ``dense`` and ``pruned`` timed alternately (d, p, d, p, ...) on the same prompts, so that a change
    in the machine's load hits both; speed-up = median over the pairs of t_dense / t_pruned."""
    ids = torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    dense.eval()
    pruned.eval()
    td, tp = _timer(dense, ids), _timer(pruned, ids)
    td(), tp()  # warm-up
    pairs = [(td(), tp()) for _ in range(runs)]
    tokens = batch * seqlen
    return {"dense_tps": tokens / statistics.median(d for d, _ in pairs),
            "tps": tokens / statistics.median(p for _, p in pairs),
            "speedup": statistics.median(d / p for d, p in pairs)}


def device_check() -> None:
    """The statistics passes on the GPU (``device="cuda"``) must choose what the CPU chooses: a random Llama (GQA)
    pruned both ways from the same weights; prints seconds, whether the per-layer sizes and removed units agree,
    and the relative difference of the two pruned models' logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (32, 256))
    probe = torch.randint(0, cfg.vocab_size, (2, 128))
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    cases = [
        ("heads+mlp 50% fluctuation + bias comp.", {"kinds": ["heads", "mlp"], "sparsity": 0.5, "bias_compensation": True}),
        ("FLAP global 30%", {"kinds": ["heads", "mlp"], "sparsity": 0.3, "global_rank": True, "bias_compensation": True}),
        ("heads 50% kv groups", {"kinds": ["heads"], "sparsity": 0.5, "gqa": "kv"}),
        ("blocks 2", {"remove_layers": 2}),
        ("sublayers 3", {"remove_sublayers": 3}),
    ]
    print(f"{'case':<40} {'cpu s':>7} {'gpu s':>7} {'same sizes':>11} {'same units':>11} {'logits diff':>12}")
    for label, st in cases:
        out = {}
        for dev in ("cpu", "cuda"):
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            m, rep = prunekit.prune(m, {"structure": st}, ids, device=dev, progress=False)
            secs = time.perf_counter() - t0
            with torch.no_grad():
                out[dev] = (secs, rep, m(input_ids=probe).logits)
        (tc, rc, lc), (tg, rg, lg) = out["cpu"], out["cuda"]
        keys = ("plan", "removed_layers", "removed_sublayers")
        same_units = all(rc.summary.get(k) == rg.summary.get(k) for k in keys)
        diff = float((lc - lg).norm() / lc.norm())
        print(f"{label:<40} {tc:7.2f} {tg:7.2f} {rc.layers == rg.layers!s:>11} {same_units!s:>11} {diff:12.2e}",
              flush=True)


def speed_check(model, calib, seqlen: int, runs: int, vocab: int, n_layers: int, out: Path) -> None:
    """The issue's two speed targets measured with many pairs: median speed-up and its quartiles."""
    cases = [("heads+mlp 50% fluctuation + bias comp.", {"kinds": ["heads", "mlp"], "sparsity": 0.5, "bias_compensation": True}, 1.7),
             (f"blocks 25% ({int(0.25 * n_layers + 0.5)} of {n_layers})", {"remove_layers": int(0.25 * n_layers + 0.5)}, 1.3)]
    lines = [f"Speed targets, {runs} dense/pruned pairs per batch size, {seqlen}-token prefill, torch threads "
             f"{torch.get_num_threads()}, {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}.", "",
             "| config | batch | median speed-up | quartiles | target | met |", "|---|---|---|---|---|---|"]
    for label, st, target in cases:
        m, _ = prunekit.prune(copy.deepcopy(model), {"structure": st}, calib, progress=False)
        for b in (1, 8):
            ids = torch.randint(0, vocab, (b, seqlen), generator=torch.Generator().manual_seed(0))
            td, tp = _timer(model, ids), _timer(m, ids)
            with torch.no_grad():
                td(), tp()
                ratios = sorted(d / p for d, p in ((td(), tp()) for _ in range(runs)))
            q = statistics.quantiles(ratios, n=4)
            med = statistics.median(ratios)
            lines.append(f"| {label} | {b} | {med:.2f} | {q[0]:.2f}-{q[2]:.2f} | {target} | {'yes' if med >= target else 'no'} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    path = out.parent / (out.name + "_speed.md")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print("\n" + text)


def main() -> None:
    if "--device-check" in sys.argv:
        device_check()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2 (a smoke test)")
    ap.add_argument("--greedy", action="store_true", help="also FinerCut greedy sublayer rows (slow)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--speed-check", action="store_true",
                    help="only the two speed targets (50%% heads+mlp, 25%% blocks), with --runs pairs (e.g. 21)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.tiny:
        sys.path.insert(0, str(HERE.parent))
        from tests.conftest import byte_tokenizer, tiny_model

        model, tok, name, seqlen, samples = tiny_model("llama", hidden=64, layers=4), byte_tokenizer(), "tiny llama", 64, 8
    else:
        model, tok = prunekit.load_model("smollm2-135m")
        name, seqlen, samples = "SmolLM2-135M", 256, 32
    out = Path(args.out or HERE / "results" / ("llm_structured_tiny" if args.tiny else "llm_structured"))
    bos = bos_id(tok)  # windows start with BOS when the tokenizer adds one (SmolLM2: no)
    calib = calibration_batches(tokenize(tok, prunekit.load_text("shakespeare", "calibration")), samples, seqlen, bos=bos)
    windows = evaluation_windows(tokenize(tok, prunekit.load_text("shakespeare", "evaluation")), seqlen, 16, bos=bos)
    vocab = model.config.vocab_size
    n_layers = model.config.num_hidden_layers

    def speed(m):
        out = {}
        for b in (1, 8):
            r = paired_prefill(model, m, b, seqlen, args.runs, vocab)
            out.update({f"tps_b{b}": r["tps"], f"dense_tps_b{b}": r["dense_tps"], f"speedup_b{b}": r["speedup"]})
        out["loadavg"] = os.getloadavg()[0]
        return out

    if args.speed_check:
        speed_check(model, calib, seqlen, args.runs, vocab, n_layers, out)
        return
    dense_params = count_params(model)
    dense_ppl = perplexity(model, windows)
    print(f"dense: ppl {dense_ppl:.2f}  params {dense_params:,}", flush=True)
    rows = []
    for label, st in configs(n_layers, args.quick, args.greedy):
        t0 = time.perf_counter()
        if st.get("peer") == "torch-pruning":
            try:
                m, summ = torch_pruning_mlp(model, st["sparsity"], vocab)
            except ImportError:
                print(f"{label}: skipped (pip install torch-pruning --no-deps)", flush=True)
                continue
        else:
            m, rep = prunekit.prune(copy.deepcopy(model), {"structure": st}, calib, progress=False)
            summ = rep.summary
        prune_s = time.perf_counter() - t0
        row = {"config": label, "structure": st, "params": count_params(m), "perplexity": perplexity(m, windows),
               "prune_s": prune_s, "format": summ["format"], **speed(m),
               "heads_removed": summ.get("heads_removed"), "mlp_removed": summ.get("mlp_removed"),
               "hidden_removed": summ.get("hidden_removed"), "removed_layers": summ.get("removed_layers"),
               "removed_sublayers": summ.get("removed_sublayers")}
        rows.append(row)
        print(f"{label:<42} ppl {row['perplexity']:9.2f}  params {row['params'] / dense_params:.3f}  "
              f"b1 {row['tps_b1']:6.0f} ({row['speedup_b1']:.2f}x)  b8 {row['tps_b8']:6.0f} ({row['speedup_b8']:.2f}x) "
              f"tok/s  {prune_s:5.1f}s  {row['format']}  load {row['loadavg']:.1f}", flush=True)
        del m
    base = {b: statistics.median(r[f"dense_{b}"] for r in rows) for b in ("tps_b1", "tps_b8")}

    lines = [
        (f"{name}; calibration {samples} x {seqlen} tokens (calibration plays); perplexity on 16 x {seqlen} tokens of "
        f"held-out plays; prefill = one {seqlen}-token forward pass filling the KV cache with last-position logits, "
        f"median of {args.runs} runs, torch threads {args.threads}. {platform.machine()} CPU, {os.cpu_count()} cores, "
        f"torch {torch.__version__}. Each speed-up is the median over {args.runs} pairs of dense and pruned timed "
        "alternately; the dense row gives the median of all dense timings."),
        "",
        "| config | removed | params | perplexity | x dense | prefill b1 tok/s | speed-up b1 | prefill b8 tok/s | speed-up b8 | saved as | prune s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | - | {dense_params / 1e6:.1f}M | {dense_ppl:.2f} | 1.00 | {base['tps_b1']:.0f} | 1.00 | {base['tps_b8']:.0f} | 1.00 | - | - |",
    ]
    for r in rows:
        removed = ", ".join(x for x in (
            r["heads_removed"] and f"heads {r['heads_removed']}", r["mlp_removed"] and f"mlp {r['mlp_removed']}",
            r.get("hidden_removed") and f"hidden {r['hidden_removed']}",
            r["removed_layers"] and f"layers {r['removed_layers']}",
            r["removed_sublayers"] and f"sublayers {' '.join(r['removed_sublayers'])}") if x)
        lines.append(
            f"| {r['config']} | {removed} | {r['params'] / 1e6:.1f}M | {r['perplexity']:.2f} | {r['perplexity'] / dense_ppl:.2f} | "
            f"{r['tps_b1']:.0f} | {r['speedup_b1']:.2f} | {r['tps_b8']:.0f} | {r['speedup_b8']:.2f} | {r['format']} | {r['prune_s']:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"model": name, "dense": {"params": dense_params, "perplexity": dense_ppl, **base},
            "rows": rows, "threads": args.threads, "runs": args.runs}
    for suffix, text in ((".md", table + "\n"), (".json", json.dumps(data, indent=2, default=str))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))


if __name__ == "__main__":
    main()

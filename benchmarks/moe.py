"""Mixture-of-experts: expert pruning and merging (prunekit.structure.experts) on a MoE trained here.

No pretrained MoE ships offline, so ``prunekit.zoo.moe`` trains one once (a stock Mixtral: 4 layers, 8 experts,
top-2, on an even mixture of Shakespeare and the Python reference; about 15 minutes on a 2-core CPU) and caches it.

Parts (``--parts``, default all):
* ``routing``: on each domain's held-out text, the share of routed slots each expert of each layer receives, and
  per layer the total-variation distance between the two domains' shares (0: the same experts, 1: disjoint).
* ``quality``: held-out perplexity of each domain after keeping 4 of 8 (50% removed) and 2 of 8 (75%) experts per
  layer, by frequency, reap, enumerate and merge (and reap + router re-calibration), calibrated on the mixture or
  on one domain only (the task-specific setting: the kept domain should hold, the other may fall).
* ``peer``: llm-compressor 0.14.0.1's ``REAPPruningModifier`` on the same model and calibration windows (a
  --no-deps install into ~/.cache/prunekit/peers/llmcompressor when the ``peers`` extra is not installed).
* ``speed``: parameters, checkpoint bytes, prefill and decode tokens/s before and after; the saved model is loaded
  with stock ``AutoModelForCausalLM.from_pretrained`` and its logits compared with prunekit's in-memory model.
* ``upcycle``: SmolLM2-135M sparse-upcycled into an 8-expert Mixtral (0.7B parameters; ``zoo.moe.upcycle_smollm2``,
  router untrained), pruned to 4 and 2 experts by frequency: parameters, checkpoint size, prefill / decode speed.

Writes benchmarks/results/moe.{json,md,png}. Calibration: 64 windows of 128 tokens from the calibration split(s)
(the mixture: 32 from each), seed 0; evaluation: the first 32 windows of 128 tokens of each domain's evaluation
split (Shakespeare: plays never trained on; pydoc: the last 20% of topics).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_json, machine  # noqa: E402

import prunekit  # noqa: E402
from prunekit.batches import calibration_batches, evaluation_windows  # noqa: E402
from prunekit.evaluate import perplexity  # noqa: E402
from prunekit.zoo.moe import DOMAINS, domain_ids, load_mix_moe, moe_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("frequency", "reap", "enumerate", "merge")
KEEPS = (4, 2)
CALIBS = ("mix", "shakespeare", "pydoc")
SAMPLES, SEQLEN, EVAL_WINDOWS = 64, 128, 32


def calib_windows(tok, which: str) -> torch.Tensor:
    ids = domain_ids(tok, "calibration")
    if which == "mix":
        return torch.cat([calibration_batches(ids[d], SAMPLES // 2, SEQLEN, seed=i) for i, d in enumerate(DOMAINS)])
    return calibration_batches(ids[which], SAMPLES, SEQLEN, seed=0)


def eval_sets(tok) -> dict[str, torch.Tensor]:
    return {d: evaluation_windows(ids, SEQLEN, EVAL_WINDOWS) for d, ids in domain_ids(tok, "evaluation").items()}


def ppl(model, evals) -> dict[str, float]:
    return {d: round(float(perplexity(model, w)), 3) for d, w in evals.items()}


@torch.no_grad()
def part_routing(model, evals) -> dict:
    from prunekit.arch import adapter_for
    from prunekit.structure.experts import route

    ad = adapter_for(model)
    layers = ad.moe_layers(model)
    got = {d: {} for d in evals}
    for d, w in evals.items():
        rows = {}
        hooks = [moe.register_forward_pre_hook(lambda m, a, i=i: rows.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
                 for i, moe in layers]
        model(input_ids=w, use_cache=False)
        for h in hooks:
            h.remove()
        for i, moe in layers:
            _, _, idx = route(ad.router(moe), torch.cat(rows[i]))
            counts = torch.bincount(idx.reshape(-1), minlength=ad.router(moe).weight.shape[0]).double()
            got[d][str(i)] = (counts / counts.sum()).tolist()
    tv = {str(i): 0.5 * sum(abs(a - b) for a, b in zip(got[DOMAINS[0]][str(i)], got[DOMAINS[1]][str(i)]))
          for i, _ in layers}
    return {"shares": got, "total_variation": tv}


def part_quality(base, tok, evals, dense) -> list[dict]:
    rows = []
    for calib in CALIBS:
        cal = calib_windows(tok, calib)
        for keep in KEEPS:
            runs = [(m, 0, True) for m in METHODS] + ([("reap", 200, True)] if keep == 4 else [])
            if calib == "mix":
                runs.append(("merge", 0, False))  # what the neuron alignment is worth
            for method, steps, align in runs:
                model = copy.deepcopy(base)
                ex = {"method": method, "keep": keep}
                if steps:
                    ex.update(recalibrate_steps=steps, recalibrate_lr=1e-3)
                if not align:
                    ex["align"] = False
                t0 = time.perf_counter()
                _, rep = prunekit.prune(model, {"experts": ex}, cal, progress=False)
                secs = time.perf_counter() - t0
                p = ppl(model, evals)
                name = method + ("+router" if steps else "") + ("" if align else " (no alignment)")
                row = {"calib": calib, "keep": keep, "method": name, "ppl": p,
                       "ratio": {d: round(p[d] / dense[d], 3) for d in p}, "prune_s": round(secs, 2),
                       "kept": rep.summary["kept"], "params": rep.summary["params"]}
                if "router_recalibration" in rep.summary:
                    row["router_error"] = rep.summary["router_recalibration"]
                rows.append(row)
                print(f"  calib {calib:11s} keep {keep}  {row['method']:13s} ppl " +
                      "  ".join(f"{d} {p[d]:8.2f} ({row['ratio'][d]:.2f}x)" for d in p) + f"  {secs:.1f} s", flush=True)
    return rows


def part_peer(base, tok, evals, dense) -> dict:
    import peers_llmcompressor as peers

    if not peers.ensure_llmcompressor():
        return {"error": "llmcompressor could not be installed here"}
    from importlib.metadata import version

    out = {"version": version("llmcompressor"), "rows": []}
    for calib in CALIBS:
        cal = calib_windows(tok, calib)
        for keep in KEEPS:
            model = copy.deepcopy(base)
            try:
                secs, retained = peers.run_reap(model, 1 - keep / 8, cal)
            except Exception as e:  # noqa: BLE001 - the peer's failure is a result, reported
                out["rows"].append({"calib": calib, "keep": keep, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"  peer calib {calib} keep {keep}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            p = ppl(model, evals)
            out["rows"].append({"calib": calib, "keep": keep, "ppl": p, "ratio": {d: round(p[d] / dense[d], 3) for d in p},
                                "prune_s": round(secs, 2), "kept": {k.split(".")[-2]: sorted(v) for k, v in retained.items()}})
            print(f"  peer calib {calib:11s} keep {keep}  llmcompressor reap ppl "
                  + "  ".join(f"{d} {p[d]:8.2f}" for d in p) + f"  {secs:.1f} s", flush=True)
    return out


@torch.no_grad()
def speed(model, prompt: torch.Tensor, batch: torch.Tensor) -> dict:
    def timed(fn, n=5):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    pre = timed(lambda: model(input_ids=batch, use_cache=False))
    new = 48
    dec = timed(lambda: model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False), n=3)
    return {"prefill_tok_s": round(batch.numel() / pre, 1), "decode_tok_s": round(new / dec, 1)}


def part_speed(base, tok, evals) -> dict:
    from transformers import AutoModelForCausalLM

    cal = calib_windows(tok, "mix")
    batch = evals[DOMAINS[0]][:8]
    prompt = evals[DOMAINS[0]][:1, :16]
    out = {}
    for keep in (8, 4, 2):
        model = copy.deepcopy(base)
        rep = None
        if keep < 8:
            _, rep = prunekit.prune(model, {"experts": {"method": "reap", "keep": keep}}, cal, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "m"
            prunekit.save(model, tok, d, rep.to_dict() if rep else None)
            size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
            back = AutoModelForCausalLM.from_pretrained(d).eval()
            with torch.no_grad():
                diff = float((back(input_ids=batch, use_cache=False).logits - model(input_ids=batch, use_cache=False).logits).abs().max())
            experts = back.config.num_local_experts
        row = {"params": sum(p.numel() for p in model.parameters()), "checkpoint_bytes": size, "stock_experts": experts,
               "stock_reload_max_abs_logit_diff": diff, **speed(model, prompt, batch)}
        out[str(keep)] = row
        print(f"  keep {keep}: {row}", flush=True)
    return out


def part_upcycle() -> dict:
    """SmolLM2-135M upcycled to 8 experts (0.7B parameters, router untrained): size and speed at 8 / 4 / 2 experts."""
    from prunekit.batches import tokenize
    from prunekit.zoo.moe import upcycle_smollm2
    from prunekit.zoo.text import load_text

    base, tok = upcycle_smollm2()
    cal = calibration_batches(tokenize(tok, load_text("shakespeare", "calibration")), 16, SEQLEN, seed=0)
    ev = evaluation_windows(tokenize(tok, load_text("shakespeare", "evaluation")), SEQLEN, 16)
    out = {}
    for keep in (8, 4, 2):
        model = copy.deepcopy(base) if keep < 8 else base
        t0 = time.perf_counter()
        if keep < 8:
            prunekit.prune(model, {"experts": {"method": "frequency", "keep": keep}}, cal, progress=False)
        secs = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "m"
            prunekit.save(model, tok, d)
            size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        row = {"params": sum(p.numel() for p in model.parameters()), "checkpoint_bytes": size, "prune_s": round(secs, 1),
               "shakespeare_ppl": round(float(perplexity(model, ev)), 3), **speed(model, ev[:1, :16], ev[:4])}
        out[str(keep)] = row
        print(f"  upcycled SmolLM2, keep {keep}: {row}", flush=True)
        if keep < 8:
            del model
    return out


def targets(res: dict) -> list[str]:
    lines = []
    q = res.get("quality") or []
    dense = res.get("dense_ppl") or {}

    def find(calib, keep, method):
        return next((r for r in q if r["calib"] == calib and r["keep"] == keep and r["method"] == method), None)

    for d in DOMAINS:
        best = [r for r in (find(d, 4, "reap"), find(d, 4, "merge"), find(d, 4, "reap+router")) if r]
        if best:
            b = min(best, key=lambda r: r["ppl"][d])
            ok = b["ppl"][d] <= 1.10 * dense[d]
            lines.append(f"- calibrated on {d} only, 50% of experts removed: best of reap / merge ({b['method']}) {d} "
                         f"perplexity {b['ppl'][d]:.2f} vs full {dense[d]:.2f} ({b['ratio'][d]:.3f}x; target <= 1.10x) "
                         f"-> {'MET' if ok else 'MISSED'}")
    for calib in CALIBS:
        for keep in KEEPS:
            f = find(calib, keep, "frequency")
            if not f:
                continue
            doms = DOMAINS if calib == "mix" else (calib,)

            def score(r):
                return statistics.geometric_mean([r["ppl"][d] for d in doms])

            for m in ("reap", "enumerate", "merge"):
                r = find(calib, keep, m)
                if r:
                    lines.append(f"- calib {calib}, keep {keep}: {m} {score(r):.2f} vs frequency {score(f):.2f} "
                                 f"({' x '.join(doms)} perplexity{' geometric mean' if len(doms) > 1 else ''}) -> "
                                 f"{'MET' if score(r) < score(f) else 'MISSED'}")
    sp = res.get("speed") or {}
    for k, row in sp.items():
        if k != "8":
            lines.append(f"- keep {k}: saved model reloads with stock AutoModelForCausalLM ({row['stock_experts']} experts), "
                         f"max |logit difference| {row['stock_reload_max_abs_logit_diff']:.1e} -> "
                         f"{'MET' if row['stock_reload_max_abs_logit_diff'] == 0 else 'MISSED'}")
    return lines


def write(res: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    dense = res.get("dense_ppl") or {}
    tr = res.get("train") or {}
    lines = [f"Machine: {res.get('machine')}", "",
             "## The MoE trained here (`prunekit.zoo.moe`, cached)", "",
             f"Mixtral, 4 layers x 8 experts (top-2), {tr.get('params', 0) / 1e6:.1f}M parameters, {tr.get('steps')} steps "
             f"of {tr.get('batch')} x {tr.get('seqlen')} tokens (half Shakespeare, half pydoc) in "
             f"{tr.get('train_seconds', 0) / 60:.1f} min; epochs over each domain's calibration split: "
             + ", ".join(f"{d} {v:.1f}" for d, v in (tr.get("epochs_per_domain") or {}).items())
             + f". Held-out perplexity: " + ", ".join(f"{d} {v:.2f}" for d, v in dense.items()) + ".", ""]
    rt = res.get("routing")
    if rt:
        lines += ["## Routing per domain (share of routed slots, held-out text)", "",
                  "| layer | domain | " + " | ".join(f"e{e}" for e in range(8)) + " | TV distance |",
                  "|---|---|" + "---|" * 9]
        for i in sorted(rt["total_variation"], key=int):
            for d in DOMAINS:
                lines.append(f"| {i} | {d} | " + " | ".join(f"{x:.2f}" for x in rt["shares"][d][i])
                             + f" | {rt['total_variation'][i]:.2f} |")
        lines.append("")
    q = res.get("quality")
    if q:
        lines += ["## Held-out perplexity after removing / merging experts", "",
                  f"Full model: " + ", ".join(f"{d} {v:.2f}" for d, v in dense.items()) + ".", "",
                  "| calibrated on | experts kept | method | " + " | ".join(f"{d} ppl (x full)" for d in DOMAINS) + " | prune s |",
                  "|---|---|---|" + "---|" * (len(DOMAINS) + 1)]
        for r in q:
            lines.append(f"| {r['calib']} | {r['keep']} of 8 | {r['method']} | "
                         + " | ".join(f"{r['ppl'][d]:.2f} ({r['ratio'][d]:.2f}x)" for d in DOMAINS) + f" | {r['prune_s']:.1f} |")
        peer = res.get("peer") or {}
        for r in peer.get("rows", []):
            if "ppl" in r:
                lines.append(f"| {r['calib']} | {r['keep']} of 8 | peer: llmcompressor {peer['version']} REAP | "
                             + " | ".join(f"{r['ppl'][d]:.2f} ({r['ratio'][d]:.2f}x)" for d in DOMAINS) + f" | {r['prune_s']:.1f} |")
            else:
                lines.append(f"| {r['calib']} | {r['keep']} of 8 | peer: llmcompressor REAP | failed: {r['error'][:120]} | | |")
        lines.append("")
        if peer.get("rows"):
            same = []
            for r in peer["rows"]:
                ours = next((x for x in q if x["calib"] == r["calib"] and x["keep"] == r["keep"] and x["method"] == "reap"), None)
                if ours and "kept" in r:
                    same.append(all(sorted(ours["kept"][k]) == sorted(v) for k, v in r["kept"].items()))
            if same:
                lines += [f"Experts kept by prunekit's reap and the peer's: identical in {sum(same)} of {len(same)} runs.", ""]
    sp = res.get("speed")
    if sp:
        lines += ["## Size and speed (reap, mixture calibration; CPU, 2 threads)", "",
                  "| experts kept | params | checkpoint MB | prefill tok/s (8 x 128) | decode tok/s (batch 1) | stock reload max abs logit diff |",
                  "|---|---|---|---|---|---|"]
        for k, r in sp.items():
            lines.append(f"| {k} of 8 | {r['params']:,} | {r['checkpoint_bytes'] / 1e6:.1f} | {r['prefill_tok_s']:.0f} | "
                         f"{r['decode_tok_s']:.1f} | {r['stock_reload_max_abs_logit_diff']:.1e} |")
        lines.append("")
    up = res.get("upcycle")
    if up:
        lines += ["## Sparse-upcycled SmolLM2-135M (8 experts, router untrained: size and speed only)", "",
                  "SmolLM2's MLP copied into 8 experts (+1% noise each), top-2, a random router; pruned by frequency on 16 x 128 "
                  "Shakespeare tokens. Per-token compute is top-2 whatever the expert count.", "",
                  "| experts kept | params | checkpoint GB | Shakespeare ppl | prefill tok/s (4 x 128) | decode tok/s (batch 1) | prune s |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in up.items():
            lines.append(f"| {k} of 8 | {r['params']:,} | {r['checkpoint_bytes'] / 1e9:.2f} | {r['shakespeare_ppl']:.2f} | "
                         f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['prune_s']:.1f} |")
        lines.append("")
    lines += ["## Targets", ""] + targets(res)
    (RESULTS / "moe.md").write_text("\n".join(lines) + "\n")
    plot(res)


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = res.get("quality") or []
    rt = res.get("routing")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    if rt:
        ax = axes[0]
        layers = sorted(rt["shares"][DOMAINS[0]], key=int)
        width = 0.4
        for j, d in enumerate(DOMAINS):
            xs, ys = [], []
            for li, layer in enumerate(layers):
                for e, v in enumerate(rt["shares"][d][layer]):
                    xs.append(li * 9 + e + j * width)
                    ys.append(v)
            ax.bar(xs, ys, width=width, label=d)
        ax.set_xticks([li * 9 + 3.5 for li in range(len(layers))], [f"layer {x}" for x in layers])
        ax.set_ylabel("share of routed slots")
        ax.set_title("routing per domain (held-out text), experts 0-7 per layer")
        ax.legend()
    for ax, keep in zip(axes[1:], KEEPS):
        rows = [r for r in q if r["keep"] == keep]
        labels = [f"{r['method']}\n{r['calib']}" for r in rows]
        x = range(len(rows))
        for j, d in enumerate(DOMAINS):
            ax.bar([i + j * 0.4 for i in x], [r["ratio"][d] for r in rows], width=0.4, label=d)
        ax.axhline(1.1, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks([i + 0.2 for i in x], labels, rotation=90, fontsize=7)
        ax.set_ylabel("held-out perplexity / full model's")
        ax.set_title(f"{keep} of 8 experts kept per layer")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "moe.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="routing,quality,peer,speed,upcycle")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    res = load_json(RESULTS / "moe.json")
    res["machine"] = machine()
    t0 = time.perf_counter()
    base, tok = load_mix_moe()
    res["train"] = json.loads((moe_dir() / "train.json").read_text())
    print(f"MoE: {moe_dir()} (trained in {res['train']['train_seconds'] / 60:.1f} min)", flush=True)
    evals = eval_sets(tok)
    res["dense_ppl"] = ppl(base, evals)
    print(f"full model held-out perplexity: {res['dense_ppl']}", flush=True)
    if "routing" in parts:
        res["routing"] = part_routing(base, evals)
        print(f"routing: TV distance per layer {res['routing']['total_variation']}", flush=True)
    if "quality" in parts:
        res["quality"] = part_quality(base, tok, evals, res["dense_ppl"])
    if "peer" in parts:
        res["peer"] = part_peer(base, tok, evals, res["dense_ppl"])
    if "speed" in parts:
        res["speed"] = part_speed(base, tok, evals)
    if "upcycle" in parts:
        del base
        res["upcycle"] = part_upcycle()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    write(res)
    print("\n".join(targets(res)))
    print(f"wrote {RESULTS / 'moe.md'} in {res['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()

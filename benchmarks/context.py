"""Context pruning for RAG, measured: answer quality vs compression of every method, the pruner's cost against
the reader prefill it saves, and the llmlingua package side by side.

Parts (``--parts``, default all, in this order):
  train    ``prunekit context train``'s cross-encoder (MiniLM + keep and reranking heads) from SmolLM2 silver labels
           on the train part (96 needle + 96 pydoc questions, 3 epochs, listwise + token loss); cached in ~/.cache/prunekit/context/scorer.
  quality  the test part (24 needle + 24 pydoc questions, 5 passages of ~60 words each, ~600 reader tokens):
           keep-all, then provence (bi-encoder MiniLM and the trained cross-encoder), llmlingua, bm25, first-k,
           random at keep 0.3 / 0.5 / 0.7, longllmlingua at 0.5, provence-cross at its default threshold 0.1.
  peer     the llmlingua package (PyPI 0.2.2, in benchmarks/context_peer.py) with the same SmolLM2 as its scorer:
           LLMLingua at the same rates, LongLLMLingua at 0.5, on the same questions, read by the same reader.
  timing   long contexts (8 questions, 7 passages of ~220 words: ~2k context tokens): each
           pruner's time at keep 0.5 against the reader prefill it saves.
The reader is SmolLM2-135M-Instruct, greedy, one prompt (the answer starts with the evidence sentence's words
before the answer, so a 135M reader only has to continue it). Nothing tuned or trained reads the test part.
Writes benchmarks/results/context.json, context.md and context.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import load_json, machine

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
OUT = RESULTS / "context.json"
SCORER = None  # set in main(): the prunekit cache (the scorer is ~90 MB of MiniLM weights)
RATES = (0.3, 0.5, 0.7)
N_NEEDLE, N_PYDOC = 24, 24
# longllmlingua (ours and the peer's) costs several forwards per question: the middle rate only
RATES_OF = {"longllmlingua": (0.5,), "peer longllmlingua": (0.5,)}
METHODS = ("provence-minilm", "provence-cross", "llmlingua", "longllmlingua", "bm25", "first-k", "random")


def load() -> dict:
    return load_json(OUT)


def save(res: dict) -> None:
    from prunekit.io import write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(OUT, res)


def recipe(name: str, keep=None, threshold=None) -> dict:
    if name.startswith("provence"):
        r = {"method": "provence", "scorer": "minilm" if name.endswith("minilm") else str(SCORER)}
    else:
        r = {"method": name}
    if keep is not None:
        r["keep"] = keep
    if threshold is not None:
        r["threshold"] = threshold
    return r


def part_train(res: dict) -> None:
    from prunekit.context.train import TrainRecipe, train_scorer
    from prunekit.io import atomic_dir

    rec = TrainRecipe(**SMALL_TRAIN)
    scorer, metrics, timings = train_scorer(rec)
    with atomic_dir(SCORER) as tmp:
        scorer.save(tmp, rec.model_dump(mode="json"), metrics, timings)
    res["train"] = {"recipe": rec.model_dump(mode="json"), "metrics": metrics, "timings": timings}
    print(f"train: {metrics} {timings}", flush=True)


def part_quality(res: dict, reader) -> None:
    from prunekit.context import Pruner, qa
    from prunekit.context.bench import run

    items = qa.build("test", N_NEEDLE, N_PYDOC)
    rows = res.setdefault("quality", {})
    base = rows.get("keep-all") or run(items, "keep-all", Pruner(method="keep-all"), reader)
    rows["keep-all"] = base
    save(res)
    loaded = None
    todo = [(m, k, None) for m in METHODS for k in RATES_OF.get(m, RATES)] + [("provence-cross", None, 0.1)]
    for m, k, t in todo:
        label = f"{m} keep={k}" if k is not None else f"{m} threshold={t}"
        if label in rows:
            continue
        loaded = Pruner.like(loaded, recipe(m, k, t))
        rows[label] = {**run(items, label, loaded, reader, base=base), "family": m, "rate": k}
        r = rows[label]
        print(f"{label}: kept {r['kept']:.3f} exact {r['exact']:.3f} loglik {r['loglik']:.2f} evidence "
              f"{r['evidence']:.3f} pruner {r['pruner_s']:.3f}s", flush=True)
        save(res)


def peer_compress(items, rates, modes) -> dict:
    from prunekit.zoo.models import smollm2_dir

    with tempfile.TemporaryDirectory() as d:
        inp, outp = Path(d) / "in.json", Path(d) / "out.json"
        inp.write_text(json.dumps({"model_dir": str(smollm2_dir()), "rates": list(rates), "modes": list(modes),
                                   "items": [{"question": it.question, "passages": it.passages} for it in items]}))
        p = subprocess.run([sys.executable, str(ROOT / "context_peer.py"), str(inp), str(outp)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"the llmlingua peer failed:\n{p.stderr[-3000:]}")
        return json.loads(outp.read_text())


def part_peer(res: dict, reader) -> None:
    from prunekit.context import qa
    from prunekit.context.bench import run

    items = qa.build("test", N_NEEDLE, N_PYDOC)
    base = res["quality"]["keep-all"]
    t0 = time.perf_counter()
    peer = peer_compress(items, RATES, ("llmlingua",))
    peer["results"].update(peer_compress(items, RATES_OF["peer longllmlingua"], ("longllmlingua",))["results"])
    print(f"peer compressed in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = res.setdefault("quality", {})
    res["peer_notes"] = peer["notes"]
    res["peer_version"] = peer["llmlingua_version"]
    for key, pruned in peer["results"].items():
        mode, rate = key.split("@")
        label = f"peer {mode} keep={float(rate)}"
        rows[label] = {**run(items, label, None, reader, pruned=pruned, base=base), "family": f"peer {mode}",
                       "rate": float(rate)}
        r = rows[label]
        print(f"{label}: kept {r['kept']:.3f} exact {r['exact']:.3f} loglik {r['loglik']:.2f} evidence "
              f"{r['evidence']:.3f} pruner {r['pruner_s']:.3f}s", flush=True)
        save(res)


def part_timing(res: dict, reader) -> None:
    from prunekit.context import Pruner, qa
    from prunekit.context.bench import run

    items = qa.needle_items("test", 4, passages=7, words=220, seed=1) + qa.pydoc_items("test", 4, passages=7, words=220,
                                                                             seed=1)
    rows = {}
    rows["keep-all"] = base = run(items, "keep-all (long)", Pruner(method="keep-all"), reader)
    loaded = None
    for m in ("provence-minilm", "provence-cross", "llmlingua", "longllmlingua", "bm25"):
        loaded = Pruner.like(loaded, recipe(m, 0.5))
        loaded(items[0].question, items[0].passages)  # warm
        rows[m] = run(items, f"{m} (long)", loaded, reader, base=base)
    peer = peer_compress(items, (0.5,), ("llmlingua",))
    rows["peer llmlingua"] = run(items, "peer llmlingua (long)", None, reader, pruned=peer["results"]["llmlingua@0.5"], base=base)
    res["timing"] = rows
    for k, r in rows.items():
        print(f"long {k}: context tokens {r['tokens']:.0f} pruner {r['pruner_s']:.3f}s prefill {r['prefill_s']:.3f}s "
              f"saved {r['saved_s']:.3f}s", flush=True)
    save(res)


def report(res: dict) -> None:
    from prunekit.context.bench import table

    q = res.get("quality", {})
    lines = [f"Machine: {res.get('machine', '?')}", ""]
    if "train" in res:
        m, t = res["train"]["metrics"], res["train"]["timings"]
        lines += ["## The cross-encoder prunekit trains (`prunekit context train` defaults)", "",
                  f"{m['questions']} training questions, {m['relevant_sentences']} of {m['sentences']} sentences "
                  f"labelled relevant by SmolLM2, {m['windows']} windows, {m['steps']} steps; silver labels "
                  f"{t['labels_s']:.0f} s{' (read back from the cache)' if m.get('labels_cached') else ''}, "
                  f"training {t['train_s']:.0f} s.", ""]
    if q:
        order = ["keep-all"] + [k for f in METHODS + ("peer llmlingua", "peer longllmlingua") for k in q
                                if q[k].get("family") == f]
        lines += [f"## Test part: {N_NEEDLE} needle + {N_PYDOC} pydoc questions, 5 passages each "
                  f"(keep-all: {q['keep-all']['tokens']:.0f} context tokens)", ""]
        lines += table([q[k] for k in order if k in q])
        lines += ["", "By task (exact match / evidence kept / kept share):", "",
                  "| method | needle exact | needle evidence | pydoc exact | pydoc evidence | kept |", "|---|---|---|---|---|---|"]
        for k in order:
            if k in q:
                r = q[k]
                lines.append(f"| {k} | {r['needle']['exact']:.3f} | {r['needle']['evidence']:.3f} | "
                             f"{r['pydoc']['exact']:.3f} | {r['pydoc']['evidence']:.3f} | {r['kept']:.2f} |")
    if "timing" in res:
        n = res["timing"]["keep-all"]["tokens"]
        lines += ["", f"## Long contexts: {n:.0f} context tokens on average (8 questions, 7 passages, keep 0.5)", "",
                  "| method | context tokens | pruner s | reader prefill s | prefill saved s | pruner < saved |",
                  "|---|---|---|---|---|---|"]
        for k, r in res["timing"].items():
            lines.append(f"| {k} | {r['tokens']:.0f} | {r['pruner_s']:.3f} | {r['prefill_s']:.3f} | {r['saved_s']:.3f} | "
                         f"{'-' if k == 'keep-all' else ('yes' if r['pruner_s'] < r['saved_s'] else 'no')} |")
    lines += ["", "## Targets", ""] + targets(res)
    if res.get("peer_notes"):
        lines += ["", f"## Peer: llmlingua {res.get('peer_version')} (what was needed to run it here)", ""]
        lines += [f"* {n}" for n in res["peer_notes"]]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(res)


def targets(res: dict) -> list[str]:
    q = res.get("quality", {})
    out = []
    if "keep-all" not in q:
        return out
    base = q["keep-all"]
    for f in METHODS + ("peer llmlingua", "peer longllmlingua"):
        r = q.get(f"{f} keep=0.5")
        if r:
            ok = r["exact"] >= base["exact"] and r["needle"]["evidence"] >= 0.95
            out.append(f"- keep 0.5, {f}: exact {r['exact']:.3f} vs keep-all {base['exact']:.3f}, needle evidence "
                       f"{r['needle']['evidence']:.3f} -> {'MET' if ok else 'MISSED'}")
    for prov in ("provence-cross", "provence-minilm"):
        for rate in RATES:
            a, b = q.get(f"{prov} keep={rate}"), q.get(f"peer llmlingua keep={rate}")
            if a and b:
                ok = a["exact"] >= b["exact"] and a["loglik"] >= b["loglik"]
                speed = b["pruner_s"] / max(a["pruner_s"], 1e-9)
                out.append(f"- {prov} vs peer llmlingua at keep {rate}: exact {a['exact']:.3f} vs {b['exact']:.3f}, "
                           f"loglik {a['loglik']:.2f} vs {b['loglik']:.2f} (kept {a['kept']:.2f} vs {b['kept']:.2f}) "
                           f"-> {'MET' if ok else 'MISSED'}; {speed:.1f}x faster -> {'MET' if speed >= 5 else 'MISSED'}")
    for k, r in res.get("timing", {}).items():
        if k != "keep-all":
            out.append(f"- {res['timing']['keep-all']['tokens']:.0f}-token contexts, {k}: pruner {r['pruner_s']:.3f} s vs prefill saved {r['saved_s']:.3f} s -> "
                       f"{'MET' if r['pruner_s'] < r['saved_s'] else 'MISSED'}")
    a, b = q.get("provence-cross keep=0.3"), q.get("provence-minilm keep=0.3")
    if a and b:
        out.append(f"- trained cross-encoder vs bi-encoder on the held-out part: evidence MRR {a['mrr']:.3f} vs "
                   f"{b['mrr']:.3f}, exact at keep 0.3 {a['exact']:.3f} vs {b['exact']:.3f} -> "
                   f"{'MET' if a['mrr'] > b['mrr'] else 'MISSED'}")
    return out


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = res.get("quality", {})
    if not q:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for f in METHODS + ("peer llmlingua", "peer longllmlingua"):
        pts = sorted((r["kept"], r["exact"], r["loglik"]) for r in q.values() if r.get("family") == f and r.get("rate"))
        if pts:
            style = "--" if f.startswith("peer") else "-"
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=f)
    base = q["keep-all"]
    for ax, key, name in ((axes[0], "exact", "reader exact match"), (axes[1], "loglik", "log p(gold answer)")):
        ax.axhline(base[key], color="k", lw=0.8, ls=":", label="keep-all")
        ax.set_xlabel("share of the context kept (reader tokens)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Context pruning: SmolLM2-135M-Instruct reading {base['n']} test questions")
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=110)


SMALL_TRAIN: dict = {}


def main() -> None:
    global SCORER, OUT, N_NEEDLE, N_PYDOC, SMALL_TRAIN
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="train,quality,peer,timing", help="comma-separated; 'report' only rewrites the tables")
    ap.add_argument("--smoke", action="store_true", help="a few questions, a tiny training; writes context-smoke.json")
    args = ap.parse_args()
    from prunekit.zoo.models import cache_dir

    SCORER = cache_dir() / "context" / ("scorer-smoke" if args.smoke else "scorer")
    if args.smoke:
        OUT, N_NEEDLE, N_PYDOC = RESULTS / "context-smoke.json", 2, 2
        SMALL_TRAIN = {"needle": 2, "pydoc": 2, "epochs": 1}
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    res = load()
    res["machine"] = machine()
    parts = args.parts.split(",")
    reader = None
    if set(parts) & {"quality", "peer", "timing"}:
        from prunekit.context.reader import Reader

        reader = Reader()
    t0 = time.perf_counter()
    if "train" in parts:
        part_train(res)
        # rows of an earlier scorer are stale (the other methods do not read it)
        res["quality"] = {k: v for k, v in res.get("quality", {}).items() if v.get("family") != "provence-cross"}
        res.get("timing", {}).pop("provence-cross", None)
        save(res)
    if "quality" in parts:
        part_quality(res, reader)
    if "peer" in parts:
        part_peer(res, reader)
    if "timing" in parts:
        part_timing(res, reader)
    if set(parts) & {"train", "quality", "peer", "timing"}:
        res.setdefault("seconds", {})[",".join(parts)] = time.perf_counter() - t0
    save(res)
    report(res)


if __name__ == "__main__":
    main()

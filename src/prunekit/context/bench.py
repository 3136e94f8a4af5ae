"""What ``prunekit context bench`` and ``benchmarks/context.py`` measure: each method at each rate on the test
part of :mod:`prunekit.context.qa`, read by the same reader with the same prompt.

Per row: ``exact`` (the reader's exact match), ``contains`` (the answer anywhere in its first line),
``loglik`` (mean log p(gold answer)), ``evidence`` (the answer still in the pruned gold passage), ``mrr`` (sentence
methods: mean reciprocal rank of the evidence sentence among all sentences of the context), ``kept`` (the
share of the context's reader tokens kept), ``prefill_s`` (the reader's prefill), ``saved_s`` (keep-all's prefill
minus this one, per question), ``pruner_s`` (the pruner's time per question).
"""

from __future__ import annotations

from prunekit.context import Pruner, qa
from prunekit.context.split import split_sentences
from prunekit.core.progress import bar


def context_tokens(tok, passages: list[str]) -> int:
    return sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in passages if p)


def evidence_rrank(item, scores: list[list[float]]) -> float | None:
    """1 / rank of the evidence sentence among every sentence of the context (ties counted against it)."""
    sents = split_sentences(item.passages[item.gold])
    ev = qa.normalize(item.evidence)
    idx = [i for i, s in enumerate(sents) if ev and ev in qa.normalize(s) or qa.normalize(s) and qa.normalize(s) in ev]
    if not idx or len(scores[item.gold]) != len(sents):
        return None
    mine = max(scores[item.gold][i] for i in idx)
    above = sum(1 for p in scores for s in p if s >= mine) - 1
    return 1.0 / (above + 1)


def run(items, label: str, pruner=None, reader=None, pruned=None, base: dict | None = None,
        progress: bool = True) -> dict:
    """One row: ``pruner`` (a :class:`~prunekit.context.Pruner`) or ``pruned`` (precomputed per item: dicts with
    ``passages``, ``order``, ``seconds``, e.g. from a peer) read by ``reader``."""
    rows = []
    for k, it in enumerate(bar(items, desc=label, unit="question", enabled=progress)):
        if pruner is not None:
            p = pruner(it.question, it.passages)
            passages, order, secs, scores = p.passages, p.order, p.seconds, p.scores
        else:
            d = pruned[k]
            passages, order, secs, scores = d["passages"], d.get("order"), d.get("seconds", 0.0), None
        rd = reader.read(it.question, passages, it.answer, order, it.prefix)
        rows.append({"exact": rd.exact, "contains": rd.contains, "loglik": rd.loglik,
                     "evidence": qa.evidence_kept(it, passages),
                     "rr": evidence_rrank(it, scores) if scores is not None else None,
                     "tokens": context_tokens(reader.tok, passages), "prefill_s": rd.prefill_s, "pruner_s": secs,
                     "task": it.task})
    return summarize(label, rows, base)


def summarize(label: str, rows: list[dict], base: dict | None) -> dict:
    mean = lambda k, rs=rows: sum(float(r[k]) for r in rs) / max(len(rs), 1)  # noqa: E731
    out = {"method": label, "n": len(rows), "exact": mean("exact"), "contains": mean("contains"),
           "loglik": mean("loglik"), "evidence": mean("evidence"), "prefill_s": mean("prefill_s"),
           "pruner_s": mean("pruner_s"), "tokens": mean("tokens")}
    rr = [r["rr"] for r in rows if r["rr"] is not None]
    out["mrr"] = sum(rr) / len(rr) if rr else None
    for task in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == task]
        out[task] = {k: mean(k, sub) for k in ("exact", "contains", "loglik", "evidence", "tokens")}
    out["per_question"] = [{k: r[k] for k in ("exact", "evidence", "tokens", "prefill_s", "pruner_s")} for r in rows]
    if base is not None:
        out["kept"] = out["tokens"] / max(base["tokens"], 1e-9)
        out["saved_s"] = base["prefill_s"] - out["prefill_s"]
        for task in sorted({r["task"] for r in rows}):
            out[task]["kept"] = out[task]["tokens"] / max(base[task]["tokens"], 1e-9)
    else:
        out["kept"], out["saved_s"] = 1.0, 0.0
    return out


def table(rows: list[dict]) -> list[str]:
    lines = ["| method | kept | exact | contains | loglik | evidence | MRR | pruner s | prefill s | saved s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mrr = f"{r['mrr']:.3f}" if r.get("mrr") is not None else "-"
        lines.append(f"| {r['method']} | {r['kept']:.2f} | {r['exact']:.3f} | {r['contains']:.3f} | {r['loglik']:.2f} | "
                     f"{r['evidence']:.3f} | {mrr} | {r['pruner_s']:.3f} | {r['prefill_s']:.3f} | {r['saved_s']:.3f} |")
    return lines

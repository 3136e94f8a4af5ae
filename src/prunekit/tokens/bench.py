"""What ``prunekit tokens bench`` and ``benchmarks/tokens.py`` measure: quality and throughput of a token recipe
against the unpatched model, on real data that ships here.

* ``minilm-l6`` (all-MiniLM-L6-v2, real weights): a retrieval task built offline from CPython's pydoc topics
  (every section of every topic: query = its heading, or its first sentence; document = the section body without
  that sentence), recall@1 and @10 of the patched encoder's embeddings (mean pooling), mean cosine between
  patched and dense embeddings of held-out Shakespeare paragraphs, throughput on windows of exactly 256 / 512
  real tokens at batch 1 and 16.
* ``vit-fashion``: a ViT (Hugging Face ``ViTForImageClassification``, 32x32 inputs, 4x4 patches: 64 tokens +
  class) trained here on Fashion-MNIST by :func:`prunekit.zoo.vit.fashion_vit` (cached); top-1 on the 10k test
  images and images/s at batch 1 and 64.
"""

from __future__ import annotations

import re
import statistics
import time

import torch

from prunekit.core.progress import bar
from prunekit.errors import PruneError
from prunekit.tokens import apply, mean_pool
from prunekit.zoo.text import pydoc_sections  # noqa: F401  (where the tests look for it)

MODELS = ("minilm-l6", "vit-fashion")


def load_minilm():
    """A fresh (model, tokenizer) pair: token benchmarks patch the model, so it is never the shared one."""
    from prunekit.zoo.minilm import load_minilm as load

    return load(fresh=True)


@torch.no_grad()
def encode(model, tok, texts: list[str], handle=None, max_length: int = 256, batch_size: int = 32) -> torch.Tensor:
    """Normalized mean-pooled embeddings (the sentence-transformers recipe of all-MiniLM-L6-v2)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state
        e = mean_pool(h, enc["attention_mask"], handle)
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def recall(q: torch.Tensor, d: torch.Tensor, gold: torch.Tensor, ks=(1, 10)) -> dict:
    sims = q @ d.T
    rank = (sims > sims.gather(1, gold[:, None])).sum(1)  # documents scored above the right one
    return {f"recall@{k}": float((rank < k).float().mean()) for k in ks}


def text_windows(tok, length: int, n: int) -> torch.Tensor:
    """``n`` windows of exactly ``length`` token ids of pydoc text ([CLS] ... [SEP]), no padding."""
    from prunekit.zoo.text import load_text

    ids = tok(load_text("pydoc", "evaluation"), add_special_tokens=False, verbose=False)["input_ids"]
    body = length - 2
    if len(ids) < body * n:
        raise PruneError(f"The pydoc text has too few tokens for {n} windows of {length}.")
    rows = [[tok.cls_token_id] + ids[i * body:(i + 1) * body] + [tok.sep_token_id] for i in range(n)]
    return torch.tensor(rows)


@torch.no_grad()
def throughput(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_speedup(model, inputs: dict, recipe, repeats: int = 5) -> tuple[float, float, float]:
    """(dense s, patched s, speed-up) of one forward on ``inputs``: the model is patched once and the handle
    switched off and on between the timed calls (dense and patched interleaved, both warmed up), medians."""
    dense, patched = [], []
    with torch.no_grad():
        h = apply(model, recipe)
        try:
            for on in (False, True, False, True):
                h.enabled = on
                model(**inputs)
            for _ in range(repeats):
                for on, out in ((False, dense), (True, patched)):
                    h.enabled = on
                    t0 = time.perf_counter()
                    model(**inputs)
                    out.append(time.perf_counter() - t0)
        finally:
            h.remove()
    d, p = statistics.median(dense), statistics.median(patched)
    return d, p, d / p


def minilm_rows(recipes: list[dict], lengths=(256, 512), batches=(1, 16), repeats: int = 5, log=print) -> dict:
    """Quality and throughput of each recipe on MiniLM (see the module docstring)."""
    from prunekit.zoo.text import load_text

    model, tok = load_minilm()
    sections = pydoc_sections()
    queries = [s[0] for s in sections] + [s[1] for s in sections]
    gold = torch.arange(len(sections)).repeat(2)
    docs = [s[2] for s in sections]
    paras = [" ".join(p.split()) for p in load_text("shakespeare", "evaluation").split("\n\n")]
    paras = [p for p in paras if len(p) > 200][:256]
    dense_docs = encode(model, tok, docs)
    dense_q = encode(model, tok, queries)
    dense_p = encode(model, tok, paras)
    windows = {L: text_windows(tok, L, max(batches)) for L in lengths}
    rows = []
    for rec in bar(recipes, desc="token recipes", unit="recipe"):
        h = apply(model, rec)
        d, q, p = encode(model, tok, docs, h), encode(model, tok, queries, h), encode(model, tok, paras, h)
        h.remove()
        row = {"recipe": rec, **recall(q, d, gold), "cosine": float((p * dense_p).sum(-1).mean())}
        for L in lengths:
            for b in batches:
                ids = windows[L][:b]
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                ds, ps, sp = paired_speedup(model, inputs, rec, repeats)
                row[f"speedup_L{L}_b{b}"] = sp
                row[f"seq_per_s_L{L}_b{b}"] = b / ps
        rows.append(row)
        log(f"  {rec}: recall@1 {row['recall@1']:.3f} @10 {row['recall@10']:.3f} cosine {row['cosine']:.4f} "
            + " ".join(f"x{row[f'speedup_L{L}_b{b}']:.2f}@{L}/{b}" for L in lengths for b in batches))
    base = recall(dense_q, dense_docs, gold)
    return {"task": {"sections": len(sections), "queries": len(queries), "paragraphs": len(paras), **base},
            "rows": rows}


def vit_rows(recipes: list[dict], batches=(1, 64), repeats: int = 5, test_images: int | None = None,
             log=print) -> dict:
    """Top-1 on the Fashion-MNIST test images and images/s of each recipe on the trained ViT."""
    from prunekit.zoo.vit import accuracy, fashion_vit, images

    model = fashion_vit()
    x, y = images("test")
    if test_images:
        x, y = x[:test_images], y[:test_images]
    base = accuracy(model, x, y)
    rows = []
    for rec in bar(recipes, desc="token recipes", unit="recipe"):
        h = apply(model, rec)
        acc = accuracy(model, x, y)
        tokens = list(h.tokens)
        h.remove()
        row = {"recipe": rec, "top1": acc, "tokens": tokens}
        for b in batches:
            ds, ps, sp = paired_speedup(model, {"pixel_values": x[:b]}, rec, repeats)
            row[f"speedup_b{b}"] = sp
            row[f"img_per_s_b{b}"] = b / ps
        rows.append(row)
        log(f"  {rec}: top-1 {acc:.4f} (dense {base:.4f}) " + " ".join(f"x{row[f'speedup_b{b}']:.2f}@b{b}" for b in batches))
    return {"task": {"test_images": len(x), "top1": base}, "rows": rows}

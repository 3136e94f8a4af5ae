"""Context pruning for retrieval-augmented generation: keep the sentences (or tokens) of each retrieved passage
that matter for the question, drop the rest.

```python
import prunekit.context as ctx
out = ctx.prune("When was the bridge built?", passages, method="provence", keep=0.5)
out.passages, out.scores, out.kept_fraction, out.rerank
pruner = ctx.Pruner(method="llmlingua", keep=0.5)      # loads its model once; call it per question
```

Methods (``METHODS``): ``provence`` (a question-conditioned score per sentence: the bundled MiniLM as a
bi-encoder, the MiniLM cross-encoder ``prunekit context train`` writes, any Hugging Face cross-encoder, or the
real Provence checkpoint with ``trust_remote_code``), ``llmlingua`` / ``longllmlingua`` (tokens chosen by
SmolLM2's per-token loss; question-contrastive, reordered), and the baselines ``bm25``, ``first-k``,
``random``, ``keep-all``. See :class:`~prunekit.context.recipe.ContextRecipe`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prunekit.context.methods import METHODS, Pruned, SentenceMethod, check_inputs, join, select, words
from prunekit.context.recipe import SENTENCE_METHODS, TOKEN_METHODS, ContextRecipe
from prunekit.context.split import sentence_spans, split_sentences
from prunekit.errors import PruneError

__all__ = ["METHODS", "ContextRecipe", "Pruned", "Pruner", "prune", "read_jsonl", "split_sentences",
           "sentence_spans", "SENTENCE_METHODS", "TOKEN_METHODS", "write_jsonl"]


def recipe_of(recipe=None, **fields) -> ContextRecipe:
    if isinstance(recipe, ContextRecipe):
        return recipe.model_copy(update=fields) if fields else recipe
    merged = dict(recipe or {})
    merged.update({k: v for k, v in fields.items() if v is not None})
    return ContextRecipe.make(**merged)


class Pruner:
    """A context recipe made ready once (its scorer or LM loaded), then called per question:
    ``pruner(question, passages) -> Pruned``. ``loaded_scorer`` / ``lm``: an already loaded scorer or (model,
    tokenizer) pair to use instead of loading one."""

    def __init__(self, recipe=None, *, trust_remote_code: bool = False, loaded_scorer=None, lm=None, **fields):
        self.recipe = recipe_of(recipe, **fields)
        entry = METHODS.get(self.recipe.method)
        self.method = entry.impl(self.recipe, scorer=loaded_scorer, lm=lm, trust_remote_code=trust_remote_code)
        from prunekit.context.scorers import ProvenceRemote

        remote = isinstance(getattr(self.method, "scorer", None), ProvenceRemote)
        if remote and self.recipe.keep is not None:
            raise PruneError("The Provence checkpoint chooses its sentences by threshold; use --threshold, not --keep.")
        self._threshold = 0.5 if remote else self.recipe.threshold

    @classmethod
    def like(cls, other: "Pruner | None", recipe, **kw) -> "Pruner":
        """A pruner for ``recipe`` that reuses ``other``'s loaded scorer or LM where they are the same."""
        rec = recipe_of(recipe)
        if other is not None:
            o = other.recipe
            if rec.method == "provence" and o.method == "provence" and rec.scorer == o.scorer:
                kw["loaded_scorer"] = other.method.scorer
            if rec.method in TOKEN_METHODS and o.method in TOKEN_METHODS and rec.model == o.model:
                kw["lm"] = (other.method.model, other.method.tok)
        return cls(rec, **kw)

    def __call__(self, question: str, passages: list[str]) -> Pruned:
        check_inputs(question, passages)
        if not isinstance(self.method, SentenceMethod):
            return self.method.prune(question, list(passages))
        t0 = time.perf_counter()
        r = self.recipe
        sents = [split_sentences(p) for p in passages]
        lengths = [[words(s) for s in p] for p in sents]
        if r.method == "keep-all" or (r.keep is not None and r.keep >= 1.0):
            kept = [[True] * len(p) for p in sents]
            scores, rerank = (self.method.scores(question, sents) if r.method != "keep-all"
                              else ([[1.0] * len(p) for p in sents], None))
        else:
            scores, rerank = self.method.scores(question, sents)
            kept = select(scores, lengths, keep=r.keep, threshold=self._threshold, title=bool(r.title))
        out = [join(s, k, p) for s, k, p in zip(sents, kept, passages)]
        total = sum(map(sum, lengths))
        got = sum(L for ls, ks in zip(lengths, kept) for L, k in zip(ls, ks) if k)
        return Pruned(out, [[float(x) for x in s] for s in scores], kept, got / max(total, 1), rerank,
                      list(range(len(passages))), time.perf_counter() - t0)


def prune(question: str, passages: list[str], recipe=None, **fields) -> Pruned:
    """Prune one question's passages (``fields``: the recipe's, e.g. ``method="provence", keep=0.5``)."""
    return Pruner(recipe, **fields)(question, passages)


MAX_LINE = 16 << 20


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line of a JSONL file as ``{"question": str, "passages": [str, ...]}`` (other keys kept), or one
    sentence naming the first line that is not (nothing is pruned from a file with a bad line)."""
    p = Path(path)
    if not p.is_file():
        raise PruneError(f"Input {p} does not exist; give a JSONL file of {{\"question\": ..., \"passages\": [...]}} lines.")
    rows = []
    with open(p, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if len(raw) > MAX_LINE:
                raise PruneError(f"{p} line {n} is longer than 16 MiB; split its passages into smaller items.")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PruneError(f"{p} line {n} is not UTF-8 text; give the passages as text, not binary.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PruneError(f"{p} line {n} is not valid JSON ({e.msg} at column {e.colno}).") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("passages"), list):
                raise PruneError(f"{p} line {n} must be an object with \"question\" (a string) and \"passages\" (a list of strings).")
            try:
                check_inputs(row["question"], row["passages"])
            except PruneError as e:
                raise PruneError(f"{p} line {n}: {str(e)[0].lower()}{str(e)[1:]}") from None
            rows.append(row)
    if not rows:
        raise PruneError(f"{p} has no lines; give one JSON object per line.")
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object per line, written atomically (nothing half-written)."""
    from prunekit.io import atomic_file

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")

    return atomic_file(path, write)

"""Context pruning methods, one registry entry each, one interface: a method scores the question's passages and
:func:`prune` keeps what the recipe asks for.

Sentence methods (``provence``, ``bm25``, ``first-k``, ``random``, ``keep-all``) give one score per sentence and
share :func:`select`: with ``keep``, sentences in score order until the kept words reach ``keep`` of the
context's words (within one sentence); with ``threshold``, every sentence whose score passes it. Token methods
(``llmlingua``, ``longllmlingua``) choose the tokens of a causal LM (:mod:`prunekit.context.lm`).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from prunekit.core.registry import Registry
from prunekit.errors import PruneError


def _load():
    from prunekit.context import lm  # noqa: F401  (registers llmlingua, longllmlingua)


METHODS = Registry("context pruning method", loader=_load)


@dataclass
class Pruned:
    """What :func:`prune` returns for one question: the pruned ``passages`` (same order and count as given; ""
    where nothing of a passage survives), ``scores`` (per passage, one per sentence), ``kept`` (per passage, one
    bool per sentence), ``kept_fraction`` (of the words; llmlingua: of its LM's tokens), ``rerank`` (one
    relevance score per passage where the method gives one), ``order`` (the passage order for the reader:
    LongLLMLingua's reordering, otherwise as given), ``seconds`` (the pruner's time)."""

    passages: list[str]
    scores: list[list[float]]
    kept: list[list[bool]]
    kept_fraction: float
    rerank: list[float] | None = None
    order: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = {"passages": self.passages, "scores": [[round(float(s), 6) for s in p] for p in self.scores],
               "kept_fraction": round(self.kept_fraction, 6)}
        if self.rerank is not None:
            out["rerank"] = [round(float(r), 6) for r in self.rerank]
        if self.order and self.order != list(range(len(self.passages))):
            out["order"] = self.order
        return out


def words(text: str) -> int:
    """The length unit of sentence selection: white-space separated words."""
    return len(text.split())


def select(scores: list[list[float]], lengths: list[list[int]], *, keep: float | None = None,
           threshold: float | None = None, title: bool = False) -> list[list[bool]]:
    """Which sentences to keep. ``keep``: in descending score order (ties: the earlier passage and sentence
    first) until the kept length reaches ``keep`` of the total, so the kept share exceeds ``keep`` by less than
    one sentence (plus its passage's title with ``title``). ``threshold``: every sentence scoring at least it.
    ``title``: a passage's first sentence is never kept alone and is kept whenever another sentence of its
    passage is (passages of one sentence: it is an ordinary sentence)."""
    kept = [[False] * len(p) for p in scores]
    has_title = [title and len(p) > 1 for p in scores]
    if keep is not None:
        total = sum(map(sum, lengths))
        budget = keep * total
        units = [(-s, pi, si) for pi, p in enumerate(scores) for si, s in enumerate(p)
                 if not (has_title[pi] and si == 0)]
        units.sort()
        got = 0
        for _, pi, si in units:
            if got >= budget - 1e-9:
                break
            kept[pi][si] = True
            got += lengths[pi][si]
            if has_title[pi] and not kept[pi][0]:
                kept[pi][0] = True
                got += lengths[pi][0]
        return kept
    for pi, p in enumerate(scores):
        for si, s in enumerate(p):
            kept[pi][si] = s >= threshold
        if has_title[pi]:
            kept[pi][0] = any(kept[pi][1:])
    return kept


def join(sentences: list[str], mask: list[bool], original: str) -> str:
    """A passage from its kept sentences: the original string when all are kept, "" when none, otherwise the
    kept sentences (stripped) joined by one space."""
    if all(mask):
        return original
    return " ".join(s.strip() for s, k in zip(sentences, mask) if k)


class SentenceMethod:
    """A method that scores sentences: ``scores(question, sentences) -> (scores per passage, rerank or None)``."""

    def __init__(self, recipe, **context):
        self.recipe = recipe

    def scores(self, question: str, sentences: list[list[str]]):
        raise NotImplementedError


@METHODS.register("keep-all", description="the passages as they are (the reference)")
class KeepAll(SentenceMethod):
    def scores(self, question, sentences):
        return [[1.0] * len(p) for p in sentences], None


@METHODS.register("first-k", description="the leading sentences of every passage, at the same rate")
class FirstK(SentenceMethod):
    def scores(self, question, sentences):
        return [[-float(i) for i in range(len(p))] for p in sentences], None


@METHODS.register("random", description="sentences drawn at random (seeded by the recipe's seed and the question)")
class RandomSentences(SentenceMethod):
    def scores(self, question, sentences):
        rng = np.random.default_rng([self.recipe.seed, zlib.crc32(question.encode("utf-8"))])
        return [rng.random(len(p)).tolist() for p in sentences], None


_STOP = set("a an and are as at be by can do does for from has have how i if in is it its of on or that the this "
            "to was what when where which who whom why will with you your".split())


def terms(text: str) -> list[str]:
    """Lower-case word terms without stop words (BM25's and the evaluation's tokenization)."""
    return [w for w in re.findall(r"[a-z0-9_]+", text.lower()) if w not in _STOP]


def bm25(query: list[str], docs: list[list[str]], k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 of ``query`` against each document, idf over ``docs`` (Lucene's idf: log(1 + (N - df + .5) /
    (df + .5)))."""
    n = len(docs)
    avg = sum(map(len, docs)) / max(n, 1) or 1.0
    df: dict[str, int] = {}
    for d in docs:
        for t in set(d):
            df[t] = df.get(t, 0) + 1
    out = []
    for d in docs:
        tf: dict[str, int] = {}
        for t in d:
            tf[t] = tf.get(t, 0) + 1
        s = 0.0
        for t in set(query):
            f = tf.get(t, 0)
            if f:
                idf = math.log(1.0 + (n - df[t] + 0.5) / (df[t] + 0.5))
                s += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avg))
        out.append(s)
    return out


@METHODS.register("bm25", description="lexical overlap with the question: BM25 of each sentence, idf over the passages' sentences")
class BM25(SentenceMethod):
    def scores(self, question, sentences):
        flat = [terms(s) for p in sentences for s in p]
        s = bm25(terms(question), flat)
        out, i = [], 0
        for p in sentences:
            out.append(s[i:i + len(p)])
            i += len(p)
        passages = [[t for sent in p for t in terms(sent)] for p in sentences]
        return out, bm25(terms(question), passages)


@METHODS.register("provence", description="Provence: a question-conditioned score per sentence from a (cross-)encoder, "
                  "sentences kept above a threshold or to a rate; reranking score from the same pass")
class Provence(SentenceMethod):
    def __init__(self, recipe, scorer=None, trust_remote_code: bool = False, **context):
        super().__init__(recipe)
        from prunekit.context.scorers import load_scorer

        self.scorer = scorer if scorer is not None else load_scorer(
            recipe.scorer, trust_remote_code=trust_remote_code, threshold=recipe.threshold, title=bool(recipe.title))

    def scores(self, question, sentences):
        return self.scorer.score(question, sentences)


def check_inputs(question, passages) -> None:
    """One sentence for what cannot be pruned: an empty question or passage, text that is not text."""
    if not isinstance(question, str) or not question.strip():
        raise PruneError("The question is empty; give the question the passages were retrieved for.")
    if not isinstance(passages, (list, tuple)) or not passages:
        raise PruneError("There are no passages; give a list of one or more passage strings.")
    for i, p in enumerate(passages):
        if not isinstance(p, str):
            raise PruneError(f"Passage {i + 1} is a {type(p).__name__}, not a string.")
        if not p.strip():
            raise PruneError(f"Passage {i + 1} is empty; drop it or give its text.")
        if "\x00" in p or sum(not (c.isprintable() or c.isspace()) for c in p) > 0.1 * len(p):
            raise PruneError(f"Passage {i + 1} is not text (control or binary characters); decode it to text first.")

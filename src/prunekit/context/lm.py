"""LLMLingua and LongLLMLingua: a small causal LM decides which tokens of the context to drop.

Per-token importance is the token's loss, -log p(x_i | the compressed context so far) (LLMLingua: surprising
tokens carry the information); with ``contrastive`` (LongLLMLingua) it is how much the question lowers that loss,
loss(x_i | prefix) - loss(x_i | question, prefix). The context is read in segments of ``segment`` tokens
(iterative compression): each segment is scored after the *kept* tokens of the segments before it (a KV cache
holds them), its ``keep`` share of highest-importance tokens is kept (:func:`prunekit.core.masks.keep_highest`),
and only those are appended to the cache. Passages never share a segment; a blank line separates them and is
never dropped. ``reorder`` (LongLLMLingua's coarse stage) sorts the passages by the mean log-likelihood of
"question + We can get the answer to this question in the given documents." after each passage, the most likely
first; ``dynamic`` gives better-ranked passages a larger share (LongLLMLingua's dynamic compression ratio). The
per-passage counts add up to exactly round(keep x context tokens) (:func:`prunekit.core.masks.round_to_total`).
"""

from __future__ import annotations

import time

import torch

from prunekit.context.methods import METHODS, Pruned
from prunekit.core.masks import keep_highest, round_to_total
from prunekit.errors import PruneError

RESTRICT = " We can get the answer to this question in the given documents."
_LMS: dict = {}
_COARSE: dict = {}  # (model, question, passages) -> LongLLMLingua's coarse scores


def load_lm(name: str = "smollm2-135m"):
    """(model, tokenizer) of a causal LM by zoo name or local directory, loaded once per process."""
    if name not in _LMS:
        from prunekit.zoo.models import load_model

        model, tok = load_model(name)
        _LMS[name] = (model.eval(), tok)
    return _LMS[name]


class Scorer:
    """Token losses of a causal LM, conditioned on a growing cache of kept tokens."""

    def __init__(self, model, start: list[int]):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()
        self.length = 0
        self.last = None  # logits predicting the next token
        self.extend(start)

    @torch.no_grad()
    def extend(self, ids: list[int]) -> None:
        if not ids:
            return
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.length += len(ids)
        self.last = out.logits[0, -1]

    @torch.no_grad()
    def losses(self, ids: list[int]) -> torch.Tensor:
        """-log p of each of ``ids`` read after the cache (the cache is left as it was)."""
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.cache.crop(-len(ids))  # back to the kept prefix
        logits = torch.cat([self.last[None], out.logits[0, :-1]]).float()
        return torch.nn.functional.cross_entropy(logits, torch.tensor(ids), reduction="none")


def start_ids(tok) -> list[int]:
    """What every scored sequence begins with: the tokenizer's BOS token, else its EOS (a document boundary)."""
    for t in (tok.bos_token_id, tok.eos_token_id):
        if t is not None:
            return [int(t)]
    raise PruneError("The scorer LM's tokenizer has neither a BOS nor an EOS token to start a sequence with.")


@torch.no_grad()
def question_likelihood(model, tok, question: str, passages: list[str]) -> list[float]:
    """LongLLMLingua's coarse score of each passage: mean log p(question + RESTRICT | passage)."""
    q = tok(" " + question + RESTRICT, add_special_tokens=False)["input_ids"]
    out = []
    for p in passages:
        ids = start_ids(tok) + tok(p, add_special_tokens=False)["input_ids"] + q
        logits = model(input_ids=torch.tensor([ids])).logits[0, -len(q) - 1:-1].float()
        out.append(float(-torch.nn.functional.cross_entropy(logits, torch.tensor(q))))
    return out


def passage_counts(lengths: list[int], keep: float, rank: list[int], dynamic: float) -> list[int]:
    """Tokens kept per passage: ``keep`` of each (best-ranked ``keep * (1 + dynamic)`` down to the worst
    ``keep * (1 - dynamic)``, linearly by rank), adding up to exactly round(keep x total)."""
    n = len(lengths)
    total = int(round(keep * sum(lengths)))
    if n > 1 and dynamic > 0:
        pos = {p: r for r, p in enumerate(rank)}
        rates = [keep * (1 + dynamic * (1 - 2 * pos[i] / (n - 1))) for i in range(n)]
    else:
        rates = [keep] * n
    return round_to_total([min(r, 1.0) * L for r, L in zip(rates, lengths)], total, caps=lengths)


def segment_counts(n: int, kept: int, segment: int) -> list[tuple[int, int, int]]:
    """(start, end, tokens kept) of each segment of a passage of ``n`` tokens keeping ``kept`` in all."""
    bounds = list(range(0, n, segment)) + [n]
    spans = list(zip(bounds, bounds[1:]))
    counts = round_to_total([kept * (b - a) / n for a, b in spans], kept, caps=[b - a for a, b in spans])
    return [(a, b, c) for (a, b), c in zip(spans, counts)]


@torch.no_grad()
def compress(model, tok, question: str, passages: list[str], keep: float, segment: int = 200,
             contrastive: bool = False, reorder: bool = False, dynamic: float = 0.0, likelihood=None):
    """Per passage (input order): its token ids, the importance of each token and the kept mask; and the order
    in which the passages were read (the reader's order). ``likelihood``: the passages' coarse scores when
    already known (they do not depend on ``keep``)."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in passages]
    if reorder or dynamic > 0:
        ll = likelihood if likelihood is not None else question_likelihood(model, tok, question, passages)
        rank = sorted(range(len(passages)), key=lambda i: (-ll[i], i))
    else:
        rank = list(range(len(passages)))
    order = rank if reorder else list(range(len(passages)))
    counts = passage_counts([len(x) for x in ids], keep, rank, dynamic)
    start = start_ids(tok)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    plain = Scorer(model, start)
    cond = Scorer(model, start + tok("Question: " + question + "\n\n", add_special_tokens=False)["input_ids"]) if contrastive else None
    importance = [torch.zeros(len(x)) for x in ids]
    kept = [torch.zeros(len(x), dtype=torch.bool) for x in ids]
    for n_read, pi in enumerate(order):
        if n_read:
            for s in (plain, cond):
                if s is not None:
                    s.extend(sep)
        for a, b, c in segment_counts(len(ids[pi]), counts[pi], segment) if ids[pi] else []:
            seg = ids[pi][a:b]
            imp = plain.losses(seg)
            if cond is not None:
                imp = imp - cond.losses(seg)
            mask = keep_highest(imp, c)
            importance[pi][a:b] = imp
            kept[pi][a:b] = mask
            chosen = [t for t, k in zip(seg, mask.tolist()) if k]
            for s in (plain, cond):
                if s is not None:
                    s.extend(chosen)
    return ids, importance, kept, order


def sentence_scores(tok, passage: str, ids: list[int], importance: torch.Tensor,
                    kept: torch.Tensor) -> tuple[list[float], list[bool]]:
    """Mean token importance per sentence of ``passage`` (a token belongs to the sentence of its first
    character) and whether the sentence keeps any token (the run's ``scores`` and ``kept``)."""
    from prunekit.context.split import sentence_spans

    spans = sentence_spans(passage)
    try:
        offsets = tok(passage, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):
        offsets = None
    if offsets is None or len(offsets) != len(ids):  # a slow tokenizer: one figure for the passage
        m = float(importance.mean()) if len(ids) else 0.0
        return [m] * len(spans), [bool(kept.any())] * len(spans)
    sums, counts, any_kept = [0.0] * len(spans), [0] * len(spans), [False] * len(spans)
    j = 0
    for (a, _), v, k in zip(offsets, importance.tolist(), kept.tolist()):
        while j + 1 < len(spans) and a >= spans[j][1]:
            j += 1
        sums[j] += v
        counts[j] += 1
        any_kept[j] = any_kept[j] or k
    return [s / c if c else 0.0 for s, c in zip(sums, counts)], any_kept


class TokenMethod:
    def __init__(self, recipe, lm=None, **context):
        self.recipe = recipe
        self.model, self.tok = lm if lm is not None else load_lm(recipe.model)

    def prune(self, question: str, passages: list[str]) -> Pruned:
        r = self.recipe
        t0 = time.perf_counter()
        if r.keep >= 1.0:
            ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in passages]
            importance = [torch.zeros(len(x)) for x in ids]
            kept = [torch.ones(len(x), dtype=torch.bool) for x in ids]
            order = list(range(len(passages)))
        else:
            ll = None
            if r.reorder or r.dynamic > 0:  # the coarse scores do not depend on keep: remembered for a while
                key = (id(self.model), question, tuple(passages))
                if key not in _COARSE:
                    if len(_COARSE) >= 512:
                        _COARSE.pop(next(iter(_COARSE)))
                    _COARSE[key] = question_likelihood(self.model, self.tok, question, passages)
                ll = _COARSE[key]
            ids, importance, kept, order = compress(self.model, self.tok, question, passages, r.keep, r.segment,
                                                    r.contrastive, r.reorder, r.dynamic, ll)
        out, scores, sent_kept = [], [], []
        for p, x, imp, k in zip(passages, ids, importance, kept):
            out.append(p if bool(k.all()) else self.tok.decode([t for t, m in zip(x, k.tolist()) if m], clean_up_tokenization_spaces=False).strip())
            s, sk = sentence_scores(self.tok, p, x, imp, k)
            scores.append(s)
            sent_kept.append(sk)
        total = sum(len(x) for x in ids)
        frac = sum(int(k.sum()) for k in kept) / max(total, 1)
        return Pruned(out, scores, sent_kept, frac, None, order, time.perf_counter() - t0)


@METHODS.register("llmlingua", description="LLMLingua: tokens of high loss under a small causal LM (SmolLM2), "
                  "iterative 200-token segments conditioned on the compressed prefix")
class LLMLingua(TokenMethod):
    pass


@METHODS.register("longllmlingua", description="LongLLMLingua: question-contrastive token importance, passages "
                  "reordered by question likelihood, dynamic per-passage rates")
class LongLLMLingua(TokenMethod):
    pass

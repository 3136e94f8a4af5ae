"""``prunekit context train``: the MiniLM cross-encoder Provence scores sentences with, trained here.

Silver labels come from a causal LM (the reader, SmolLM2-135M-Instruct): a sentence is relevant when reading it
alone raises the log-likelihood of the gold answer by at least ``margin`` nats over reading nothing (and by half
the best sentence's gain); the LM reads the gold passage's sentences and the most question-like sentences of
the others (:func:`candidates`). Training
items are the ``train`` part of :mod:`prunekit.context.qa` (other plays, other pydoc topics, other templates and
words than the ``test`` part). The model: all-MiniLM-L6-v2 reading ``[CLS] question [SEP] passage [SEP]``, a
keep logit on every passage token (target: its sentence's label) and a reranking logit on [CLS] (target: the
passage holds a relevant sentence); binary cross-entropy, AdamW, warmup-cosine, in the one training loop
(:func:`prunekit.core.loop.train_loop`).
"""

from __future__ import annotations

import random
import time

import torch

from prunekit.core.config import Config
from prunekit.core.progress import bar, say
from prunekit.recipe import PositiveInt, Positive


class TrainRecipe(Config):
    """``needle`` / ``pydoc``: training questions of each task; ``epochs``; ``lr``; ``batch_size``;
    ``margin`` (nats of answer log-likelihood a sentence must add to be labelled relevant, and at least half
    of the best sentence's gain); ``max_length``
    (tokens per window); ``pos_weight`` (weight of relevant tokens in the loss); ``seed``."""

    what = "context train recipe"

    needle: PositiveInt = 48
    pydoc: PositiveInt = 48
    epochs: PositiveInt = 2
    lr: Positive = 1e-4
    batch_size: PositiveInt = 16
    margin: Positive = 2.0
    max_length: PositiveInt = 256
    pos_weight: Positive = 4.0
    seed: int = 0


def candidates(item, sents: list[list[str]], rng: random.Random, hard: int = 3, easy: int = 2) -> list[tuple[int, int]]:
    """The sentences the LM labels: every sentence of the gold passage, the ``hard`` sentences of the other
    passages that share the most words with the question (the confusable ones) and ``easy`` random others.
    Sentences not labelled count as irrelevant."""
    from prunekit.context.methods import bm25, terms

    others = [(pi, si) for pi, p in enumerate(sents) if pi != item.gold for si in range(len(p))]
    lex = bm25(terms(item.question), [terms(sents[pi][si]) for pi, si in others])
    ranked = [others[i] for i in sorted(range(len(others)), key=lambda i: -lex[i])]
    rest = ranked[hard:]
    chosen = [(item.gold, si) for si in range(len(sents[item.gold]))] + ranked[:hard]
    return chosen + rng.sample(rest, min(easy, len(rest)))


def silver_labels(items, reader, margin: float, seed: int = 0, progress: bool = True) -> list[list[list[bool]]]:
    """Per item, per passage, per sentence: does the sentence alone raise log p(answer) by at least ``margin``
    nats and by at least half the most any sentence of the question raises it? (Only the :func:`candidates`
    are read by the LM; the rest are labelled irrelevant.)"""
    from prunekit.context.reader import answer_loglik
    from prunekit.context.split import split_sentences

    rng = random.Random(seed)
    labels = []
    for it in bar(items, desc="silver labels", unit="question", enabled=progress):
        sents = [split_sentences(p) for p in it.passages]
        cands = candidates(it, sents, rng)
        ll = answer_loglik(reader, [(it.question, [], it.answer, it.prefix)]
                           + [(it.question, [sents[pi][si].strip()], it.answer, it.prefix) for pi, si in cands])
        gains = [x - ll[0] for x in ll[1:]]
        bar_ = max(margin, 0.5 * max(gains, default=0.0))
        lab = [[False] * len(p) for p in sents]
        for (pi, si), g in zip(cands, gains):
            lab[pi][si] = g >= bar_
        labels.append(lab)
    return labels


def examples(items, labels, tok, max_length: int) -> list[tuple]:
    """(ids, types, which, token labels, passage label) per window of every (question, passage) pair."""
    from prunekit.context.scorers import encode_pair
    from prunekit.context.split import split_sentences

    out = []
    for it, lab in zip(items, labels):
        for p, pl in zip(it.passages, lab):
            sents = [s.strip() for s in split_sentences(p)]
            for ids, types, which in encode_pair(tok, it.question, sents, max_length):
                y = [float(pl[w]) if w >= 0 else 0.0 for w in which]
                out.append((ids, types, which, y, float(any(pl[w] for w in which if w >= 0))))
    return out


def train_scorer(recipe: TrainRecipe | None = None, progress: bool = True, reader=None):
    """Build the silver-labelled training set, train the cross-encoder; returns ``(CrossScorer, metrics,
    timings)``."""
    from prunekit.context import qa
    from prunekit.context.reader import Reader
    from prunekit.context.scorers import CrossHead, CrossScorer, pad_batch
    from prunekit.core.loop import make_optimizer, make_schedule, train_loop
    from prunekit.zoo.minilm import load_minilm

    r = recipe or TrainRecipe()
    torch.manual_seed(r.seed)
    t0 = time.perf_counter()
    items = qa.build("train", r.needle, r.pydoc, seed=r.seed)
    reader = reader or Reader()
    say(f"silver labels from {len(items)} training questions (SmolLM2 answer log-likelihood, margin {r.margin} nats)")
    labels = silver_labels(items, reader, r.margin, r.seed, progress)
    t_labels = time.perf_counter() - t0
    encoder, tok = load_minilm(fresh=True)
    head = CrossHead(encoder)
    data = examples(items, labels, tok, r.max_length)
    n_pos = sum(sum(e[3]) for e in data)
    n_tok = sum(sum(1 for w in e[2] if w >= 0) for e in data)
    rng = random.Random(r.seed)

    def epochs():
        for _ in range(r.epochs):
            order = list(range(len(data)))
            rng.shuffle(order)
            yield [[data[i] for i in order[b:b + r.batch_size]] for b in range(0, len(order), r.batch_size)]

    pos_weight = torch.tensor(r.pos_weight)

    def loss_fn(model, batch):
        ids, types, mask, which = pad_batch(batch, tok.pad_token_id)
        y = torch.zeros(ids.shape)
        for i, e in enumerate(batch):
            y[i, :len(e[3])] = torch.tensor(e[3])
        keep, rank = model(ids, mask, types)
        sel = which >= 0
        tok_loss = torch.nn.functional.binary_cross_entropy_with_logits(keep[sel], y[sel], pos_weight=pos_weight)
        rank_loss = torch.nn.functional.binary_cross_entropy_with_logits(rank, torch.tensor([e[4] for e in batch]))
        return tok_loss + rank_loss, None

    steps = r.epochs * ((len(data) + r.batch_size - 1) // r.batch_size)
    opt = make_optimizer(head.parameters(), "adamw", r.lr, weight_decay=0.01)
    sched = make_schedule(opt, "warmup-cosine", steps, warmup=max(1, steps // 10))
    res = train_loop(head, opt, epochs(), loss_fn, scheduler=sched, total=steps, desc="train scorer", progress=progress)
    head.eval()
    metrics = {"questions": len(items), "windows": len(data), "relevant_token_share": n_pos / max(n_tok, 1),
               "relevant_sentences": sum(sum(map(sum, lab)) for lab in labels),
               "sentences": sum(sum(map(len, lab)) for lab in labels), "steps": res.step,
               "final_loss": sum(res.losses[-10:]) / max(1, len(res.losses[-10:]))}
    timings = {"labels_s": t_labels, "train_s": res.seconds, "total_s": time.perf_counter() - t0}
    return CrossScorer(head, tok, max_length=r.max_length), metrics, timings

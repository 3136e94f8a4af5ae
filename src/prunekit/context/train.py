"""``prunekit context train``: the MiniLM cross-encoder Provence scores sentences with, trained here.

Silver labels come from a causal LM (the reader, SmolLM2-135M-Instruct): a sentence is relevant when reading it
alone raises the log-likelihood of the gold answer by at least ``margin`` nats over reading nothing (and by half
the best sentence's gain); the LM reads the gold passage's sentences and the most question-like sentences of
the others (:func:`candidates`). Training
items are the ``train`` part of :mod:`prunekit.context.qa` (other plays, other pydoc topics, other templates and
words than the ``test`` part). The model: all-MiniLM-L6-v2 reading ``[CLS] question [SEP] passage [SEP]``, a
keep logit on every passage token (target: its sentence's label) and a reranking logit on [CLS] (target: the
passage holds a relevant sentence), both binary cross-entropy, plus a listwise loss per question (a softmax over
all its sentences, the relevant ones the target: the evidence must outrank the confusable sentences of the other
passages); a step reads every window of ``questions_per_step`` questions; AdamW, warmup-cosine, in the one
training loop (:func:`prunekit.core.loop.train_loop`). The LM's labels are cached (:func:`silver_gains`).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from prunekit.core.config import Config
from prunekit.core.progress import bar, say
from prunekit.recipe import PositiveInt, Positive, Weight

GAINS_VERSION = 1  # bump when candidates() or the reader prompt changes


class TrainRecipe(Config):
    """``needle`` / ``pydoc``: training questions of each task; ``epochs``; ``lr``; ``questions_per_step``;
    ``listwise`` (weight of the per-question ranking loss; 0 = token and passage BCE only);
    ``margin`` (nats of answer log-likelihood a sentence must add to be labelled relevant, and at least half
    of the best sentence's gain); ``max_length``
    (tokens per window); ``pos_weight`` (weight of relevant tokens in the loss); ``seed``."""

    what = "context train recipe"

    needle: PositiveInt = 96
    pydoc: PositiveInt = 96
    epochs: PositiveInt = 3
    lr: Positive = 2e-4
    questions_per_step: PositiveInt = 3
    listwise: Weight = 1.0
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


def reader_name(reader) -> str:
    model = getattr(reader, "model", None)
    return str(getattr(model, "name_or_path", "") or type(reader).__name__)


def gains_path(items, reader, seed: int) -> Path:
    """Where :func:`silver_gains` caches the gains of these questions read by this reader."""
    import hashlib
    import json

    from prunekit.zoo.models import cache_dir

    key = hashlib.sha256(json.dumps([GAINS_VERSION, seed, reader_name(reader), [it.to_dict() for it in items]],
                                    sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "context" / "silver" / f"{key}.json"


def silver_gains(items, reader, seed: int = 0, progress: bool = True, cache: bool = True) -> list[dict]:
    """Per item: the :func:`candidates` ``(passage, sentence)`` the LM reads and, for each, how many nats reading
    it alone adds to log p(answer) over reading nothing. The expensive step (one reader batch per question), so
    it is cached under the prunekit cache, keyed by the questions, the reader and the seed: training again with
    another margin, epoch count or loss reads it back."""
    import json

    from prunekit.context.reader import answer_loglik
    from prunekit.context.split import split_sentences
    from prunekit.io import write_json

    path = gains_path(items, reader, seed)
    if cache and path.is_file():
        try:
            got = json.loads(path.read_text())
            if isinstance(got, list) and len(got) == len(items):
                say(f"silver labels read back from {path}")
                return got
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    rng = random.Random(seed)
    out = []
    for it in bar(items, desc="silver labels", unit="question", enabled=progress):
        sents = [split_sentences(p) for p in it.passages]
        cands = candidates(it, sents, rng)
        ll = answer_loglik(reader, [(it.question, [], it.answer, it.prefix)]
                           + [(it.question, [sents[pi][si].strip()], it.answer, it.prefix) for pi, si in cands])
        out.append({"cands": [list(c) for c in cands], "gains": [x - ll[0] for x in ll[1:]]})
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, out)
    return out


def labels_from_gains(items, gains: list[dict], margin: float) -> list[list[list[bool]]]:
    """Per item, per passage, per sentence: does the sentence alone raise log p(answer) by at least ``margin``
    nats and by at least half the most any sentence of the question raises it? (Sentences the LM did not read
    are irrelevant.)"""
    from prunekit.context.split import split_sentences

    labels = []
    for it, g in zip(items, gains):
        lab = [[False] * len(split_sentences(p)) for p in it.passages]
        bar_ = max(margin, 0.5 * max(g["gains"], default=0.0))
        for (pi, si), x in zip(g["cands"], g["gains"]):
            lab[pi][si] = x >= bar_
        labels.append(lab)
    return labels


def silver_labels(items, reader, margin: float, seed: int = 0, progress: bool = True,
                  cache: bool = True) -> list[list[list[bool]]]:
    """:func:`silver_gains` thresholded by :func:`labels_from_gains`."""
    return labels_from_gains(items, silver_gains(items, reader, seed, progress, cache), margin)


def examples(items, labels, tok, max_length: int) -> list[tuple[list[tuple], list[list[bool]]]]:
    """Per question: its windows ``(ids, types, which, token labels, passage index)`` over every passage, and
    its sentence labels."""
    from prunekit.context.scorers import encode_pair
    from prunekit.context.split import split_sentences

    out = []
    for it, lab in zip(items, labels):
        wins = []
        for pi, (p, pl) in enumerate(zip(it.passages, lab)):
            sents = [s.strip() for s in split_sentences(p)]
            for ids, types, which in encode_pair(tok, it.question, sents, max_length):
                wins.append((ids, types, which, [float(pl[w]) if w >= 0 else 0.0 for w in which], pi))
        out.append((wins, lab))
    return out


def listwise_loss(keep: torch.Tensor, which: torch.Tensor, batch) -> torch.Tensor | None:
    """Cross-entropy of a softmax over every sentence of a question (score: the mean keep logit of its tokens)
    against the silver labels spread evenly over the relevant sentences, averaged over the questions that have
    one: it ranks the evidence above the confusable sentences of the other passages, which per-token BCE on
    windows read one at a time does not see."""
    losses, row = [], 0
    for wins, lab in batch:
        offs = [0]
        for sent in lab:
            offs.append(offs[-1] + len(sent))
        sums, counts = torch.zeros(offs[-1]), torch.zeros(offs[-1])
        for w in wins:
            sel = which[row] >= 0
            idx = which[row][sel] + offs[w[4]]
            sums = sums.index_add(0, idx, keep[row][sel])
            counts = counts.index_add(0, idx, torch.ones(int(sel.sum())))
            row += 1
        target = torch.tensor([float(x) for sent in lab for x in sent])
        if target.sum() > 0:
            logits = (sums / counts.clamp_min(1))[counts > 0]
            target = target[counts > 0]
            losses.append(-(torch.log_softmax(logits, 0) * target / target.sum()).sum())
    return torch.stack(losses).mean() if losses else None


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
    cached = gains_path(items, reader, r.seed).is_file()
    labels = silver_labels(items, reader, r.margin, r.seed, progress)
    t_labels = time.perf_counter() - t0
    encoder, tok = load_minilm(fresh=True)
    head = CrossHead(encoder)
    data = examples(items, labels, tok, r.max_length)
    n_win = sum(len(w) for w, _ in data)
    n_pos = sum(sum(e[3]) for w, _ in data for e in w)
    n_tok = sum(sum(1 for x in e[2] if x >= 0) for w, _ in data for e in w)
    rng = random.Random(r.seed)

    def epochs():
        for _ in range(r.epochs):
            order = list(range(len(data)))
            rng.shuffle(order)
            yield [[data[i] for i in order[b:b + r.questions_per_step]]
                   for b in range(0, len(order), r.questions_per_step)]

    pos_weight = torch.tensor(r.pos_weight)

    def loss_fn(model, batch):
        rows = [w for wins, _ in batch for w in wins]
        ids, types, mask, which = pad_batch(rows, tok.pad_token_id)
        y = torch.zeros(ids.shape)
        for i, e in enumerate(rows):
            y[i, :len(e[3])] = torch.tensor(e[3])
        keep, rank = model(ids, mask, types)
        sel = which >= 0
        loss = torch.nn.functional.binary_cross_entropy_with_logits(keep[sel], y[sel], pos_weight=pos_weight)
        rank_y = torch.tensor([float(any(e[3])) for e in rows])
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(rank, rank_y)
        if r.listwise > 0:
            lw = listwise_loss(keep, which, batch)
            if lw is not None:
                loss = loss + r.listwise * lw
        return loss, None

    steps = r.epochs * ((len(data) + r.questions_per_step - 1) // r.questions_per_step)
    opt = make_optimizer(head.parameters(), "adamw", r.lr, weight_decay=0.01)
    sched = make_schedule(opt, "warmup-cosine", steps, warmup=max(1, steps // 10))
    res = train_loop(head, opt, epochs(), loss_fn, scheduler=sched, total=steps, desc="train scorer", progress=progress)
    head.eval()
    metrics = {"questions": len(items), "windows": n_win, "relevant_token_share": n_pos / max(n_tok, 1),
               "relevant_sentences": sum(sum(map(sum, lab)) for lab in labels),
               "sentences": sum(sum(map(len, lab)) for lab in labels), "steps": res.step,
               "final_loss": sum(res.losses[-10:]) / max(1, len(res.losses[-10:])), "labels_cached": cached}
    timings = {"labels_s": t_labels, "train_s": res.seconds, "total_s": time.perf_counter() - t0}
    return CrossScorer(head, tok, max_length=r.max_length), metrics, timings

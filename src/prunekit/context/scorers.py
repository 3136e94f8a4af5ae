"""Provence's sentence scorers: ``score(question, sentences) -> (scores per passage, one per sentence; a
reranking score per passage)``.

* :class:`BiEncoder` (``minilm``): the bundled all-MiniLM-L6-v2, cosine of the question's and each sentence's
  embeddings; reranking score = cosine with the mean of the passage's sentence embeddings. No training, no
  question-passage interaction.
* :class:`CrossScorer` (a directory of ``prunekit context train``): MiniLM reading ``[CLS] question [SEP]
  passage [SEP]`` with a keep head on every passage token and a reranking head on ``[CLS]`` (Provence's
  architecture on a small encoder). A sentence's score is the mean keep-probability of its tokens. Passages
  longer than the window are read in chunks of whole sentences, each after the question.
* :class:`HFCrossEncoder` (a Hugging Face ``*ForSequenceClassification`` directory, e.g. an MS MARCO
  cross-encoder): each (question, sentence) pair scored on its own, sigmoid of the logit (or the positive class).
* :class:`ProvenceRemote` (the real Provence checkpoint, code shipped with the model: only with
  ``trust_remote_code``): its own ``process(question, passage, threshold)`` picks the sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PruneError

SCORER_KIND = "context-scorer"


class BiEncoder:
    name = "minilm"

    def __init__(self, model=None, tok=None):
        from prunekit.zoo.minilm import load_minilm

        self.model, self.tok = (model, tok) if model is not None else load_minilm()

    def score(self, question: str, sentences: list[list[str]]):
        from prunekit.zoo.minilm import embed

        flat = [s.strip() for p in sentences for s in p]
        e = embed([question] + flat, model=self.model, tok=self.tok)
        q, s = e[0], e[1:]
        sims = (s @ q).tolist()
        out, rerank, i = [], [], 0
        for p in sentences:
            out.append(sims[i:i + len(p)])
            rerank.append(float(torch.nn.functional.normalize(s[i:i + len(p)].mean(0), dim=0) @ q))
            i += len(p)
        return out, rerank


class CrossHead(nn.Module):
    """MiniLM (any BERT-style encoder) with a keep logit per token and a reranking logit on [CLS]."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        h = encoder.config.hidden_size
        self.keep = nn.Linear(h, 1)
        self.rank = nn.Linear(h, 1)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hid = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        return self.keep(hid).squeeze(-1), self.rank(hid[:, 0]).squeeze(-1)


def encode_pair(tok, question: str, sentences: list[str], max_length: int):
    """Token ids of ``[CLS] question [SEP] chunk [SEP]`` for each chunk of whole sentences that fits
    ``max_length``, and for each passage token the index of its sentence (-1 for the question and specials).
    A sentence longer than a whole window is cut (its tail is not read)."""
    q = tok(question, add_special_tokens=False, truncation=True, max_length=max_length // 4)["input_ids"]
    room = max_length - len(q) - 3
    sent_ids = [tok(s, add_special_tokens=False)["input_ids"][:room] for s in sentences]
    chunks, cur, cur_sent = [], [], []
    for i, ids in enumerate(sent_ids):
        if cur and len(cur) + len(ids) > room:
            chunks.append((cur, cur_sent))
            cur, cur_sent = [], []
        cur = cur + ids
        cur_sent = cur_sent + [i] * len(ids)
    chunks.append((cur, cur_sent))
    out = []
    for ids, sid in chunks:
        input_ids = [tok.cls_token_id] + q + [tok.sep_token_id] + ids + [tok.sep_token_id]
        which = [-1] * (len(q) + 2) + sid + [-1]
        types = [0] * (len(q) + 2) + [1] * (len(ids) + 1)
        out.append((input_ids, types, which))
    return out


def pad_batch(rows, pad_id: int):
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), n), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    which = torch.full((len(rows), n), -1, dtype=torch.long)
    for i, (a, t, w, *_) in enumerate(rows):
        ids[i, :len(a)] = torch.tensor(a)
        types[i, :len(a)] = torch.tensor(t)
        mask[i, :len(a)] = 1
        which[i, :len(a)] = torch.tensor(w)
    return ids, types, mask, which


class CrossScorer:
    """The cross-encoder ``prunekit context train`` writes: a MiniLM encoder + keep and reranking heads."""

    name = "cross"

    def __init__(self, head: CrossHead, tok, max_length: int = 256, batch_size: int = 16):
        self.head, self.tok, self.max_length, self.batch_size = head.eval(), tok, max_length, batch_size

    @torch.no_grad()
    def score(self, question: str, sentences: list[list[str]]):
        rows = []  # (ids, types, which, passage)
        for pi, p in enumerate(sentences):
            for ids, types, which in encode_pair(self.tok, question, [s.strip() for s in p], self.max_length):
                rows.append((ids, types, which, pi))
        sums = [torch.zeros(len(p)) for p in sentences]
        counts = [torch.zeros(len(p)) for p in sentences]
        rerank = [float("-inf")] * len(sentences)
        for b in range(0, len(rows), self.batch_size):
            chunk = rows[b:b + self.batch_size]
            ids, types, mask, which = pad_batch(chunk, self.tok.pad_token_id)
            keep, rank = self.head(ids, mask, types)
            prob = torch.sigmoid(keep)
            for i, r in enumerate(chunk):
                pi, w = r[3], which[i]
                sel = w >= 0
                sums[pi].index_add_(0, w[sel], prob[i][sel])
                counts[pi].index_add_(0, w[sel], torch.ones(int(sel.sum())))
                rerank[pi] = max(rerank[pi], float(rank[i]))
        scores = [(s / c.clamp_min(1)).tolist() for s, c in zip(sums, counts)]
        return scores, rerank

    def save(self, out: Path, recipe: dict, metrics: dict, timings: dict) -> None:
        from safetensors.torch import save_file

        from prunekit.io import MANIFEST, dumps, record

        self.head.encoder.save_pretrained(out, safe_serialization=True)
        self.tok.save_pretrained(out)
        save_file({f"keep.{k}": v.contiguous() for k, v in self.head.keep.state_dict().items()}
                  | {f"rank.{k}": v.contiguous() for k, v in self.head.rank.state_dict().items()},
                  str(Path(out) / "heads.safetensors"))
        (Path(out) / MANIFEST).write_text(dumps(record(SCORER_KIND, recipe, metrics=metrics, timings=timings,
                                                       max_length=self.max_length)))

    @classmethod
    def load(cls, path: str | Path) -> "CrossScorer":
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        from prunekit.io import read_manifest
        from prunekit.zoo.models import check_model_dir

        path = Path(path)
        check_model_dir(path)
        heads = path / "heads.safetensors"
        if not heads.is_file():
            raise PruneError(f"{path} has no heads.safetensors; it is not a scorer written by `prunekit context train`.")
        man = read_manifest(path) or {}
        enc = AutoModel.from_pretrained(path, trust_remote_code=False)
        head = CrossHead(enc)
        sd = load_file(str(heads))
        try:
            head.keep.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("keep.")})
            head.rank.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("rank.")})
        except RuntimeError:
            raise PruneError(f"{heads} does not match the encoder in {path}; train the scorer again.") from None
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        return cls(head, tok, max_length=int(man.get("max_length", 256)))


class HFCrossEncoder:
    """A Hugging Face sequence-classification cross-encoder: one score per (question, sentence) pair."""

    name = "hf-cross-encoder"

    def __init__(self, model, tok, batch_size: int = 32):
        self.model, self.tok, self.batch_size = model.eval(), tok, batch_size

    @torch.no_grad()
    def _pairs(self, question: str, texts: list[str]) -> list[float]:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok([question] * len(texts[i:i + self.batch_size]), texts[i:i + self.batch_size], padding=True,
                           truncation="only_second", max_length=512, return_tensors="pt")
            logits = self.model(**enc).logits.float()
            p = torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else torch.softmax(logits, -1)[:, -1]
            out += p.tolist()
        return out

    def score(self, question: str, sentences: list[list[str]]):
        flat = self._pairs(question, [s.strip() for p in sentences for s in p])
        out, i = [], 0
        for p in sentences:
            out.append(flat[i:i + len(p)])
            i += len(p)
        return out, self._pairs(question, ["".join(p) for p in sentences])


class ProvenceRemote:
    """The real Provence checkpoint (naver/provence-reranker-*): its shipped ``process`` chooses the sentences
    (threshold only; it splits sentences itself). Scores are 1 for the sentences of ours it kept, 0 otherwise."""

    name = "provence-remote"

    def __init__(self, model, threshold: float = 0.1, title: bool = True):
        self.model, self.threshold, self.title = model, threshold, title

    @torch.no_grad()
    def score(self, question: str, sentences: list[list[str]]):
        scores, rerank = [], []
        for p in sentences:
            res = self.model.process(question, "".join(p), threshold=self.threshold, always_select_title=self.title)
            pruned = " ".join(str(res.get("pruned_context", "")).split())
            scores.append([1.0 if " ".join(s.split()) and " ".join(s.split()) in pruned else 0.0 for s in p])
            rerank.append(float(res.get("reranking_score", 0.0)))
        return scores, rerank


def load_scorer(name: str, trust_remote_code: bool = False, threshold: float | None = None, title: bool = True):
    """``minilm``, a directory of ``prunekit context train``, a Hugging Face cross-encoder directory or hub id,
    or a Provence checkpoint (``trust_remote_code``)."""
    if name == "minilm":
        return BiEncoder()
    p = Path(name).expanduser()
    if p.is_dir():
        from prunekit.io import read_manifest

        man = read_manifest(p)
        if man is not None and man.get("kind") == SCORER_KIND:
            return CrossScorer.load(p)
        if not (p / "config.json").is_file():
            raise PruneError(f"Scorer {p} has no config.json; give minilm, a directory of `prunekit context train` "
                             "or a Hugging Face cross-encoder directory.")
        from prunekit.zoo.models import check_model_dir

        check_model_dir(p, trust_remote_code=trust_remote_code)
        cfg = json.loads((p / "config.json").read_text())
    elif "/" in name and not name.startswith((".", "/", "~")):
        cfg = None  # a hub id: transformers fetches it (users with a network)
    else:
        raise PruneError(f"Scorer {name!r} is neither minilm nor a directory; give minilm, a directory of "
                         "`prunekit context train` or a Hugging Face cross-encoder.")
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    if cfg is not None and cfg.get("auto_map"):
        model = AutoModel.from_pretrained(str(p), trust_remote_code=True)
        if not hasattr(model, "process"):
            raise PruneError(f"{p} ships its own code but has no process(question, context) method; it is not a Provence checkpoint.")
        return ProvenceRemote(model, 0.1 if threshold is None else threshold, title)
    archs = (cfg or {}).get("architectures") or []
    if cfg is not None and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise PruneError(f"{p} is a {', '.join(archs) or cfg.get('model_type')} model, not a cross-encoder "
                         "(*ForSequenceClassification); give minilm or a cross-encoder.")
    src = str(p) if cfg is not None else name
    return HFCrossEncoder(AutoModelForSequenceClassification.from_pretrained(src, trust_remote_code=False),
                          AutoTokenizer.from_pretrained(src, trust_remote_code=False))

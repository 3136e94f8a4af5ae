"""The reader that judges a pruned context: a small instruction-tuned LM (the bundled SmolLM2-135M-Instruct)
answers the question from the passages, greedy, with one fixed prompt for every method.

Per question: the generated answer (exact match and "contains" after SQuAD normalization), the log-likelihood
of the gold answer after the prompt (a graded signal where exact match is all-or-nothing), the prompt's length
in tokens and its prefill time (one forward over the prompt: what pruning saves).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from prunekit.context.qa import normalize, prefix_match

INSTRUCTION = "Answer the question from the passages."


@dataclass
class Reading:
    answer: str
    exact: bool
    contains: bool
    loglik: float
    prompt_tokens: int
    prefill_s: float


class Reader:
    def __init__(self, model=None, tok=None, max_new_tokens: int = 6):
        if model is None:
            from prunekit.context.lm import load_lm

            model, tok = load_lm("smollm2-135m")
        self.model, self.tok, self.max_new_tokens = model.eval(), tok, max_new_tokens

    def prompt_ids(self, question: str, passages: list[str], order: list[int] | None = None, prefix: str = "") -> list[int]:
        order = order or list(range(len(passages)))
        shown = [passages[i] for i in order if passages[i].strip()]
        body = "\n\n".join(f"[{k + 1}] {p}" for k, p in enumerate(shown)) or "(no passages)"
        user = f"Passages:\n\n{body}\n\n{INSTRUCTION}\nQuestion: {question}"
        msgs = [{"role": "user", "content": user}]
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return self.tok(text + prefix, add_special_tokens=False)["input_ids"]
        return self.tok(user + "\nAnswer: " + prefix, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def read(self, question: str, passages: list[str], gold: str, order: list[int] | None = None,
             prefix: str = "") -> Reading:
        """Answer ``question`` from ``passages`` (in ``order``); the answer starts with ``prefix`` (the reader
        continues it). Exact match: the continuation's first words are the gold answer."""
        from transformers import DynamicCache

        ids = self.prompt_ids(question, passages, order, prefix)
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        prefill = time.perf_counter() - t0
        cache, last = out.past_key_values, out.logits[0, -1]
        # log-likelihood of the gold answer (then the cache goes back to the prompt)
        g = self.tok(" " + gold if prefix else gold, add_special_tokens=False)["input_ids"]
        o = self.model(input_ids=torch.tensor([g]), past_key_values=cache, use_cache=True)
        logits = torch.cat([last[None], o.logits[0, :-1]]).float()
        ll = float(-torch.nn.functional.cross_entropy(logits, torch.tensor(g), reduction="sum"))
        cache = o.past_key_values
        cache.crop(-len(g))
        # greedy answer
        gen, nxt = [], int(last.argmax())
        stop = {self.tok.eos_token_id, *([self.tok.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in self.tok.get_vocab() else [])}
        for _ in range(self.max_new_tokens):
            if nxt in stop:
                break
            gen.append(nxt)
            o = self.model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            nxt = int(o.logits[0, -1].argmax())
        text = self.tok.decode(gen, skip_special_tokens=True).strip().split("\n")[0]
        a, b = normalize(text), normalize(gold)
        return Reading(text, prefix_match(text, gold), bool(b) and f" {b} " in f" {a} ", ll, len(ids), prefill)


@torch.no_grad()
def answer_loglik(reader: Reader, items: list[tuple[str, list[str], str, str]], batch_size: int = 16) -> list[float]:
    """log p(gold | prompt) for many ``(question, passages, gold, prefix)`` at once (right-padded batches: a
    causal LM's earlier positions never see the padding). The silver labels of ``prunekit context train``."""
    seqs = []
    for q, ps, gold, prefix in items:
        p = reader.prompt_ids(q, ps, None, prefix)
        g = reader.tok(" " + gold if prefix else gold, add_special_tokens=False)["input_ids"]
        seqs.append((p, g))
    out = []
    pad = reader.tok.pad_token_id if reader.tok.pad_token_id is not None else 0
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b:b + batch_size]
        n = max(len(p) + len(g) for p, g in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, (p, g) in enumerate(chunk):
            ids[i, :len(p) + len(g)] = torch.tensor(p + g)
            mask[i, :len(p) + len(g)] = 1
        logp = torch.log_softmax(reader.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for i, (p, g) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) + len(g) - 1)
            out.append(float(logp[i, pos, torch.tensor(g)].sum()))
    return out

"""The context recipe: which method prunes the retrieved passages, how much of them it keeps, with what scorer."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator

from prunekit.core.config import Config
from prunekit.recipe import PositiveInt

# sentence-level methods choose whole sentences; token-level ones choose tokens of a causal LM's tokenizer
SENTENCE_METHODS = ("provence", "bm25", "first-k", "random", "keep-all")
TOKEN_METHODS = ("llmlingua", "longllmlingua")


class ContextRecipe(Config):
    """``method`` (one of ``prunekit.context.METHODS``); ``keep``, the fraction of the context kept (words for the
    sentence methods, the scorer LM's tokens for llmlingua), **or** ``threshold`` (provence and bm25: keep each
    sentence whose score passes it; provence's default when neither is given: 0.1 on keep-probabilities, as the
    paper); ``scorer`` (provence: ``minilm`` = the bundled all-MiniLM-L6-v2 as a bi-encoder, cosine of question
    and sentence; a directory written by ``prunekit context train`` = the MiniLM cross-encoder with a per-token
    keep head; a Hugging Face cross-encoder directory (``*ForSequenceClassification``); the real Provence
    checkpoint with ``trust_remote_code``); ``title`` (the first sentence of a passage is its title: never kept
    alone, kept whenever something else of its passage is; default on for provence, as Provence's
    ``always_select_title``); ``model`` (llmlingua's causal LM: ``smollm2-135m`` or a local directory);
    ``segment`` (llmlingua's iterative segment, tokens); ``contrastive`` (LongLLMLingua: a token's importance is
    how much more likely the question makes it), ``reorder`` (LongLLMLingua: passages sorted by how likely they
    make the question, the most likely first) and ``dynamic`` (LongLLMLingua's dynamic ratio: the best passage
    keeps ``keep * (1 + dynamic)``, the worst ``keep * (1 - dynamic)``, the total stays ``keep``); ``seed``
    (random)."""

    what: ClassVar[str] = "context recipe"

    method: str = "provence"
    keep: float | None = None
    threshold: float | None = None
    scorer: str = "minilm"
    title: bool | None = None
    model: str = "smollm2-135m"
    segment: PositiveInt = 200
    contrastive: bool | None = None
    reorder: bool | None = None
    dynamic: float | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        from prunekit.context.methods import METHODS

        self.method = METHODS.canonical(self.method)
        m = self.method
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1] (the fraction of the context kept), got {self.keep}")
        if self.keep is not None and self.threshold is not None:
            raise ValueError("give keep (a fraction of the context) or threshold (a score), not both")
        if self.threshold is not None and m not in ("provence", "bm25"):
            raise ValueError(f"method {m!r} takes keep (a fraction), not threshold")
        if m in ("random", "first-k", "llmlingua", "longllmlingua") and self.keep is None:
            raise ValueError(f"method {m!r} needs keep (the fraction of the context kept, in (0, 1])")
        if m == "bm25" and self.keep is None and self.threshold is None:
            raise ValueError("method 'bm25' needs keep (a fraction) or threshold (a BM25 score)")
        if m == "provence" and self.keep is None and self.threshold is None:
            self.threshold = 0.1
        if self.title is None:
            self.title = m == "provence"
        long = m == "longllmlingua"
        if self.contrastive is None:
            self.contrastive = long
        if self.reorder is None:
            self.reorder = long
        if self.dynamic is None:
            self.dynamic = 0.3 if long else 0.0
        if not 0.0 <= self.dynamic < 1.0:
            raise ValueError(f"dynamic must be in [0, 1), got {self.dynamic}")
        if m not in TOKEN_METHODS and (self.contrastive or self.reorder or self.dynamic):
            raise ValueError(f"contrastive, reorder and dynamic are llmlingua's options, not {m!r}'s")
        return self

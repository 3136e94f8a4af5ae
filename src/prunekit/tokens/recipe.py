"""The token recipe: which method reduces the sequence, how many tokens each layer removes, and where."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from prunekit.core.config import Config
from prunekit.recipe import Count, PositiveInt


class TokenRecipe(Config):
    """``method`` (one of ``prunekit.tokens.METHODS``); ``r`` tokens removed per reducing layer (ToMe's r) **or**
    ``keep``, the fraction of the tokens left after the last reducing layer (each reducing layer keeps the same
    share) **or** ``flops``, the fraction of the dense encoder's FLOPs to spend (the smallest constant r whose
    linear-layer cost, 4 d^2 per token before the merge and 8 d^2 after, fits); ``schedule`` constant or decreasing (ToMe's (r, -1): 2r at the first reducing layer down to 0);
    ``layers`` the reducing layers (default: every layer for merging, EViT's L/4, L/2, 3L/4 for the
    token-dropping methods with ``keep``, baselines included, so they are compared at the same depths); ``proportional_attention`` (log of the token size added to the
    attention logits; default on for merging); ``unmerge`` (the encoder's output goes back to the original
    positions, so pooling and token-level heads work unchanged); ``min_tokens`` (inputs with fewer real tokens
    are not reduced: short queries gain no time and lose the most); ``seed`` (random drop); Zero-TPrune's
    ``iterations`` (PageRank steps, at most: it stops once no head's scores move by more than 1e-6 in L1;
    ``auto``: 30 in the first three layers, 1 in the last three, 5 between),
    ``similarity`` (share of a layer's removals made by the similarity stage) and ``head_variance`` (the
    variance window of the head filter)."""

    what: ClassVar[str] = "token recipe"

    method: str = "tome"
    r: Count | None = None
    keep: float | None = None
    flops: float | None = None
    schedule: Literal["constant", "decreasing"] = "constant"
    layers: list[Count] | None = None
    proportional_attention: bool | None = None
    unmerge: bool = True
    min_tokens: Count = 0
    seed: int = 0
    iterations: PositiveInt | Literal["auto"] = "auto"
    similarity: float = 0.5
    head_variance: tuple[float, float] = (0.01, 0.7)

    @model_validator(mode="after")
    def _check(self):
        from prunekit.tokens.methods import METHODS

        self.method = METHODS.canonical(self.method)
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1] (the fraction of tokens left), got {self.keep}")
        if self.method == "none":
            return self
        if self.flops is not None and not 0.0 < self.flops <= 1.0:
            raise ValueError(f"flops must be in (0, 1] (the fraction of the dense FLOPs), got {self.flops}")
        if sum(v is not None for v in (self.r, self.keep, self.flops)) != 1:
            raise ValueError(f"method {self.method!r} needs exactly one of r (tokens removed per layer), keep "
                             "(fraction of tokens left) or flops (fraction of the dense FLOPs)")
        if not 0.0 <= self.similarity <= 1.0:
            raise ValueError(f"similarity must be in [0, 1], got {self.similarity}")
        lo, hi = self.head_variance
        if not 0.0 <= lo < hi:
            raise ValueError(f"head_variance must be (low, high) with 0 <= low < high, got {self.head_variance}")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers lists a layer twice: {self.layers}")
        return self

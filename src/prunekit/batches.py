"""Text -> token tensors: random calibration windows and fixed, non-overlapping evaluation windows."""

from __future__ import annotations

import torch

from prunekit.errors import PruneError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0, what: str = "text") -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at seeded random offsets: shape ``[samples, seqlen]``."""
    needed = samples * seqlen
    if ids.numel() < needed:
        raise PruneError(
            f"The calibration {what} has {ids.numel()} tokens but {samples} x {seqlen} = {needed} are needed; "
            "use fewer samples, a shorter sequence length or a longer text."
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None, what: str = "text") -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start of the text: ``[n, seqlen]``.

    ``limit`` keeps the first ``limit`` windows (None: all of them).
    """
    n = ids.numel() // seqlen
    if n == 0:
        raise PruneError(f"The evaluation {what} has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    if limit is not None:
        if limit <= 0:
            raise PruneError(f"The number of evaluation windows must be positive, got {limit}.")
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen).clone()

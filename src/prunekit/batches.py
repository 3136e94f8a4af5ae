"""Text -> token tensors: random calibration windows and fixed, non-overlapping evaluation windows.

Windows follow the tokenizer's convention for the start of a sequence: when ``tokenizer(text)`` puts a
begin-of-sequence token first (Llama 2/3, Mistral, Gemma, ...), every window starts with it, as the model saw
in training (the first position of these models is an attention sink; without it perplexity and calibration
statistics describe inputs the model never gets). Pass ``bos=bos_id(tokenizer)``; the window keeps its length.
Tokenizers that add nothing (SmolLM2, GPT-2, ...) give ``None`` and plain windows.
"""

from __future__ import annotations

import torch

from prunekit.errors import PruneError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int | None:
    """The begin-of-sequence id this tokenizer puts at the start of a text, or None when it adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = "Hello world"
    with_special = tokenizer(probe, return_attention_mask=False)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if with_special and with_special[0] == bos and (not without or without[0] != bos):
        return int(bos)
    return None


def _check_seqlen(seqlen: int, bos: int | None) -> int:
    """Text tokens per window."""
    text = seqlen - (bos is not None)
    if text < 1:
        raise PruneError(f"A window of {seqlen} token(s) has no room for text after the begin-of-sequence token; use 2 or more.")
    return text


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def calibration_batches(
    ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0, what: str = "text", bos: int | None = None
) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at seeded random offsets: shape ``[samples, seqlen]``.

    With ``bos`` every window is that token followed by ``seqlen - 1`` text tokens.
    """
    text = _check_seqlen(seqlen, bos)
    needed = samples * text
    if ids.numel() < needed:
        raise PruneError(
            f"The calibration {what} has {ids.numel()} tokens but {samples} x {text} = {needed} are needed; "
            "use fewer samples, a shorter sequence length or a longer text."
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - text + 1, (samples,), generator=g)
    return _with_bos(torch.stack([ids[s : s + text] for s in starts.tolist()]), bos)


def evaluation_windows(
    ids: torch.Tensor, seqlen: int, limit: int | None = None, what: str = "text", bos: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start of the text: ``[n, seqlen]``.

    ``limit`` keeps the first ``limit`` windows (None: all of them). With ``bos`` every window is that token
    followed by the next ``seqlen - 1`` text tokens (so every text token is scored exactly once).
    """
    if seqlen < 2:
        raise PruneError(f"An evaluation window needs at least 2 tokens (one to predict from), got {seqlen}.")
    text = _check_seqlen(seqlen, bos)
    n = ids.numel() // text
    if n == 0:
        raise PruneError(f"The evaluation {what} has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    if limit is not None:
        if limit <= 0:
            raise PruneError(f"The number of evaluation windows must be positive, got {limit}.")
        n = min(n, limit)
    return _with_bos(ids[: n * text].view(n, text).clone(), bos)


def starts_with_bos(windows: torch.Tensor, bos: int | None) -> bool:
    """Whether every window begins with ``bos`` (what a run records about its data)."""
    return bos is not None and windows.numel() > 0 and bool((windows[:, 0] == bos).all())


def resolve_bos(tokenizer, want: bool | None) -> int | None:
    """The BOS id windows start with: the tokenizer's convention (``want`` None), forced on (True) or off (False)."""
    if want is None:
        return bos_id(tokenizer)
    if not want:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise PruneError("This tokenizer has no begin-of-sequence token, so windows cannot start with one; drop --bos.")
    return int(bos)

"""Perplexity over fixed, non-overlapping windows: exp(mean next-token negative log-likelihood).

Every window is scored on its own (no context carried across windows); the first token of each window
is only context. The same function scores every model in a comparison. ``score_windows`` also returns
the model's top-1 next-token predictions, from which agreement with another model is computed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from prunekit.core.progress import bar as progress_bar
from torch import nn


@torch.no_grad()
def score_windows(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False, device="cpu"):
    """``(perplexity, predictions)``; predictions ``[n, seqlen - 1]`` are the argmax next tokens."""

    model.eval()
    nll, count, preds = 0.0, 0, []
    chunks = windows.split(batch_size)
    for chunk in progress_bar(chunks, desc="perplexity", unit="batch", enabled=progress):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += chunk[:, 1:].numel()
        preds.append(logits.argmax(-1).cpu())
    return math.exp(nll / count), torch.cat(preds)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False, device="cpu") -> float:
    return score_windows(model, windows, batch_size, progress, device)[0]


def agreement(predictions_a: torch.Tensor, predictions_b: torch.Tensor) -> float:
    """Share of positions where two models predict the same next token (top-1)."""
    if predictions_a.shape != predictions_b.shape:
        raise ValueError("predictions come from different windows")
    return float((predictions_a == predictions_b).float().mean())

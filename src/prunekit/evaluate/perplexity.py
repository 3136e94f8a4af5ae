"""Perplexity over fixed, non-overlapping windows: exp(mean next-token negative log-likelihood).

Every window is scored on its own (no context carried across windows); the first token of each window
is only context. The same function scores every model in a comparison.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False, device="cpu") -> float:
    from tqdm.auto import tqdm

    model.eval()
    nll, count = 0.0, 0
    chunks = windows.split(batch_size)
    for chunk in tqdm(chunks, desc="perplexity", unit="batch", disable=not progress, leave=False):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += chunk[:, 1:].numel()
    return math.exp(nll / count)

"""A few greedy generations, so a person can read the damage: dense and pruned side by side."""

from __future__ import annotations

import torch
from torch import nn


def prompts_from(windows: torch.Tensor, n: int = 3, tokens: int = 16) -> list[torch.Tensor]:
    """``n`` prompts: the first ``tokens`` tokens of evenly spaced evaluation windows."""
    idx = torch.linspace(0, windows.shape[0] - 1, steps=min(n, windows.shape[0])).round().long().unique()
    return [windows[i, :tokens].clone() for i in idx.tolist()]


@torch.no_grad()
def greedy(model: nn.Module, tokenizer, prompts: list[torch.Tensor], new_tokens: int = 24) -> list[str]:
    """Greedy continuation of each prompt (text of the new tokens only)."""
    model.eval()
    out = []
    for p in prompts:
        ids = p.unsqueeze(0)
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return out

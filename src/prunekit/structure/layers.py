"""Depth: which whole blocks, or which attention / MLP sublayers, matter least.

* Block influence (ShortGPT, Men et al. 2024): BI_i = mean over calibration tokens of 1 - cos(x_i, x_{i+1}),
  the block's input and output hidden states; the blocks with the lowest BI go.
* Sublayer influence (the cheap FinerCut variant): the same angular change measured over each sublayer:
  1 - cos(x_in, x_mid) for the attention and 1 - cos(x_mid, x_out) for the MLP (x_mid: the residual stream
  between them, the input of the MLP's norm).
* Greedy (FinerCut, Zhang et al. 2024): repeatedly remove the sublayer whose removal changes the model's
  output least, measured as the mean KL divergence of the next-token distribution from the dense model's on
  a few calibration sequences (one full forward pass per candidate and step).

Influences come from one pass of the shared engine over the dense model (``propagate=False``); hooks on the
blocks read their inputs and outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.arch.base import Adapter, _get
from prunekit.calibrate import run_sequential
from prunekit.structure.shrink import attention_removed, mlp_removed
from prunekit.core.progress import bar as progress_bar


def _angular(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    a, b = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
    return float((1 - F.cosine_similarity(a, b, dim=-1)).sum()), a.shape[0]


@torch.no_grad()
def influences(
    adapter: Adapter, model: nn.Module, batches: torch.Tensor, batch_size: int = 8, device="cpu",
    progress: bool = False, sublayers: bool = False,
) -> dict:
    """``{"block": [BI per block], "attn": [...], "mlp": [...]}`` (the last two when ``sublayers``)."""
    blocks = adapter.blocks(model)
    lay = adapter.require_layout()
    sums = {k: [0.0] * len(blocks) for k in ("block", "attn", "mlp")}
    count = [0] * len(blocks)
    mid: dict[int, torch.Tensor] = {}
    handles = []

    def block_hook(i):
        def hook(_mod, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            s, n = _angular(x, y)
            sums["block"][i] += s
            count[i] += n
            if sublayers:
                m = mid.pop(i).reshape(x.shape)
                sums["attn"][i] += _angular(x, m)[0]
                sums["mlp"][i] += _angular(m, y)[0]

        return hook

    def mid_hook(i):
        def hook(_mod, args):
            mid[i] = args[0]

        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(block_hook(i), with_kwargs=True))
            if sublayers:
                handles.append(_get(block, lay.mlp_norm).register_forward_pre_hook(mid_hook(i)))
        targets = [[(f"{adapter.blocks_path}.{i}", block)] for i, block in enumerate(blocks)]
        run_sequential(model, blocks, targets, batches, "sqnorm", lambda *a: None, batch_size=batch_size,
                       device=device, progress=progress, desc="layer influence", propagate=False)
    finally:
        for h in handles:
            h.remove()
    out = {"block": [s / max(c, 1) for s, c in zip(sums["block"], count)]}
    if sublayers:
        out["attn"] = [s / max(c, 1) for s, c in zip(sums["attn"], count)]
        out["mlp"] = [s / max(c, 1) for s, c in zip(sums["mlp"], count)]
    return out


def lowest_blocks(bi: list[float], n: int) -> list[int]:
    return sorted(torch.tensor(bi).argsort(stable=True)[:n].tolist())


def sublayer_candidates(adapter: Adapter, model: nn.Module) -> list[tuple[int, str]]:
    out = []
    for i, block in enumerate(adapter.blocks(model)):
        if not attention_removed(adapter, block):
            out.append((i, "attn"))
        if not mlp_removed(adapter, block):
            out.append((i, "mlp"))
    return out


def lowest_sublayers(inf: dict, candidates: list[tuple[int, str]], n: int) -> list[tuple[int, str]]:
    scores = torch.tensor([inf[kind][i] for i, kind in candidates])
    return [candidates[j] for j in scores.argsort(stable=True)[:n].tolist()]


def _silence(adapter: Adapter, block: nn.Module, kind: str):
    """A forward hook that makes one sublayer output zeros (temporary, for the greedy search)."""
    lay = adapter.require_layout()
    if kind == "attn":
        mod = adapter.attention(block)

        def hook(_m, _a, out):
            return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)
    else:
        mod = adapter.mlp_parent(block) if lay.mlp else _get(block, lay.mlp_out)

        def hook(_m, _a, out):
            return torch.zeros_like(out)

    return mod.register_forward_hook(hook)


@torch.no_grad()
def greedy_sublayers(
    adapter: Adapter, model: nn.Module, batches: torch.Tensor, n: int, batch_size: int = 8,
    samples: int = 4, progress: bool = False,
) -> list[tuple[int, str]]:
    """FinerCut's greedy search: ``n`` sublayers, each step removing the one whose removal (together with those
    already chosen) changes the next-token distribution least (mean KL from the dense model)."""

    was_training = model.training
    model.eval()
    ids = batches[:samples]
    device = next(model.parameters()).device
    chunks = [c.to(device) for c in ids.split(batch_size)]
    ref = [F.log_softmax(model(input_ids=c, use_cache=False).logits.float(), -1) for c in chunks]
    blocks = adapter.blocks(model)
    chosen: list[tuple[int, str]] = []
    fixed = []
    try:
        bar = progress_bar(range(n), desc="greedy sublayers", unit="removal", enabled=progress)
        for _ in bar:
            best, best_kl = None, None
            for cand in sublayer_candidates(adapter, model):
                if cand in chosen:
                    continue
                h = _silence(adapter, blocks[cand[0]], cand[1])
                try:
                    kl, tok = 0.0, 0
                    for c, r in zip(chunks, ref):
                        lp = F.log_softmax(model(input_ids=c, use_cache=False).logits.float(), -1)
                        kl += float(F.kl_div(lp, r, log_target=True, reduction="sum"))
                        tok += c.numel()
                    kl /= tok
                finally:
                    h.remove()
                if best_kl is None or kl < best_kl:
                    best, best_kl = cand, kl
            chosen.append(best)
            fixed.append(_silence(adapter, blocks[best[0]], best[1]))
    finally:
        for h in fixed:
            h.remove()
        model.train(was_training)
    return chosen

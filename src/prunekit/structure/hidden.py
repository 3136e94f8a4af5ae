"""Hidden-size (residual stream) pruning, as Minitron does: one set of channels removed from every tensor that
touches the residual stream — the token embedding (and a tied or separate lm_head), the inputs of every q/k/v
and MLP input projection, the outputs of every o and MLP output projection, and every RMSNorm.

Exact by construction: removing channels equals zeroing them (embedding columns and writer rows set to zero,
so the channel is always 0), because the RMSNorms are corrected: with d channels kept out of D, RMS over the
kept ones is sqrt(D/d) times the RMS over all D when the removed ones are zero, so every norm weight is
scaled by sqrt(D/d) and ``rms_norm_eps`` by D/d. Both fit a stock config (``hidden_size``, explicit
``head_dim``, ``rms_norm_eps``), so the result still loads with ``from_pretrained``. Minitron and Torch-Pruning
skip the correction (their pruned norms are off by sqrt(D/d) until retraining).

Importance of a channel, by criterion: ``fluctuation`` — Minitron's activation score, sqrt of the mean square
of every RMSNorm's output on calibration tokens, summed over the norms; ``magnitude`` (L2) / ``magnitude-l1``
over every weight of the channel; ``taylor`` — sum of |w * dL/dw| over those weights; ``random``.

Llama-style families only (Llama, Mistral, Qwen2): GPT-2 and OPT derive head_dim from hidden_size and use
LayerNorm, whose mean over channels removal cannot preserve.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunekit.arch.base import Adapter, _get
from prunekit.errors import PruneError
from prunekit.structure.shrink import Zero, attention_removed, keep_index, mlp_removed
from prunekit.core.progress import bar as progress_bar

HIDDEN_FAMILIES = ("llama", "mistral", "qwen2")


def _norms(adapter: Adapter, model: nn.Module) -> list[nn.Module]:
    lay = adapter.require_layout()
    out = []
    for block in adapter.blocks(model):
        for path in (lay.attn_norm, lay.mlp_norm):
            m = _get(block, path)
            if getattr(m, "weight", None) is not None:
                out.append(m)
    out.append(_get(model, "model.norm"))
    return out


def parts(adapter: Adapter, model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules that read (inputs = hidden) or write (outputs = hidden) the residual stream."""
    readers, writers, zeros = [], [], []
    for block in adapter.blocks(model):
        if not attention_removed(adapter, block):
            ap = adapter.attn_parts(block)
            readers += [ap["q"], ap["k"], ap["v"]]
            writers.append(ap["o"])
        if mlp_removed(adapter, block):
            zeros += [m for m in block.modules() if isinstance(m, Zero)]
        else:
            ins, o = adapter.mlp_parts(block)
            readers += ins
            writers.append(o)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    return {"readers": readers + ([] if tied or head is None else [head]), "writers": writers, "norms": _norms(adapter, model),
            "embed": [embed], "head": [head] if head is not None else [], "tied": tied, "zeros": zeros}


def check_hidden(adapter: Adapter, model: nn.Module, ratio: float) -> int:
    """The number of hidden channels ``ratio`` removes; raises PruneError when this model cannot lose any."""
    if adapter.family not in HIDDEN_FAMILIES:
        raise PruneError(
            f"Hidden-size pruning supports Llama, Mistral and Qwen2 models, not {adapter.family}: its config derives "
            "head_dim from hidden_size (or it uses LayerNorm); prune heads and MLP channels instead."
        )
    d = model.config.hidden_size
    n = int(round(ratio * d))
    if n >= d:
        raise PruneError(f"ratio {ratio:g} would remove all {d} hidden channels; use a smaller ratio.")
    return n


def _weight_slices(p: dict) -> list[tuple[torch.Tensor, int]]:
    """(tensor, axis of the hidden channel) for every parameter touching the residual stream, once each."""
    out, seen = [], set()

    def add(t, axis):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append((t, axis))

    for m in p["readers"]:
        add(m.weight, 1)
    for m in p["writers"]:
        add(m.weight, 0)
        add(getattr(m, "bias", None), 0)
    for m in p["norms"]:
        add(m.weight, 0)
    add(p["embed"][0].weight, 1)
    for m in p["head"]:
        add(m.weight, 1)
    return out


def scores(adapter: Adapter, model: nn.Module, criterion: str, batches: torch.Tensor | None, batch_size: int = 8,
           seed: int = 0, progress: bool = False) -> torch.Tensor:
    d = model.config.hidden_size
    p = parts(adapter, model)
    if criterion == "random":
        return torch.rand(d, generator=torch.Generator().manual_seed(seed))
    if criterion in ("magnitude", "magnitude-l1"):
        s = torch.zeros(d, dtype=torch.float64)
        for t, axis in _weight_slices(p):
            w = t.detach().double()
            w = w if axis == 1 or w.dim() == 1 else w.t()  # hidden last
            s += (w.abs() if criterion == "magnitude-l1" else w.pow(2)).reshape(-1, d).sum(0).cpu()
        return (s.sqrt() if criterion == "magnitude" else s).float()
    if criterion == "fluctuation":
        return activation_scores(model, p["norms"], batches, batch_size, progress)
    if criterion == "taylor":
        from prunekit.structure.importance import gradient_sums

        slices = _weight_slices(p)
        mods = [m for m in (*p["readers"], *p["writers"], *p["norms"], *p["embed"], *p["head"])]
        grads = gradient_sums(model, batches, mods, batch_size, progress)
        s = torch.zeros(d, dtype=torch.float64)
        for t, axis in slices:
            g = grads.get(id(t))
            if g is None:
                continue
            e = (t.detach() * g).abs().double()
            e = e if axis == 1 or e.dim() == 1 else e.t()
            s += e.reshape(-1, d).sum(0).cpu()
        return s.float()
    raise PruneError(f"Unknown criterion {criterion!r} for hidden-size pruning.")


@torch.no_grad()
def activation_scores(model: nn.Module, norms: list[nn.Module], batches: torch.Tensor, batch_size: int,
                      progress: bool) -> torch.Tensor:
    """Minitron's activation importance: per channel, sqrt(mean over tokens of norm output^2), summed over norms."""

    sums = [None] * len(norms)
    count = [0]

    def hook(i):
        def fn(_m, _inp, out):
            o = out.detach().float().reshape(-1, out.shape[-1])
            sq = o.pow(2).sum(0).double()
            sums[i] = sq if sums[i] is None else sums[i] + sq
            if i == 0:
                count[0] += o.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(norms)]
    device = next(model.parameters()).device
    try:
        for chunk in progress_bar(batches.split(batch_size), desc="hidden activations", unit="batch", enabled=progress):
            model(input_ids=chunk.to(device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return sum((s / max(count[0], 1)).sqrt() for s in sums).float().cpu()


def removed_params(adapter: Adapter, model: nn.Module, n_removed: int) -> int:
    d = model.config.hidden_size
    return sum(t.numel() // d * n_removed for t, _ in _weight_slices(parts(adapter, model)))


@torch.no_grad()
def shrink_hidden(adapter: Adapter, model: nn.Module, keep) -> None:
    """Keep only hidden channels ``keep`` everywhere, with the RMSNorm correction that makes it exact."""
    cfg = model.config
    full = cfg.hidden_size
    keep = torch.as_tensor(sorted(int(k) for k in keep), dtype=torch.long)
    d = int(keep.numel())
    if not 0 < d <= full:
        raise PruneError(f"Cannot keep {d} of {full} hidden channels.")
    hd = adapter.head_dim(model)
    p = parts(adapter, model)
    for m in p["readers"]:
        keep_index(m, "in", keep)
    for m in p["writers"]:
        keep_index(m, "out", keep)
    scale = math.sqrt(full / d)
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6)) * full / d
    for m in p["norms"]:
        w = m.weight
        m.weight = nn.Parameter((w.data.index_select(0, keep.to(w.device)) * scale).contiguous(), requires_grad=w.requires_grad)
        for attr in ("variance_epsilon", "eps"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, eps)
    emb = p["embed"][0]
    w = emb.weight
    emb.weight = nn.Parameter(w.data.index_select(1, keep.to(w.device)).contiguous(), requires_grad=w.requires_grad)
    emb.embedding_dim = d
    if p["tied"]:
        p["head"][0].weight = emb.weight
        p["head"][0].in_features = d
    for z in p["zeros"]:
        z.out_features = d
    cfg.head_dim = hd  # explicit: the config would otherwise derive it from the new hidden size
    cfg.hidden_size = d
    cfg.rms_norm_eps = eps

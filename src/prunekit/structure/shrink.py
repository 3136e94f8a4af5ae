"""Physically remove coupled groups, so that the model really has fewer parameters and does less work.

* an attention head: its q rows, the k/v rows of its kv head when the whole kv group goes, and its o columns;
  with grouped-query attention every kept kv group must keep the same number of query heads.
* an MLP channel: its rows of every input projection (gate/up, fc1, c_fc; biases too) and its column of the
  output projection (down, fc2, c_proj).
* a whole sublayer: the attention (or MLP) is replaced by a module that adds nothing to the residual stream;
  its norm becomes ``nn.Identity`` (pre-norm blocks only).
* a whole block: deleted from the block list; layer indices, ``num_hidden_layers`` and ``layer_types`` follow.

All functions work on the ``[out, in]`` view of ``nn.Linear`` and GPT-2's ``Conv1D`` and update the sizes the
modules cached from their config, so the shrunk model runs (and generates with a KV cache) as it is.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from prunekit.arch.base import Adapter
from prunekit.errors import PruneError
from prunekit.linear import is_prunable


class Zero(nn.Module):
    """A removed part: returns zeros of width ``out_features`` whatever it is given (no parameters)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x, *args, **kwargs):
        return x.new_zeros(*x.shape[:-1], self.out_features)


class ZeroAttention(nn.Module):
    """A removed attention sublayer: adds nothing, but still appends one tiny placeholder per token to its
    layer of the KV cache, so that the cache length (read from layer 0 by ``generate``) stays right."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            b, t = hidden_states.shape[0], hidden_states.shape[1]
            placeholder = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


# ---------------------------------------------------------------- one matrix
def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def out_in(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if _is_conv1d(module) else (w.shape[0], w.shape[1])


def keep_index(module: nn.Module, dim: str, idx: torch.Tensor) -> None:
    """Keep only outputs (``dim='out'``, bias too) or inputs (``'in'``) ``idx`` of a Linear / Conv1D."""
    conv = _is_conv1d(module)
    axis = {("out", False): 0, ("in", False): 1, ("out", True): 1, ("in", True): 0}[(dim, conv)]
    idx = idx.to(module.weight.device)
    w = module.weight
    module.weight = nn.Parameter(w.data.index_select(axis, idx).contiguous(), requires_grad=w.requires_grad)
    if dim == "out" and module.bias is not None:
        b = module.bias
        module.bias = nn.Parameter(b.data.index_select(0, idx).contiguous(), requires_grad=b.requires_grad)
    n = int(idx.numel())
    if conv:
        if dim == "out":
            module.nf = n
        elif hasattr(module, "nx"):
            module.nx = n
    elif dim == "out":
        module.out_features = n
    else:
        module.in_features = n


def set_bias(module: nn.Module, present: bool) -> int:
    """Give ``module`` a zero bias (or drop it); returns the change in parameter count."""
    has = getattr(module, "bias", None) is not None
    if present == has:
        return 0
    out = out_in(module)[0]
    if present:
        module.bias = nn.Parameter(module.weight.new_zeros(out), requires_grad=module.weight.requires_grad)
        return out
    if _is_conv1d(module):
        raise PruneError("GPT-2's Conv1D layers always have a bias; it cannot be removed.")
    module.register_parameter("bias", None)
    return -out


def head_rows(heads, head_dim: int) -> torch.Tensor:
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim).unsqueeze(0)).flatten()


# ---------------------------------------------------------------- sizes of one block
def attention_removed(adapter: Adapter, block: nn.Module) -> bool:
    return isinstance(adapter.attention(block), ZeroAttention)


def mlp_removed(adapter: Adapter, block: nn.Module) -> bool:
    lay = adapter.require_layout()
    part = adapter.mlp_parent(block) if lay.mlp else getattr(block, lay.mlp_out)
    return isinstance(part, Zero)


def block_heads(adapter: Adapter, model: nn.Module, block: nn.Module) -> tuple[int, int]:
    """``(query heads, kv heads)`` of a block as its weights say (0, 0 when its attention is removed)."""
    if attention_removed(adapter, block):
        return 0, 0
    hd = adapter.head_dim(model)
    parts = adapter.attn_parts(block)
    if "qkv" in parts:  # fused q|k|v without GQA (GPT-2)
        h = out_in(parts["qkv"])[0] // (3 * hd)
        return h, h
    return out_in(parts["q"])[0] // hd, out_in(parts["k"])[0] // hd


def block_width(adapter: Adapter, block: nn.Module) -> int:
    if mlp_removed(adapter, block):
        return 0
    return out_in(adapter.mlp_parts(block)[0][0])[0]


def layer_sizes(adapter: Adapter, model: nn.Module) -> list[dict]:
    """Per block: query heads, kv heads, MLP width, and which linear layers (names inside the block) have a bias."""
    out = []
    for block in adapter.blocks(model):
        h, kv = block_heads(adapter, model, block)
        out.append({
            "heads": h,
            "kv_heads": kv,
            "intermediate": block_width(adapter, block),
            "biases": sorted(n for n, m in block.named_modules() if is_prunable(m) and m.bias is not None),
        })
    return out


# ---------------------------------------------------------------- heads, channels
def check_gqa(keep_heads: list[int], heads: int, kv_heads: int) -> list[int]:
    """The kv heads that ``keep_heads`` needs; raises when the split is not expressible as GQA."""
    per_group = heads // kv_heads
    counts = Counter(h // per_group for h in keep_heads)
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"group {g}: {c}" for g, c in sorted(counts.items()))
        raise PruneError(
            f"Keeping query heads {sorted(keep_heads)} leaves different numbers of query heads in the kv groups "
            f"({detail}), which grouped-query attention cannot express; keep the same number in every kept group."
        )
    return sorted(counts)


def shrink_heads(adapter: Adapter, model: nn.Module, layer: int, keep_heads: list[int]) -> None:
    """Keep only query heads ``keep_heads`` (current indices) of block ``layer``, and the kv heads they use."""
    block = adapter.blocks(model)[layer]
    heads, kv_heads = block_heads(adapter, model, block)
    keep = sorted({int(h) for h in keep_heads})
    if not keep:
        raise PruneError(f"Removing every attention head of layer {layer} leaves no attention; remove the sublayer instead.")
    if keep[0] < 0 or keep[-1] >= heads:
        raise PruneError(f"Layer {layer} has {heads} attention heads; head {keep[-1]} does not exist.")
    keep_kv = check_gqa(keep, heads, kv_heads)
    hd = adapter.head_dim(model)
    parts = adapter.attn_parts(block)
    q_rows, kv_rows = head_rows(keep, hd), head_rows(keep_kv, hd)
    if "qkv" in parts:
        q_all, kv_all = heads * hd, kv_heads * hd
        keep_index(parts["qkv"], "out", torch.cat([q_rows, q_all + kv_rows, q_all + kv_all + kv_rows]))
    else:
        keep_index(parts["q"], "out", q_rows)
        keep_index(parts["k"], "out", kv_rows)
        keep_index(parts["v"], "out", kv_rows)
    keep_index(parts["o"], "in", q_rows)
    adapter.set_attention_sizes(adapter.attention(block), len(keep), len(keep_kv), hd)


def shrink_mlp(adapter: Adapter, model: nn.Module, layer: int, keep_channels) -> None:
    """Keep only MLP channels ``keep_channels`` of block ``layer``."""
    block = adapter.blocks(model)[layer]
    idx = torch.as_tensor(sorted({int(c) for c in keep_channels}), dtype=torch.long)
    if idx.numel() == 0:
        raise PruneError(f"Removing every MLP channel of layer {layer} leaves no MLP; remove the sublayer instead.")
    ins, out = adapter.mlp_parts(block)
    for m in ins:
        keep_index(m, "out", idx)
    keep_index(out, "in", idx)
    adapter.set_mlp_size(block, int(idx.numel()))


# ---------------------------------------------------------------- sublayers, blocks
def _check_pre_norm(adapter: Adapter, model: nn.Module) -> None:
    if not adapter.pre_norm(model):
        raise PruneError(
            f"This {adapter.family} model normalizes after each sublayer (post-norm), so a sublayer cannot be "
            "removed without changing the block; remove whole layers instead."
        )


def remove_attention(adapter: Adapter, model: nn.Module, layer: int) -> None:
    """Replace the attention of block ``layer`` by :class:`ZeroAttention` (and its norm by Identity)."""
    _check_pre_norm(adapter, model)
    lay = adapter.require_layout()
    block = adapter.blocks(model)[layer]
    idx = getattr(adapter.attention(block), "layer_idx", layer)
    adapter.replace(block, lay.attn, ZeroAttention(layer if idx is None else idx))
    adapter.replace(block, lay.attn_norm, nn.Identity())


def remove_mlp(adapter: Adapter, model: nn.Module, layer: int) -> None:
    """Make the MLP of block ``layer`` add nothing (and its norm Identity)."""
    _check_pre_norm(adapter, model)
    lay = adapter.require_layout()
    block = adapter.blocks(model)[layer]
    hidden = model.config.hidden_size
    if lay.mlp:
        adapter.replace(block, lay.mlp, Zero(hidden))
    else:
        for p in lay.mlp_in:
            adapter.replace(block, p, Zero(0))
        adapter.replace(block, lay.mlp_out, Zero(hidden))
    adapter.replace(block, lay.mlp_norm, nn.Identity())


def remove_blocks(adapter: Adapter, model: nn.Module, drop) -> list[int]:
    """Delete blocks ``drop`` (current indices); returns the old indices of the blocks kept."""
    lay = adapter.require_layout()
    blocks = adapter.blocks(model)
    drop = sorted({int(i) for i in drop})
    if not drop:
        return list(range(len(blocks)))
    if drop[0] < 0 or drop[-1] >= len(blocks):
        raise PruneError(f"The model has {len(blocks)} layers; layer {drop[-1]} does not exist.")
    if len(drop) >= len(blocks):
        raise PruneError(f"Removing {len(drop)} layers of a model with {len(blocks)} leaves none; remove fewer layers.")
    if lay.layer_index_key and getattr(model.config, lay.layer_index_key, False):
        raise PruneError(
            f"This {adapter.family} model sets {lay.layer_index_key}, so every block's math depends on its position; "
            "removing layers would change the blocks that stay."
        )
    keep = [i for i in range(len(blocks)) if i not in drop]
    for i in reversed(drop):
        del blocks[i]
    for new_i, block in enumerate(blocks):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_i
    adapter.set_num_layers(model, keep)
    sizes = getattr(model.config, "prunekit_layer_sizes", None)
    if isinstance(sizes, list) and len(sizes) == len(keep) + len(drop):
        model.config.prunekit_layer_sizes = [sizes[i] for i in keep]
    return keep


def count_params(model: nn.Module) -> int:
    """Parameters of the model, tied ones counted once."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n

"""FLAP's bias compensation: what the removed channels wrote on average goes into a bias.

When input channels R of o_proj / down_proj are removed, their mean contribution W[:, R] @ mean(x_R) (mean over
calibration tokens) is added to that layer's bias, which is created if absent. Run it before shrinking.

Whether the result is still a stock config depends on the family:

* Llama: ``attention_bias`` / ``mlp_bias`` give every projection of the sublayer a bias, so turning them on
  (with zero biases on q/k/v or gate/up, in every layer) keeps a stock config.
* OPT: ``enable_bias`` (usually already on). GPT-2: every Conv1D has a bias already.
* Qwen2 (o_proj never has a bias, the MLP neither) and Mistral (no biases at all): the biases are recorded in
  ``config.prunekit_layer_sizes``; such a model loads with ``prunekit.load`` only.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.arch.base import Adapter
from prunekit.linear import weight_matrix
from prunekit.structure.plan import LayerPlan
from prunekit.structure.shrink import attention_removed, head_rows, mlp_removed, set_bias


@torch.no_grad()
def _add(module: nn.Module, cols: torch.Tensor, mean: torch.Tensor) -> int:
    added = set_bias(module, True)
    w = weight_matrix(module)
    cols = cols.to(w.device)
    module.bias.data += (w[:, cols].float() @ mean.to(w.device)[cols].float()).to(module.bias.dtype)
    return added


def compensate(adapter: Adapter, model: nn.Module, plan: dict[int, LayerPlan], stats: dict[tuple[int, str], torch.Tensor]) -> int:
    """Add the removed channels' mean contribution to the o_proj / down_proj biases (before shrinking); returns the
    parameters added. Call :func:`normalize_bias_flags` after shrinking."""
    hd = adapter.head_dim(model)
    blocks = adapter.blocks(model)
    added = 0
    for i, lp in plan.items():
        block = blocks[i]
        if lp.heads:
            added += _add(adapter.attn_parts(block)["o"], head_rows(lp.heads, hd), stats[(i, "attn")][0])
        if lp.channels:
            added += _add(adapter.mlp_parts(block)[1], torch.as_tensor(lp.channels, dtype=torch.long), stats[(i, "mlp")][0])
    return added


def normalize_bias_flags(adapter: Adapter, model: nn.Module) -> int:
    """Where a config flag governs the biases of a sublayer (Llama's attention_bias / mlp_bias, OPT's enable_bias)
    and some projection it governs has a bias, turn the flag on and give every governed projection a (zero) bias,
    so the config still describes the model. Returns parameters added."""
    lay = adapter.require_layout()
    cfg = model.config
    added = 0
    governed: dict[str, list[nn.Module]] = {}
    for block in adapter.blocks(model):
        if lay.attn_bias_key and not attention_removed(adapter, block):
            governed.setdefault(lay.attn_bias_key, []).extend(adapter.attn_parts(block).values())
        if lay.mlp_bias_key and not mlp_removed(adapter, block):
            ins, o = adapter.mlp_parts(block)
            governed.setdefault(lay.mlp_bias_key, []).extend([*ins, o])
    for key, modules in governed.items():
        if getattr(cfg, key, False) or not any(m.bias is not None for m in modules):
            continue
        for m in modules:
            added += set_bias(m, True)
        setattr(cfg, key, True)
    return added

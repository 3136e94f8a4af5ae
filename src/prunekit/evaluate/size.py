"""Sparsity per layer and overall; parameter counts and non-zeros."""

from __future__ import annotations

from torch import nn

from prunekit.linear import weight_matrix


def layer_sparsity(layers: list[tuple[str, nn.Module]]) -> dict[str, dict]:
    out = {}
    for name, mod in layers:
        w = weight_matrix(mod)
        zeros = int((w == 0).sum())
        out[name] = {"shape": list(w.shape), "params": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel()}
    return out


def size_summary(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict:
    """Whole-model parameters/non-zeros (tied weights counted once) and the sparsity over the target layers."""
    seen, params, nonzeros = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        nonzeros += int((p != 0).sum())
    per = layer_sparsity(layers)
    t_params = sum(v["params"] for v in per.values())
    t_zeros = sum(v["zeros"] for v in per.values())
    return {
        "params": params,
        "nonzeros": nonzeros,
        "target_params": t_params,
        "target_zeros": t_zeros,
        "target_sparsity": t_zeros / t_params if t_params else 0.0,
    }

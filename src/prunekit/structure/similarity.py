"""How much each decoder block changes the hidden state: the angular distance between its input and output.

``d_l`` = mean over calibration tokens of arccos(cos(x_l, x_{l+1})) / pi, in [0, 1]: 0 for a block that returns
its input (it may go first), larger for a block that turns the residual stream more. The one block measure of
CFSP's coarse step (Wang et al. 2024: block importance -> each block's pruning ratio) and of the Adapt-Pruner
schedule (Pan et al. 2024: the more similar a block's input and output, the more of it is pruned).

The angle is computed as 2 atan2(|a - b|, |a + b|) of the unit vectors a, b, which equals arccos(a . b) but
stays exact near 0 (arccos loses half the digits there): a block that returns its input scores exactly 0.

The distances come from one pass of the shared engine over the model as it is (``propagate=False``); forward
hooks on the blocks read their inputs and outputs, and the same pass may collect the statistics of other
targets (CFSP's activation norms).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunekit.arch.base import Adapter
from prunekit.calibrate import GroupFn, run_sequential


def token_angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per token (every row of ``[..., d]``), the angle between ``x`` and ``y`` divided by pi, in [0, 1]; a zero
    vector counts as orthogonal (0.5)."""
    x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    a = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    b = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    zero = (x.norm(dim=-1) == 0) | (y.norm(dim=-1) == 0)
    ang = 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1)) / math.pi
    return torch.where(zero, torch.full_like(ang, 0.5), ang)


@torch.no_grad()
def block_distances(
    adapter: Adapter, model: nn.Module, batches: torch.Tensor, batch_size: int = 8, device="cpu",
    progress: bool = False, targets: list[list[tuple[str, nn.Module]]] | None = None, statistic: str = "sqnorm",
    on_group: GroupFn | None = None, desc: str = "block distances",
) -> list[float]:
    """The angular distance ``d_l`` of every decoder block (see the module doc), from one engine pass over
    ``batches``. ``targets`` / ``statistic`` / ``on_group``: what else the same pass collects (as
    :func:`prunekit.calibrate.run_sequential` takes them; default: nothing)."""
    blocks = adapter.blocks(model)
    sums = [0.0] * len(blocks)
    count = [0] * len(blocks)

    def hook_for(i: int):
        def hook(_mod, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            ang = token_angles(x, y)
            sums[i] += float(ang.sum())
            count[i] += ang.numel()

        return hook

    handles = [b.register_forward_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        if targets is None:  # the blocks themselves: the engine needs a target per block, its statistic is unused
            targets = [[(f"{adapter.blocks_path}.{i}", b)] for i, b in enumerate(blocks)]
        run_sequential(model, blocks, targets, batches, statistic, on_group or (lambda *a: None),
                       batch_size=batch_size, device=device, progress=progress, desc=desc, propagate=False)
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, count)]


def block_importance(distances: list[float], weights: list[float] | None = None) -> list[float]:
    """CFSP's coarse importance of each block, in (0, 1): ``sigmoid((d_l - mean d) / mean d)``, the mean weighted
    by ``weights`` (e.g. the blocks' prunable parameters; default equal). All 1 when the mean distance is 0."""
    d = torch.tensor(distances, dtype=torch.float64)
    w = torch.ones_like(d) if weights is None else torch.tensor(weights, dtype=torch.float64)
    centre = float((d * w).sum() / w.sum()) if float(w.sum()) > 0 else 0.0
    return (torch.sigmoid((d - centre) / centre) if centre > 0 else torch.ones_like(d)).tolist()


def normalized_importance(distances: list[float]) -> list[float]:
    """Adapt-Pruner's normalization: centred on the mean and divided by the largest deviation, in [-1, 1]
    (all 0 when every block is alike)."""
    d = torch.tensor(distances, dtype=torch.float64)
    z = d - d.mean()
    top = float(z.abs().max()) if z.numel() else 0.0
    return (z / top).tolist() if top > 0 else [0.0] * len(distances)

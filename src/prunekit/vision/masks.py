"""Binary masks for any torch module, kept apart from the weights and enforced during training.

The prunable tensors are the weights of convolutions and linear layers (and the packed q/k/v projection of
``nn.MultiheadAttention``). A :class:`Masks` maps each prunable parameter's name to a bool tensor of its
shape. :meth:`Masks.attach` keeps masked weights at zero while a model trains: it zeroes their gradients
(so momentum and weight decay never revive them) and re-applies the mask after every optimizer step.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from prunekit.errors import PruneError

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Name -> parameter of every prunable weight, in module order; ``exclude``: fnmatch patterns of names."""
    exclude = list(exclude)
    out: dict[str, nn.Parameter] = {}
    for mname, mod in model.named_modules():
        pname = None
        if isinstance(mod, PRUNABLE_TYPES):
            pname = "weight"
        elif isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
            pname = "in_proj_weight"
        if pname is None or getattr(mod, pname, None) is None:
            continue
        name = f"{mname}.{pname}" if mname else pname
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(mname, p) for p in exclude):
            continue
        out[name] = getattr(mod, pname)
    if not out:
        raise PruneError("The model has no prunable weights (Conv/Linear) left after --exclude; exclude fewer layers.")
    return out


class Masks:
    """``{parameter name: bool mask}``; masks live on the CPU/device of their weights, never inside them."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = {k: v.bool() for k, v in masks.items()}
        self._handles: list = []

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, model: nn.Module, exclude: Iterable[str] = ()) -> "Masks":
        return cls({k: torch.ones_like(p, dtype=torch.bool) for k, p in prunable(model, exclude).items()})

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.masks[k]

    def __iter__(self):
        return iter(self.masks)

    def items(self):
        return self.masks.items()

    def copy(self) -> "Masks":
        return Masks({k: v.clone() for k, v in self.masks.items()})

    # -- statistics ---------------------------------------------------------------------------------------
    def numel(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def sparsity(self) -> float:
        """Fraction of the prunable weights that are masked."""
        return 1.0 - self.kept() / max(1, self.numel())

    def layer_density(self) -> dict[str, float]:
        return {k: float(m.float().mean()) for k, m in self.masks.items()}

    # -- enforcement --------------------------------------------------------------------------------------
    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [k for k in self.masks if k not in params]
        if missing:
            raise PruneError(f"Masks name parameters the model lacks ({', '.join(missing[:3])}); "
                             "use masks computed for this model.")
        return {k: params[k] for k in self.masks}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Zero the masked weights in place."""
        for k, p in self._params(model).items():
            p.mul_(self.masks[k].to(p.device, p.dtype))
        return model

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> "Masks":
        """Enforce the masks while training: masked gradients are zeroed by a hook, and the weights are
        re-masked after each ``optimizer.step()`` (a step post-hook). Call :meth:`detach` to stop."""
        self.detach()
        self.apply(model)
        for k, p in self._params(model).items():
            self._handles.append(p.register_hook(lambda g, m=self.masks[k]: g * m.to(g.device, g.dtype)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply(model)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- saving (no pickle) -------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {f"mask::{k}": v.to(torch.uint8).contiguous() for k, v in self.masks.items()}

    @classmethod
    def from_state(cls, sd: dict[str, torch.Tensor]) -> "Masks":
        return cls({k[len("mask::"):]: v.bool() for k, v in sd.items() if k.startswith("mask::")})


def weight_sparsity(model: nn.Module, names: Iterable[str]) -> float:
    """Fraction of exact zeros in the named weights (what a saved model really holds)."""
    params = dict(model.named_parameters())
    z = n = 0
    for k in names:
        z += int((params[k] == 0).sum())
        n += params[k].numel()
    return z / max(1, n)


def check_sparsity(sparsity: float, what: str = "target sparsity") -> float:
    if not isinstance(sparsity, (int, float)) or not (0.0 <= float(sparsity) < 1.0):
        raise PruneError(f"The {what} must be in [0, 1), e.g. 0.9 for 90%; got {sparsity}.")
    return float(sparsity)

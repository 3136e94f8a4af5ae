"""Masks: one type for every family. Convention: True = kept (as torch.ao.pruning and open_lth).

* selection: ``keep_highest`` / ``keep_per_row`` / ``keep_n_of_m`` turn scores into keep masks with exactly the
  requested count; ties are broken by position (among equal scores the earlier positions are removed first),
  never by a ``<= threshold`` that removes too many (dequantized 4-bit weights tie a lot).
* :func:`apportion`: the one largest-remainder rounding helper (integer shares that add up exactly).
* :class:`Masks`: ``{parameter name: bool keep mask}`` for any ``nn.Module``, kept apart from the weights;
  :meth:`Masks.attach` enforces them in any training loop (gradients of removed weights zeroed, weights re-zeroed
  after every optimizer step); :meth:`Masks.from_zeros` reads the masks a pruned model holds.
* :func:`prunable`: the weights a generic module can be masked on (convolutions, linear layers, attention
  in-projections). Decoder-LLM targets come from :mod:`prunekit.arch` instead.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from prunekit.errors import PruneError

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# -- exact rounding ----------------------------------------------------------------------------------------

def round_to_total(targets: Sequence[float], total: int, caps: Sequence[int] | None = None) -> list[int]:
    """Integers near the real ``targets`` (each in [0, cap]) that add up to exactly ``total``: each target rounded
    down, then the slack goes one by one to the largest fractional parts (ties: the earlier index), or is taken
    from the smallest (per-layer counts of every allocation)."""
    n = len(targets)
    caps = [int(c) for c in caps] if caps is not None else [int(total)] * n
    out = [max(0, min(int(math.floor(t)), c)) for t, c in zip(targets, caps)]
    left = int(total) - sum(out)
    order = sorted(range(n), key=lambda i: targets[i] - math.floor(targets[i]), reverse=True)
    while left > 0:
        moved = False
        for i in order:
            if left and out[i] < caps[i]:
                out[i] += 1
                left -= 1
                moved = True
        if not moved:
            break
    while left < 0:
        moved = False
        for i in reversed(order):
            if left and out[i] > 0:
                out[i] -= 1
                left += 1
                moved = True
        if not moved:
            break
    return out


def apportion(total: int, weights: Sequence[float], caps: Sequence[int] | None = None) -> list[int]:
    """Integer shares proportional to ``weights`` that add up to exactly ``total`` (largest remainder), none
    above its cap; what a capped share cannot take is handed on to the others, proportionally. Ties go to the
    earlier index. (Proportional shares of a total: column blocks, class and cluster quotas; per-layer counts
    round their own targets with :func:`round_to_total`.)"""
    n = len(weights)
    caps = [int(c) for c in caps] if caps is not None else [int(total)] * n
    total = int(min(total, sum(caps)))
    quota = [0] * n
    while sum(quota) < total:
        free = [quota[i] < caps[i] for i in range(n)]
        left = total - sum(quota)
        share = [max(float(weights[i]), 0.0) if free[i] else 0.0 for i in range(n)]
        if sum(share) <= 0:
            share = [1.0 if f else 0.0 for f in free]
        norm = sum(share)
        share = [x / norm * left for x in share]
        q = [int(math.floor(x)) for x in share]
        order = [i for i in sorted(range(n), key=lambda i: -(share[i] - q[i])) if free[i]]
        for i in order[: left - sum(q)]:
            q[i] += 1
        quota = [quota[i] + min(q[i], caps[i] - quota[i]) for i in range(n)]
    return quota


def kept_total(numel: int, sparsity: float) -> int:
    """The one rule for "how many": at ``sparsity`` s exactly round((1 - s) * N) of N weights are kept."""
    return int(round((1.0 - float(sparsity)) * numel))


# -- selection: scores -> keep masks with exact counts -----------------------------------------------------

def keep_highest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep mask (same shape) of exactly ``keep`` entries: the highest scores; among ties at the threshold the
    earlier positions are removed first."""
    flat = scores.reshape(-1)
    n = flat.numel()
    drop = n - int(keep)
    mask = torch.ones(n, dtype=torch.bool, device=flat.device)
    if drop <= 0:
        return mask.view(scores.shape)
    if drop >= n:
        return (~mask).view(scores.shape)
    thr = flat.kthvalue(drop).values
    removed = flat < thr
    remaining = drop - int(removed.sum())
    if remaining > 0:
        ties = (flat == thr).nonzero().squeeze(1)[:remaining]
        removed[ties] = True
    return (~removed).view(scores.shape)


_CHUNK = 1 << 22  # rows are independent: select over row chunks of about this many entries (bounded memory)


def _row_chunks(rows: int, cols: int) -> tuple[range, int]:
    step = max(1, _CHUNK // max(1, cols))
    return range(0, rows, step), step


def keep_per_row(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep ``keep`` weights of an ``[out, in]`` matrix with the removals spread evenly over the rows (Wanda's
    comparison group): every row loses ``removed // rows`` of its lowest scores, the first ``removed % rows`` rows
    one more. Ties within a row: the earlier column is removed first. Each row's threshold is its k-th lowest
    score (a selection, not a sort); then the scores below it go, and of those equal to it the first few. Rows are
    done a chunk at a time, so the extra memory is a few MB whatever the layer's size."""
    rows, cols = scores.shape
    base, extra = divmod(scores.numel() - int(keep), rows)
    k = base + (1 if extra else 0)
    keep_mask = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep_mask
    need = torch.full((rows, 1), base, dtype=torch.long, device=scores.device)
    need[:extra] += 1  # how many each row loses
    starts, step = _row_chunks(rows, cols)
    for r0 in starts:
        r1 = min(rows, r0 + step)
        s, n = scores[r0:r1], need[r0:r1]
        thr = s.kthvalue(k, dim=1, keepdim=True).values
        if extra and base > 0 and r1 > extra:  # the rows past the first ``extra`` stop at their base-th lowest
            thr = torch.where(n == base, s.kthvalue(base, dim=1, keepdim=True).values, thr)
        below = s < thr
        ties = s == thr
        room = n - below.sum(1, keepdim=True)  # how many of the tied scores go, earliest first
        keep_mask[r0:r1] = ~(below | (ties & (ties.cumsum(1) <= room)))
    return keep_mask


def keep_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The ``N:M`` pattern: in every group of ``m`` consecutive inputs of each row the ``n`` lowest scores are
    removed (prunekit's N:M = N zeros in every M, so 2:4 is the 2:4 of sparse tensor cores)."""
    out, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not divisible by M={m}")
    keep = torch.ones((out, cols // m, m), dtype=torch.bool, device=scores.device)
    starts, step = _row_chunks(out, cols)
    for r0 in starts:
        r1 = min(out, r0 + step)
        idx = scores[r0:r1].reshape(r1 - r0, cols // m, m).argsort(dim=2, stable=True)[..., :n]
        keep[r0:r1].scatter_(2, idx, False)
    return keep.view(out, cols)


def zero_removed_(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Set the weights where ``keep`` is False to +0.0, in place (a multiply by the mask, several times faster than
    ``masked_fill_`` on a CPU; adding +0.0 turns the -0.0 of negative removed weights into +0.0)."""
    return w.mul_(keep).add_(0.0)


def layer_keep_mask(scores: torch.Tensor, keep: int | None, nm: tuple[int, int] | None, group: str = "row") -> torch.Tensor:
    """Keep mask for one ``[out, in]`` layer: N:M when ``nm`` is given, else ``keep`` weights chosen per ``row``
    (removals spread over the rows) or over the whole ``layer``."""
    if nm is not None:
        return keep_n_of_m(scores, *nm)
    return keep_per_row(scores, keep) if group == "row" else keep_highest(scores, keep)


# -- which weights of a generic module can be masked ------------------------------------------------------

def prunable(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Name -> parameter of every prunable weight, in module order; ``exclude``: fnmatch patterns of names."""
    exclude = list(exclude)
    out: dict[str, nn.Parameter] = {}
    for mname, mod in model.named_modules():
        pname = None
        if isinstance(mod, PRUNABLE_TYPES) or type(mod).__name__ == "Conv1D":
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


def check_sparsity(sparsity: float, what: str = "target sparsity") -> float:
    if not isinstance(sparsity, (int, float)) or not (0.0 <= float(sparsity) < 1.0):
        raise PruneError(f"The {what} must be in [0, 1), e.g. 0.9 for 90%; got {sparsity}.")
    return float(sparsity)


def weight_sparsity(model: nn.Module, names: Iterable[str]) -> float:
    """Fraction of exact zeros in the named weights (what a saved model really holds)."""
    params = dict(model.named_parameters())
    z = n = 0
    for k in names:
        z += int((params[k] == 0).sum())
        n += params[k].numel()
    return z / max(1, n)


class Masks:
    """``{parameter name: bool mask}``, True = kept; masks live beside the weights, never inside them."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = {k: v.bool() for k, v in masks.items()}
        self._handles: list = []

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, model: nn.Module, exclude: Iterable[str] = ()) -> Masks:
        return cls({k: torch.ones_like(p, dtype=torch.bool) for k, p in prunable(model, exclude).items()})

    @classmethod
    def from_zeros(cls, model: nn.Module, names: Iterable[str] | None = None) -> Masks:
        """The masks a pruned model holds: kept = the weight is not exactly zero (``names``: parameter names;
        default every prunable weight)."""
        params = dict(model.named_parameters())
        names = list(prunable(model)) if names is None else list(names)
        missing = [k for k in names if k not in params]
        if missing:
            raise PruneError(f"The model has no parameter {missing[0]!r}.")
        return cls({k: params[k].detach() != 0 for k in names})

    @classmethod
    def from_scores(cls, scores: dict[str, torch.Tensor], keep: dict[str, int]) -> Masks:
        """Per layer, the ``keep[name]`` highest scores (ties: earlier positions removed first)."""
        return cls({k: keep_highest(s.detach().cpu(), keep[k]) for k, s in scores.items()})

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.masks[k]

    def __iter__(self):
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def items(self):
        return self.masks.items()

    def copy(self) -> Masks:
        return Masks({k: v.clone() for k, v in self.masks.items()})

    # -- statistics ---------------------------------------------------------------------------------------
    def numel(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def sparsity(self) -> float:
        """Fraction of the masked weights that are removed."""
        return 1.0 - self.kept() / max(1, self.numel())

    def layer_density(self) -> dict[str, float]:
        return {k: float(m.float().mean()) for k, m in self.masks.items()}

    def stats(self) -> dict:
        return {"layers": len(self.masks), "params": self.numel(), "kept": self.kept(), "sparsity": self.sparsity()}

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
        """Zero the removed weights in place."""
        for k, p in self._params(model).items():
            zero_removed_(p, self.masks[k].to(p.device))
        return model

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Masks:
        """Enforce the masks while training: gradients of removed weights are zeroed by a hook (so momentum and
        weight decay never revive them), and the weights are re-masked after each ``optimizer.step()``. Call
        :meth:`detach` to stop."""
        self.detach()
        self.apply(model)
        for k, p in self._params(model).items():
            self._handles.append(p.register_hook(lambda g, m=self.masks[k]: g.masked_fill(~m.to(g.device), 0.0)))
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
    def from_state(cls, sd: dict[str, torch.Tensor]) -> Masks:
        return cls({k[len("mask::"):]: v.bool() for k, v in sd.items() if k.startswith("mask::")})

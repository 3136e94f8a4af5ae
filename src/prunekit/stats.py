"""Statistics of a layer's input collected over calibration tokens, one class per kind.

``sqnorm``: sum over tokens of x_j^2 per input channel (Wanda's ||X_j||_2^2).
``hessian``: sum over tokens of x x^T (SparseGPT's H, up to a constant factor).
``meanvar``: per input channel, the mean and the (population) variance over tokens, as ``value[0]`` and
``value[1]`` (FLAP's fluctuation and bias compensation).
``rows``: the input rows themselves, [tokens, features] (expert pruning: a MoE layer's inputs).
"""

from __future__ import annotations

import torch


class SqNorm:
    def __init__(self, features: int, device=None):
        self.value = torch.zeros(features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.value += x.pow(2).sum(0)
        self.tokens += x.shape[0]


class Hessian:
    def __init__(self, features: int, device=None):
        self.value = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.value.addmm_(x.t(), x)
        self.tokens += x.shape[0]


class MeanVar:
    """Sums in float64 so that variance = E[x^2] - E[x]^2 does not cancel badly over many tokens."""

    def __init__(self, features: int, device=None):
        self._sum = torch.zeros(features, dtype=torch.float64, device=device)
        self._sq = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self._sum += x.sum(0)
        self._sq += x.pow(2).sum(0)
        self.tokens += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        n = max(self.tokens, 1)
        mean = self._sum / n
        var = (self._sq / n - mean.pow(2)).clamp_min(0)
        return torch.stack([mean, var]).float()


class Rows:
    """The input rows themselves, [tokens, features] (expert pruning reads a MoE layer's inputs again)."""

    def __init__(self, features: int, device=None):
        self._parts: list[torch.Tensor] = []
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self._parts.append(x.clone())
        self.tokens += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return torch.cat(self._parts) if self._parts else torch.zeros(0)


STATS = {"sqnorm": SqNorm, "hessian": Hessian, "meanvar": MeanVar, "rows": Rows}

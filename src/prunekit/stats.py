"""Statistics of a layer's input collected over calibration tokens, one class per kind.

``sqnorm``: sum over tokens of x_j^2 per input channel (Wanda's ||X_j||_2^2).
``hessian``: sum over tokens of x x^T (SparseGPT's H, up to a constant factor).
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


STATS = {"sqnorm": SqNorm, "hessian": Hessian}

"""Hard-concrete gates (Louizos, Welling & Kingma 2018, "Learning sparse neural networks through L0
regularization"): one learnable ``log_alpha`` per unit, a differentiable sample in [0, 1] that is exactly 0 or 1
with positive probability, and a closed-form probability of being non-zero (what an expected size counts).

A sample: ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / T)``, stretched to
``(GAMMA, ZETA) = (-0.1, 1.1)`` and clamped to [0, 1]. As the temperature ``T`` goes to 0 the sample becomes a
step function of ``log_alpha + logistic noise``: every gate is 0 or 1. ``P(z != 0) = sigmoid(log_alpha - T
log(-GAMMA / ZETA))``; the test-time gate is ``clamp(sigmoid(log_alpha) (ZETA - GAMMA) + GAMMA, 0, 1)``.

The size target is a Lagrangian (CoFi, Xia et al. 2022; Compresso): ``lambda1 (s - t) + lambda2 (s - t)^2`` with
``s`` the expected kept size and ``t`` the target one; the multipliers are trained by gradient *ascent*
(:func:`ascend`), the gates by descent, so the constraint is enforced as tightly as training allows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

GAMMA, ZETA = -0.1, 1.1  # the stretch interval of the hard-concrete distribution
TEMPERATURE = 2.0 / 3.0  # Louizos et al.'s beta
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # CoFi clamps log_alpha here after every step
_EPS = 1e-6


def sample(log_alpha: torch.Tensor, temperature: float = TEMPERATURE,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One differentiable hard-concrete sample per entry of ``log_alpha``, in [0, 1]."""
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    u = u.clamp(_EPS, 1 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """``P(z != 0)`` of each gate (differentiable): the expected kept share of a unit."""
    return torch.sigmoid(log_alpha - temperature * math.log(-GAMMA / ZETA))


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """Louizos et al.'s deterministic test-time gate: ``clamp(sigmoid(log_alpha) (ZETA - GAMMA) + GAMMA, 0, 1)``."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def lagrangian(gaps: torch.Tensor, lambda1: torch.Tensor, lambda2: torch.Tensor) -> torch.Tensor:
    """``lambda1 sum(s - t) + lambda2 sum((s - t)^2)`` over ``gaps = s - t`` (one gap for one global target, one
    per layer for per-layer targets)."""
    return lambda1 * gaps.sum() + lambda2 * gaps.pow(2).sum()


def ascend(param: nn.Parameter) -> nn.Parameter:
    """Make ``param`` climb its loss: its gradient is negated as it is computed, so any minimizing optimizer
    maximizes over it (the Lagrange multipliers of :func:`lagrangian`)."""
    param.register_hook(lambda g: -g)
    return param


def init_log_alpha(n: int, keep_prob: float = 0.95, noise: float = 0.01,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` log-alphas whose gates start open with probability about ``keep_prob`` (plus a little noise, as
    Louizos et al. initialize)."""
    mean = math.log(keep_prob) - math.log1p(-keep_prob)
    return mean + noise * torch.randn(n, generator=generator)

"""The method interface.

The calibration engine groups the target layers of a block by the input they read (q/k/v read the same
normalized hidden states, gate/up too), collects the statistic the method asks for once per group, then
calls ``prune_group`` with the group's ``[out, in]`` weight views. A method zeroes weights in place (and
may update the surviving ones, as SparseGPT does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Method(ABC):
    name: str = ""
    statistic: str | None = None  # None (data-free), "sqnorm" (sum of x_j^2 per input), "hessian" (sum x x^T)

    @abstractmethod
    def prune_group(
        self, weights: list[torch.Tensor], stat: torch.Tensor | None, sparsity: float, nm: tuple[int, int] | None
    ) -> None:
        """Prune every ``[out, in]`` matrix in ``weights`` (all read the same input) in place."""

"""The method interface.

The calibration engine groups the target layers of a block by the input they read (q/k/v read the same
normalized hidden states, gate/up too), collects the statistic the method asks for once per group, then
calls ``prune_group`` with the group's ``[out, in]`` weight views. A method zeroes weights in place (and
may update the surviving ones, as SparseGPT does).

``counts[i]`` is the exact number of weights to remove from ``weights[i]`` (unstructured); the allocation
(uniform, global, OWL, a per-layer list) decides it. With an N:M pattern ``counts`` is None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from prunekit.core.registry import Registry


def _load_methods() -> None:
    import prunekit.methods  # noqa: F401  (each method file registers itself)


METHODS = Registry("method", loader=_load_methods)


class Method(ABC):
    name: str = ""
    statistic: str | None = None  # None (data-free), "sqnorm" (sum of x_j^2 per input), "hessian" (sum x x^T)

    def prepare(self, model, batches: torch.Tensor | None, targets: list[tuple[str, torch.nn.Module]], progress: bool) -> None:
        """Work done once on the dense model before the block-by-block pass (e.g. GBLM's gradients)."""

    @abstractmethod
    def prune_group(
        self,
        weights: list[torch.Tensor],
        stat: torch.Tensor | None,
        counts: list[int] | None,
        nm: tuple[int, int] | None,
        names: list[str],
    ) -> None:
        """Prune every ``[out, in]`` matrix in ``weights`` (all read the same input) in place."""

    def importance(self, weight: torch.Tensor, sqnorm: torch.Tensor | None, name: str) -> torch.Tensor:
        """Per-weight importance used to allocate sparsity across layers (global threshold, OWL outliers).

        Data-aware methods use |W_ij| * ||X_j||_2 (for SparseGPT the square root of the OBS saliency
        w^2 * H_jj with a diagonal Hessian); magnitude uses |W|.
        """
        if sqnorm is None:
            return weight.abs()
        return weight.abs() * sqnorm.sqrt().to(weight.dtype).unsqueeze(0)

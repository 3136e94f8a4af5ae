"""The 2-D ``[out, in]`` weight view of a prunable layer, whatever its storage.

``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]``. Methods work on the view;
writes to it land in the module's parameter.
"""

from __future__ import annotations

import torch
from torch import nn


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` view of the weight (no copy)."""
    w = module.weight.data
    return w.t() if type(module).__name__ == "Conv1D" else w


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]

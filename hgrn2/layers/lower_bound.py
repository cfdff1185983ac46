"""The layer-wise lower bound on the forget gate (HGRN1/HGRN2, "lower bound" β)."""

from __future__ import annotations

import torch
from torch import nn


def lower_bound_schedule(gamma: torch.Tensor) -> torch.Tensor:
    """β = cumsum(softmax(Γ, dim=layers)) - softmax(Γ)[0] for Γ ``[L, D]``.

    β is 0 at layer 0, non-decreasing with depth, and below 1 everywhere (it ends at 1 - softmax(Γ)[0]).
    """
    probs = gamma.softmax(dim=0)
    return probs.cumsum(dim=0) - probs[:1]


class LayerLowerBounds(nn.Module):
    """Learnable Γ ``[num_layers, dim]``; calling the module returns β ``[num_layers, dim]``."""

    def __init__(self, num_layers: int, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(num_layers, dim))

    def forward(self) -> torch.Tensor:
        return lower_bound_schedule(self.gamma)

"""The gated linear unit used as the channel mixer of every block."""

from __future__ import annotations

import torch
from torch import nn

from hgrn2.ops.gates import activation


class GLU(nn.Module):
    """GLU(x) = W_3 (act(W_1 x) ⊙ W_2 x); act is the identity in the paper's LM."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "identity", bias: bool = False):
        super().__init__()
        self.activation = activation
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)  # W_1
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)  # W_2
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)  # W_3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(activation(self.gate_proj(x), self.activation) * self.up_proj(x))

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

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """x ``[..., D]`` -> ``[..., D]``. ``fused`` runs :func:`hgrn2.ops.fused_glu.fused_glu` (the same function,
        keeping only W_1 x and W_2 x for the backward; output in the autocast dtype) for the activations it has."""
        if fused:
            from hgrn2.ops.fused_glu import FUSED_GLU_ACTIVATIONS, fused_glu  # imports triton: where kernels run

            if self.activation in FUSED_GLU_ACTIVATIONS:
                weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
                biases = (self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias)
                return fused_glu(x, *weights, *biases, act=self.activation, backend="triton")
        return self.down_proj(activation(self.gate_proj(x), self.activation) * self.up_proj(x))

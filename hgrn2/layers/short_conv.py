"""A short causal depthwise convolution over time, put in front of a token mixer (as in Zoology's MQAR models)."""

from __future__ import annotations

import torch
from torch import nn


class ShortConvolution(nn.Module):
    """``y_t = Σ_{j < k} w_j ⊙ x_{t-j}`` per channel, with ``x_{t-j} = 0`` before the sequence start.

    ``weight`` is ``[D, k]``: column j weighs the input j steps back. It starts as the identity (``w_0 = 1``, the
    other taps 0), so a fresh model computes what it would without the convolution. The mixer that follows
    sees, at every position, a learned mix of the last k inputs: what lets a recurrence bind a value to the
    key just before it (multi-query associative recall) without spending its state on that.
    """

    def __init__(self, hidden_size: int, kernel_size: int):
        super().__init__()
        if hidden_size < 1 or kernel_size < 1:
            raise ValueError(f"hidden_size and kernel_size must be >= 1, got {hidden_size} and {kernel_size}")
        self.hidden_size, self.kernel_size = hidden_size, kernel_size
        self.weight = nn.Parameter(torch.empty(hidden_size, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, 0] = 1.0

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[B, T, D]`` -> ``[B, T, D]``; with ``cu_seqlens`` (B = 1) no tap reaches into the previous sequence."""
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [B, T, D] with D = {self.hidden_size}, got {list(x.shape)}")
        seq_len = x.shape[1]
        weight = self.weight.to(x.dtype)
        position = None
        if cu_seqlens is not None:  # each token's position inside its own sequence
            steps = torch.arange(seq_len, device=x.device)
            starts = cu_seqlens[torch.searchsorted(cu_seqlens[1:], steps, right=True)]
            position = (steps - starts)[None, :, None]  # [1, T, 1]
        y = x * weight[:, 0]
        for j in range(1, min(self.kernel_size, seq_len)):
            shifted = torch.cat([x.new_zeros(x.shape[0], j, x.shape[2]), x[:, :-j]], dim=1)  # x_{t-j}
            if position is not None:
                shifted = shifted * (position >= j)
            y = y + shifted * weight[:, j]
        return y

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, kernel_size={self.kernel_size}"

"""Short depthwise convolutions put in front of a token mixer: causal over time (as in Zoology's MQAR models),
or over the pixel grid of a 2-D model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class GridConvolution(nn.Module):
    """A depthwise k×k convolution over a row-major grid ``[B, h·w, D]``, then SiLU (non-causal, zero padding).

    ``dilation`` spaces the taps that many pixels apart, so that a stack of them with growing dilations sees
    far across the image at k² weights per channel and layer. In front of a 2-D HGRU2 it gives the mixer the
    local shape of the image: the mixer's row and column scans are running averages with non-negative weights,
    which blur the pixels that a thin path is made of.
    """

    def __init__(self, hidden_size: int, kernel_size: int = 3, dilation: int = 1):
        super().__init__()
        if hidden_size < 1 or kernel_size < 1 or kernel_size % 2 == 0 or dilation < 1:
            raise ValueError(
                "need hidden_size >= 1, an odd kernel_size and dilation >= 1, got "
                f"{hidden_size}, {kernel_size} and {dilation}"
            )
        self.hidden_size, self.kernel_size, self.dilation = hidden_size, kernel_size, dilation
        self.conv = nn.Conv2d(
            hidden_size,
            hidden_size,
            kernel_size,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=hidden_size,
        )

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """x ``[B, h·w, D]`` with ``grid_size=(h, w)`` (square by default) -> ``[B, h·w, D]``."""
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [B, h·w, D] with D = {self.hidden_size}, got {list(x.shape)}")
        batch, length, dim = x.shape
        height, width = grid_size or (int(round(length**0.5)),) * 2
        if height * width != length:
            raise ValueError(f"sequence length {length} is not a {height}×{width} grid; pass grid_size=(h, w)")
        image = x.transpose(1, 2).reshape(batch, dim, height, width)
        return F.silu(self.conv(image)).reshape(batch, dim, length).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, kernel_size={self.kernel_size}, dilation={self.dilation}"

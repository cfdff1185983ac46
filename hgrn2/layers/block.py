"""The pre-norm residual block: x + mixer(norm(x)), then x + GLU(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from hgrn2.layers.glu import GLU
from hgrn2.layers.norm import make_norm


class Block(nn.Module):
    """A pre-norm block around any token mixer (HGRU2, HGRU1 or a non-causal variant).

    ``glu_hidden_size=0`` drops the channel mixer (LRA configs without GLU).
    """

    def __init__(
        self,
        mixer: nn.Module,
        glu_hidden_size: int,
        norm: str = "simple_rmsnorm",
        glu_activation: str = "identity",
        bias: bool = False,
    ):
        super().__init__()
        dim = mixer.hidden_size
        self.mixer_norm = make_norm(norm, dim)
        self.mixer = mixer
        self.glu_norm = make_norm(norm, dim) if glu_hidden_size else None
        self.glu = GLU(dim, glu_hidden_size, glu_activation, bias=bias) if glu_hidden_size else None

    def mixer_input(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """What the token mixer reads: the normalised residual stream."""
        return self.mixer_norm(x)

    def _channel_mix(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.glu is None else x + self.glu(self.glu_norm(x))

    def forward(
        self, x: torch.Tensor, lower_bound: torch.Tensor | None = None, **mixer_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x ``[B, T, D]`` -> ``(x', mixer state or None)``; extra keywords go to the mixer."""
        mixed = self.mixer_input(x, mixer_kwargs.get("cu_seqlens"))
        y, state = self.mixer(mixed, lower_bound=lower_bound, **mixer_kwargs)
        return self._channel_mix(x + y), state

    def step(
        self, x: torch.Tensor, state: torch.Tensor | None = None, lower_bound: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: x ``[B, D]`` -> ``(x', new state)``."""
        y, state = self.mixer.step(self.mixer_norm(x), state, lower_bound=lower_bound)
        return self._channel_mix(x + y), state

"""HGRU1: the HGRN1 token mixer (element-wise gated recurrence), the baseline of the paper."""

from __future__ import annotations

import torch
from torch import nn

from hgrn2.layers.norm import add_and_norm, make_norm, runs_fused_kernels
from hgrn2.ops import hgrn1_recurrence, lower_bounded_log_forget
from hgrn2.ops.gates import activation
from hgrn2.ops.reference import accumulation_dtype


class HGRU1(nn.Module):
    """h_t = λ_t ⊙ h_{t-1} + (1 - λ_t) ⊙ i_t with λ lower-bounded by β; y = W_o norm(o ⊙ h).

    o = output_gate(W_q x), i = input_activation(W_i x), λ = β + (1 - β) σ(W_f x). Its state is ``[B, D]``.
    HGRU2 with ``expand_ratio=1`` computes the same function with the same weights. ``fused`` as in
    :class:`~hgrn2.layers.HGRU2`: an RMS output norm on the fused kernel wherever the recurrence runs on Triton.
    """

    def __init__(
        self,
        hidden_size: int,
        output_gate: str = "silu",
        input_activation: str = "identity",
        norm: str = "simple_rmsnorm",
        bias: bool = False,
        backend: str = "auto",
        fused: bool = False,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.output_gate = output_gate
        self.input_activation = input_activation
        self.backend = backend
        self.fused = fused
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.f_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.i_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.norm = make_norm(norm, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=bias)

    @property
    def state_shape(self) -> tuple[int]:
        return (self.hidden_size,)

    def runs_fused(self, x: torch.Tensor) -> bool:
        """Whether this layer's norm runs on the fused kernel for ``x`` (``fused`` and a Triton recurrence)."""
        return self.fused and runs_fused_kernels(self.backend, x.device)

    def _gates(self, x: torch.Tensor, lower_bound: torch.Tensor | None):
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must end in D = hidden_size = {self.hidden_size}, got {list(x.shape)}")
        if lower_bound is not None and lower_bound.shape != (self.hidden_size,):
            raise ValueError(f"lower_bound must have shape [D] = [{self.hidden_size}], got {list(lower_bound.shape)}")
        output_gate = activation(self.q_proj(x), self.output_gate)
        log_forget = lower_bounded_log_forget(self.f_proj(x), lower_bound)
        value = activation(self.i_proj(x), self.input_activation)
        return output_gate, value, log_forget

    def forward(
        self,
        x: torch.Tensor,
        lower_bound: torch.Tensor | None = None,
        initial_state: torch.Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x ``[B, T, D]`` -> ``(y [B, T, D], final state [B, D] or None)``."""
        if x.dim() != 3:
            raise ValueError(f"x must have shape [B, T, D], got {list(x.shape)}")
        output_gate, value, log_forget = self._gates(x, lower_bound)
        h, state = hgrn1_recurrence(
            value,
            log_forget,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
        normed, _ = add_and_norm(self.norm, output_gate * h, fused=self.runs_fused(x))
        return self.o_proj(normed), state

    def step(
        self, x: torch.Tensor, state: torch.Tensor | None = None, lower_bound: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: x ``[B, D]``, state ``[B, D]`` or None -> ``(y [B, D], new state)``."""
        if x.dim() != 2:
            raise ValueError(f"x must have shape [B, D], got {list(x.shape)}")
        output_gate, value, log_forget = self._gates(x, lower_bound)
        acc = accumulation_dtype(x.dtype)
        if state is None:
            state = x.new_zeros(x.shape[0], self.hidden_size, dtype=acc)
        log_forget = log_forget.to(acc)
        state = log_forget.exp() * state - torch.expm1(log_forget) * value.to(acc)
        return self.o_proj(self.norm(output_gate * state.to(x.dtype))), state

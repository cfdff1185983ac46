"""HGRU2: the HGRN2 token mixer (causal, 1-D), with a recurrent step for decoding."""

from __future__ import annotations

import torch
from torch import nn

from hgrn2.layers.norm import add_and_norm, make_norm, runs_fused_kernels
from hgrn2.ops import hgrn2_gated_recurrence, hgrn2_step, lower_bounded_log_forget
from hgrn2.ops.gates import activation
from hgrn2.ops.reference import accumulation_dtype


def check_forget_gate_range(low: float, high: float, name: str = "the initial forget gates") -> None:
    """Raises a ValueError naming ``name`` unless 0 < low <= high < 1 (a range of forget-gate values)."""
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high < 1, got ({low}, {high})")


class HGRU2(nn.Module):
    """The HGRN2 token mixer.

    For input x ``[B, T, D]`` with ``H = D / expand_ratio`` heads of ``K = V = expand_ratio``:
    o = output_gate(W_q x) (the query), log λ = logaddexp(log β, log1p(-β) + logsigmoid(W_f x)),
    i = input_activation(W_i x) (the value); per head S_t = diag(λ_t) S_{t-1} + (1 - λ_t) ⊗ i_t and
    y_t = scale · o_t^T S_t; then norm and W_o. β (the layer's lower bound, ``[D]``) is passed in.

    Defaults are the paper's LM: SiLU output gate, identity input, SimpleRMSNorm, no biases, scale 1.
    ``scale=None`` means ``K ** -0.5`` (fla's choice). ``precise_bound_grad=True`` makes the chunked kernels
    keep float32 states where β's gradient is formed (slower, that gradient slightly more exact; see
    :func:`hgrn2.ops.chunk.chunk_hgrn2_gated`). ``fused=True`` runs an RMS output norm as one Triton kernel
    wherever the recurrence runs on Triton (:func:`hgrn2.layers.norm.add_and_norm`); the math is the same.
    """

    def __init__(
        self,
        hidden_size: int,
        expand_ratio: int = 128,
        output_gate: str = "silu",
        input_activation: str = "identity",
        norm: str = "simple_rmsnorm",
        norm_per_head: bool = False,
        bias: bool = False,
        scale: float | None = 1.0,
        backend: str = "auto",
        precise_bound_grad: bool = False,
        fused: bool = False,
    ):
        super().__init__()
        if expand_ratio < 1 or hidden_size % expand_ratio:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of expand_ratio ({expand_ratio}): "
                "the heads are hidden_size / expand_ratio"
            )
        self.hidden_size = hidden_size
        self.expand_ratio = expand_ratio
        self.num_heads = hidden_size // expand_ratio
        self.output_gate = output_gate
        self.input_activation = input_activation
        self.scale = expand_ratio**-0.5 if scale is None else float(scale)
        self.backend = backend
        self.precise_bound_grad = precise_bound_grad
        self.fused = fused
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)  # output gate o
        self.f_proj = nn.Linear(hidden_size, hidden_size, bias=bias)  # forget gate f
        self.i_proj = nn.Linear(hidden_size, hidden_size, bias=bias)  # input i
        self.norm = make_norm(norm, hidden_size, groups=self.num_heads if norm_per_head else 1)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=bias)

    def init_forget_gate(self, low: float, high: float) -> None:
        """Sets the forget projection's bias so that, for a zero input, the gate sigmoid(W_f x + b) runs evenly
        from ``low`` to ``high`` over the channels (before the layer's lower bound lifts it). Gates near 1 make
        the recurrence remember over long spans from the first step on."""
        if self.f_proj.bias is None:
            raise ValueError("init_forget_gate needs a forget projection with a bias; build the mixer with bias=True")
        check_forget_gate_range(low, high)
        gates = torch.linspace(low, high, self.hidden_size, dtype=torch.float64)
        with torch.no_grad():
            self.f_proj.bias.copy_(torch.logit(gates).to(self.f_proj.bias.dtype))

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """Per-sample recurrent state: ``(H, K, V)``."""
        return (self.num_heads, self.expand_ratio, self.expand_ratio)

    def _check_input(self, x: torch.Tensor, rank: int) -> None:
        if x.dim() != rank or x.shape[-1] != self.hidden_size:
            layout = "[B, T, D]" if rank == 3 else "[B, D]"
            raise ValueError(
                f"x must have shape {layout} with D = hidden_size = {self.hidden_size} "
                f"(H·K = {self.num_heads}·{self.expand_ratio}), got {list(x.shape)}"
            )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.expand_ratio))  # [..., H, K]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw output-gate and forget projections and the activated input, each split into heads."""
        q_proj = self._heads(self.q_proj(x))
        forget_proj = self._heads(self.f_proj(x))
        value = self._heads(activation(self.i_proj(x), self.input_activation))
        return q_proj, value, forget_proj

    def runs_fused(self, x: torch.Tensor) -> bool:
        """Whether this layer's norm runs on the fused kernel for ``x`` (``fused`` and a Triton recurrence)."""
        return self.fused and runs_fused_kernels(self.backend, x.device)

    def gated_recurrence(
        self,
        q_proj: torch.Tensor,
        value: torch.Tensor,
        forget_proj: torch.Tensor,
        lower_bound: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The recurrence from the raw projections ``[B, T, H, K]`` and β ``[H, K]`` with this layer's output
        gate, scale, backend and ``precise_bound_grad``; ``kwargs`` (initial_state, output_final_state,
        cu_seqlens) go to :func:`hgrn2.ops.hgrn2_gated_recurrence`."""
        return hgrn2_gated_recurrence(
            q_proj,
            value,
            forget_proj,
            lower_bound,
            output_gate=self.output_gate,
            scale=self.scale,
            backend=self.backend,
            precise_bound_grad=self.precise_bound_grad,
            **kwargs,
        )

    def finish(self, o: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Merge heads ``[..., H, V]`` -> ``[..., D]``, normalise (on the fused kernel with ``fused``), project out."""
        normed, _ = add_and_norm(self.norm, o.flatten(-2), fused=fused)
        return self.o_proj(normed)

    def _head_lower_bound(self, lower_bound: torch.Tensor | None) -> torch.Tensor | None:
        if lower_bound is None:
            return None
        if lower_bound.shape != (self.hidden_size,):
            raise ValueError(f"lower_bound must have shape [D] = [{self.hidden_size}], got {list(lower_bound.shape)}")
        return self._heads(lower_bound)

    def forward(
        self,
        x: torch.Tensor,
        lower_bound: torch.Tensor | None = None,
        initial_state: torch.Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x ``[B, T, D]`` -> ``(y [B, T, D], final state [B, H, K, V] or None)``."""
        self._check_input(x, 3)
        q_proj, value, forget_proj = self.project(x)  # [B, T, H, K] each
        o, state = self.gated_recurrence(
            q_proj,
            value,
            forget_proj,
            self._head_lower_bound(lower_bound),
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
        return self.finish(o, self.runs_fused(x)), state

    def step(
        self, x: torch.Tensor, state: torch.Tensor | None = None, lower_bound: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: x ``[B, D]``, state ``[B, H, K, V]`` or None -> ``(y [B, D], new state)``."""
        self._check_input(x, 2)
        q_proj, value, forget_proj = self.project(x)
        if state is None:
            state = x.new_zeros(x.shape[0], *self.state_shape, dtype=accumulation_dtype(x.dtype))
        o, state = hgrn2_step(
            activation(q_proj, self.output_gate),
            value,
            lower_bounded_log_forget(forget_proj, self._head_lower_bound(lower_bound)),
            state,
            scale=self.scale,
            backend=self.backend,
        )
        return self.finish(o), state

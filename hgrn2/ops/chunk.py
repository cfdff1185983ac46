"""Chunked Triton kernels of the HGRN2 recurrence, forward and backward, as a ``torch.autograd.Function``.

Per head: S_t = diag(λ_t) S_{t-1} + (1 - λ_t) ⊗ v_t and o_t = scale · q_t^T S_t. The forward stores the
state entering every chunk (bfloat16 for bfloat16 inputs, else float32) and the backward reuses it; the
key 1 - λ is derived inside the kernels and never written. The kernels live in ``hgrn2.ops.chunk_fwd``
and ``hgrn2.ops.chunk_bwd``.

The gradient of the gated entry's lower bound sums d log λ over every position of every sequence, and the
terms of d log λ cancel against one another, so it magnifies the rounding of half-precision states and matmul
operands (relative error 2.5e-2 at T = 1024 in bfloat16). When that gradient is asked for, the state kernels
keep the chunk states in float32 and the forward state and dq/dk kernels multiply in TF32 (1e-3 through the
interpreter, which multiplies in float32). ``precise_bound_grad=False`` (per call) or
``PRECISE_BOUND_GRAD = False`` (the default of every call) turns this off: the LM then trains 7.4% faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hgrn2.ops.chunk_bwd import dqk_bwd_kernel, dv_bwd_kernel, state_bwd_kernel
from hgrn2.ops.chunk_fwd import output_fwd_kernel, state_fwd_kernel
from hgrn2.ops.gates import activation
from hgrn2.ops.kernel_utils import (
    FUSED_ACTIVATIONS,
    bound_constants,
    check_kernel_dtype,
    dot_config,
    interpreting,
    sequence_layout,
    state_dtype,
)

CHUNK = 64  # steps per chunk
SUB_CHUNK = 16  # steps per sub-block inside a chunk (the smallest tile a matmul takes)
PRECISE_BOUND_GRAD = True  # default: float32 states and TF32 matmuls where the lower bound's gradient is computed

__all__ = ["chunk_hgrn2", "chunk_hgrn2_gated"]


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _state_tiles(n_heads_total: int, key_dim: int, value_dim: int, device: torch.device) -> tuple[int, int]:
    """K and V tiles of the sequential state kernels: 64, or 32 when that leaves the GPU half idle."""
    bk, bv = min(64, _pow2(key_dim)), min(64, _pow2(value_dim))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    if n_heads_total * triton.cdiv(key_dim, bk) * triton.cdiv(value_dim, bv) < 2 * sms:
        bk, bv = min(32, bk), min(32, bv)
    return bk, bv


def _value_tile(key_dim: int, value_dim: int) -> int:
    """V tile of the chunk-parallel kernels, which hold all K channels: a [K, V] state tile of <= 128 x 128."""
    return min(_pow2(value_dim), 128 if _pow2(key_dim) <= 128 else 64)


class _Launch:
    """Shapes, chunk layout and compile-time flags shared by the four kernels of one call."""

    def __init__(self, q, v, cu_seqlens, gated, act, lower_bound, precise):
        self.batch, self.seq_len, self.heads, self.key_dim = q.shape
        self.value_dim = v.shape[-1]
        self.n_seqs, self.n_chunks, self.chunk_offsets, self.chunk_indices = sequence_layout(
            self.batch, self.seq_len, cu_seqlens, CHUNK
        )
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        self.cu_seqlens = cu_seqlens if cu_seqlens is not None else dummy
        self.chunk_offsets = self.chunk_offsets if self.chunk_offsets is not None else dummy
        self.chunk_indices = self.chunk_indices if self.chunk_indices is not None else dummy
        self.bk, self.bv = _state_tiles(self.n_seqs * self.heads, self.key_dim, self.value_dim, q.device)
        self.state_warps = 8 if self.bk * self.bv >= 64 * 64 else 4
        self.bk_full = _pow2(self.key_dim)
        self.bv_out = _value_tile(self.key_dim, self.value_dim)
        dot_dtype, precision = dot_config(q.dtype)
        self.flags = dict(
            H=self.heads, K=self.key_dim, V=self.value_dim, C=CHUNK, IS_VARLEN=cu_seqlens is not None,
            GATED=gated, HAS_BOUND=lower_bound is not None, DT=dot_dtype, PRECISION=precision,
            INTERPRET=interpreting(),
        )  # fmt: skip
        self.act = act
        self.bound = bound_constants(lower_bound, self.heads, self.key_dim, q.device)
        precise = precise and q.dtype != torch.float32
        self.state_dtype = torch.float32 if precise else state_dtype(q.dtype)
        # matmul settings of the two kernels whose rounding the lower bound's gradient magnifies
        self.precise_flags = dict(DT=tl.float32, PRECISION="tf32") if precise else {}


def _forward(q, v, g, launch: _Launch, scale, initial_state, output_final_state, keep_scores):
    L = launch
    h = torch.empty(L.n_chunks + L.n_seqs, L.heads, L.key_dim, L.value_dim, dtype=L.state_dtype, device=q.device)
    final_state = torch.empty(L.n_seqs, L.heads, L.key_dim, L.value_dim, dtype=torch.float32, device=q.device)
    h0 = initial_state.contiguous() if initial_state is not None else final_state
    log_beta, log1m_beta, _, _ = L.bound
    grid = (L.n_seqs * L.heads, triton.cdiv(L.key_dim, L.bk), triton.cdiv(L.value_dim, L.bv))
    state_fwd_kernel[grid](
        g, v, h0, h, final_state, L.cu_seqlens, L.chunk_offsets, log_beta, log1m_beta, L.seq_len,
        BK=L.bk, BV=L.bv, HAS_H0=initial_state is not None, STORE_HT=output_final_state, num_warps=L.state_warps,
        **(_only(L.flags, *_STATE_FLAGS) | L.precise_flags),
    )  # fmt: skip
    o = torch.empty_like(v)
    scores = torch.empty(q.shape[0] * q.shape[1] * L.heads * SUB_CHUNK if keep_scores else 1, device=q.device)
    grid = (triton.cdiv(L.value_dim, L.bv_out) * L.n_chunks, L.heads)
    output_fwd_kernel[grid](
        q, g, v, h, o, scores, L.cu_seqlens, L.chunk_indices, log_beta, log1m_beta, scale, L.seq_len,
        BC=SUB_CHUNK, BK=L.bk_full, BV=L.bv_out, ACT=L.act, STORE_SCORES=keep_scores,
        num_warps=8 if L.bk_full * L.bv_out >= 128 * 64 else 4, **L.flags,
    )  # fmt: skip
    return o, h, scores, (final_state if output_final_state else None)


def _backward(q, v, g, h, scores, do, d_final, launch: _Launch, scale, need_d_initial):
    L = launch
    d_states = torch.empty(L.n_chunks, L.heads, L.key_dim, L.value_dim, dtype=h.dtype, device=q.device)
    d_initial = torch.empty(L.n_seqs, L.heads, L.key_dim, L.value_dim, dtype=torch.float32, device=q.device)
    dht = d_final.contiguous() if d_final is not None else d_initial
    log_beta, log1m_beta, inv_beta, inv_1m_beta = L.bound
    grid = (L.n_seqs * L.heads, triton.cdiv(L.key_dim, L.bk), triton.cdiv(L.value_dim, L.bv))
    state_bwd_kernel[grid](
        q, g, do, dht, d_states, d_initial, L.cu_seqlens, L.chunk_offsets, log_beta, log1m_beta, scale,
        L.seq_len, BK=L.bk, BV=L.bv, HAS_DHT=d_final is not None, STORE_DH0=need_d_initial, ACT=L.act,
        num_warps=L.state_warps, **_only(L.flags, *_STATE_FLAGS),
    )  # fmt: skip
    dq, dg, dv = torch.empty_like(q), torch.empty_like(g), torch.empty_like(v)
    has_bound = L.flags["HAS_BOUND"]
    d_beta = torch.empty(L.n_chunks * L.heads * L.key_dim if has_bound else 1, device=q.device)
    bk = min(32, L.bk_full)
    dqk_bwd_kernel[(triton.cdiv(L.key_dim, bk) * L.n_chunks, L.heads)](
        q, g, v, do, h, d_states, dq, dg, d_beta, L.cu_seqlens, L.chunk_indices, log_beta, log1m_beta,
        inv_beta, inv_1m_beta, scale, L.seq_len, BC=SUB_CHUNK, BK=bk, BV=_pow2(L.value_dim), ACT=L.act,
        num_warps=4 if L.value_dim <= 128 else 8, **(L.flags | L.precise_flags),
    )  # fmt: skip
    bv = min(64, _pow2(L.value_dim))
    dv_bwd_kernel[(triton.cdiv(L.value_dim, bv) * L.n_chunks, L.heads)](
        q, g, do, scores, d_states, dv, L.cu_seqlens, L.chunk_indices, log_beta, log1m_beta, scale, L.seq_len,
        BC=SUB_CHUNK, BK=L.bk_full, BV=bv, ACT=L.act, num_warps=4 if L.key_dim <= 128 else 8, **L.flags,
    )  # fmt: skip
    d_beta = d_beta.view(-1, L.heads, L.key_dim).sum(0) if has_bound else None
    return dq, dv, dg, (d_initial if need_d_initial else None), d_beta


_STATE_FLAGS = ("H", "K", "V", "C", "IS_VARLEN", "GATED", "HAS_BOUND", "DT", "PRECISION", "INTERPRET")


def _only(flags: dict, *names: str) -> dict:
    return {name: flags[name] for name in names}


class ChunkHGRN2Function(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels. With ``gated`` the first and third inputs are the raw
    projections (q_proj, forget_proj) and the gates are computed inside the kernels."""

    @staticmethod
    def forward(ctx, q, v, g, lower_bound, initial_state, scale, output_final_state, cu_seqlens, gated, act, precise):
        q, v, g = q.contiguous(), v.contiguous(), g.contiguous()
        precise = precise and lower_bound is not None and ctx.needs_input_grad[3]
        launch = _Launch(q, v, cu_seqlens, gated, act, lower_bound, precise)
        keep_scores = any(ctx.needs_input_grad[:5])
        o, h, scores, final_state = _forward(q, v, g, launch, scale, initial_state, output_final_state, keep_scores)
        ctx.save_for_backward(q, v, g, h, scores)
        ctx.launch, ctx.scale = launch, scale
        ctx.lower_bound_shape = None if lower_bound is None else lower_bound.shape
        ctx.lower_bound_dtype = None if lower_bound is None else lower_bound.dtype
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        if final_state is not None:
            return o, final_state
        return o, None

    @staticmethod
    def backward(ctx, do, d_final):
        q, v, g, h, scores = ctx.saved_tensors
        need_d_initial = ctx.needs_input_grad[4]
        dq, dv, dg, d_initial, d_beta = _backward(
            q, v, g, h, scores, do.contiguous(), d_final, ctx.launch, ctx.scale, need_d_initial
        )
        d_lower_bound = None
        if ctx.needs_input_grad[3] and d_beta is not None:
            d_lower_bound = d_beta.sum_to_size(ctx.lower_bound_shape).to(ctx.lower_bound_dtype)
        if d_initial is not None:
            d_initial = d_initial.to(ctx.initial_state_dtype)
        return dq, dv, dg, d_lower_bound, d_initial, None, None, None, None, None, None


def chunk_hgrn2(
    q: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 through the chunked Triton kernels; arguments as in :func:`hgrn2.ops.hgrn2_recurrence`.

    q and log_forget ``[B, T, H, K]``, v ``[B, T, H, V]`` (float16, bfloat16 or float32; 16 <= K, V <= 256);
    returns o ``[B, T, H, V]`` in the input dtype and the float32 final state ``[B or N, H, K, V]`` or None.
    Differentiable in q, v, log_forget and initial_state.

    Example::

        >>> q, v = torch.randn(2, 100, 4, 32, device="cuda"), torch.randn(2, 100, 4, 32, device="cuda")
        >>> log_forget = torch.nn.functional.logsigmoid(torch.randn(2, 100, 4, 32, device="cuda"))
        >>> o, state = chunk_hgrn2(q, v, log_forget, output_final_state=True)
    """
    check_kernel_dtype(q, v, log_forget)
    return ChunkHGRN2Function.apply(
        q, v, log_forget, None, initial_state, float(scale), output_final_state, cu_seqlens, False, 0, False
    )


def chunk_hgrn2_gated(
    q_proj: torch.Tensor,
    v: torch.Tensor,
    forget_proj: torch.Tensor,
    lower_bound: torch.Tensor | None = None,
    *,
    output_gate: str = "silu",
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    precise_bound_grad: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 from the raw projections, gates fused into the kernels (forward and backward):
    q = output_gate(q_proj) for 'silu', 'sigmoid' or 'identity' (other activations run unfused) and
    log λ = logaddexp(log β, log1p(-β) + logsigmoid(forget_proj)) with β = ``lower_bound`` (broadcasting to
    ``[H, K]``, values in [0, 1); None means β = 0). Differentiable in q_proj, v, forget_proj, lower_bound and
    initial_state; matches ``hgrn2.ops.gates`` followed by :func:`chunk_hgrn2`.

    ``precise_bound_grad`` (None: ``PRECISE_BOUND_GRAD``, True by default): with half-precision inputs and a
    lower bound that needs its gradient, keep the chunk states in float32 and multiply in TF32 where that
    gradient is formed (see the module docstring); False keeps half-precision states, about 17-21% faster
    forward + backward on an H100 at K = V = 128.
    """
    check_kernel_dtype(q_proj, v, forget_proj)
    heads, key_dim = q_proj.shape[2], q_proj.shape[3]
    if lower_bound is not None:
        try:
            torch.broadcast_shapes(lower_bound.shape, (heads, key_dim))
        except RuntimeError:
            raise ValueError(
                f"lower_bound must broadcast to [H, K] = [{heads}, {key_dim}], got {list(lower_bound.shape)}"
            ) from None
        if torch.broadcast_shapes(lower_bound.shape, (heads, key_dim)) != (heads, key_dim):
            raise ValueError(
                f"lower_bound must broadcast to [H, K] = [{heads}, {key_dim}], got {list(lower_bound.shape)}"
            )
    if output_gate not in FUSED_ACTIVATIONS:
        q_proj, output_gate = activation(q_proj, output_gate), "identity"
    return ChunkHGRN2Function.apply(
        q_proj, v, forget_proj, lower_bound, initial_state, float(scale), output_final_state, cu_seqlens, True,
        FUSED_ACTIVATIONS[output_gate], PRECISE_BOUND_GRAD if precise_bound_grad is None else precise_bound_grad,
    )  # fmt: skip

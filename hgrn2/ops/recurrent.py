"""Fused recurrent Triton kernel of HGRN2 for decoding and short sequences (forward only).

One program per (sequence, head, V tile) keeps its [K, BV] slice of the float32 state in registers and
walks the steps: S ← λ S + (1 - λ) ⊗ v, o = scale · q^T S. A decoding step is one launch of it with T = 1
that updates the state in place. The plain-PyTorch twin is ``hgrn2.ops.reference.hgrn2_recurrence_naive``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hgrn2.ops.kernel_utils import check_kernel_dtype, decay_toward, one_minus_exp, sequence_bounds, unused

__all__ = ["fused_recurrent_hgrn2", "fused_recurrent_hgrn2_step"]


@triton.jit
def recurrent_fwd_kernel(
    q_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, cu_seqlens, scale: tl.constexpr, T, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):  # fmt: skip
    # h0_ptr and ht_ptr may be the same tensor: each program reads its state tile before writing it back
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, length, _ = sequence_bounds(i_n, T, cu_seqlens, cu_seqlens, 1, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    state_offs = (i_n.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + state_offs, mask=m_kv, other=0.0).to(tl.float32)
    for t in range(length):
        row = bos + t
        q = tl.load(q_ptr + (row * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + (row * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + (row * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        state = decay_toward(state, one_minus_exp(g)[:, None], v[None, :])
        o = tl.sum(q[:, None] * state, 0) * scale
        tl.store(o_ptr + (row * H + i_h) * V + o_v, o.to(o_ptr.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht_ptr + state_offs, state, mask=m_kv)


def _launch(q, v, log_forget, initial_state, final_state, o, cu_seqlens, scale, n_seqs):
    heads, key_dim, value_dim = q.shape[-2], q.shape[-1], v.shape[-1]
    block_k = max(16, triton.next_power_of_2(key_dim))
    block_v = min(max(16, triton.next_power_of_2(value_dim)), 32 if block_k <= 128 else 16)
    seq_len = q.shape[1] if q.dim() == 4 else 1
    none = unused(q.device) if initial_state is None or final_state is None else None
    recurrent_fwd_kernel[(n_seqs * heads, triton.cdiv(value_dim, block_v))](
        q, v, log_forget, initial_state if initial_state is not None else none, o,
        final_state if final_state is not None else none,
        cu_seqlens if cu_seqlens is not None else unused(q.device, torch.int32),
        scale, seq_len, H=heads, K=key_dim, V=value_dim, BK=block_k, BV=block_v,
        HAS_H0=initial_state is not None, STORE_HT=final_state is not None, IS_VARLEN=cu_seqlens is not None,
        num_warps=4,
    )  # fmt: skip


def fused_recurrent_hgrn2_step(
    q: torch.Tensor, v: torch.Tensor, log_forget: torch.Tensor, state: torch.Tensor, *, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step in one kernel launch; ``state`` (float32 ``[B, H, K, V]``, contiguous) is updated in
    place and returned. q and log_forget ``[B, H, K]``, v ``[B, H, V]``; returns o ``[B, H, V]`` in q's dtype.
    Forward only."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(
            f"state must be a contiguous float32 tensor (it is updated in place), got {state.dtype}"
            f"{'' if state.is_contiguous() else ', non-contiguous'}; "
            "allocate it with torch.zeros(..., dtype=torch.float32)"
        )
    q, v, log_forget = q.contiguous(), v.contiguous(), log_forget.contiguous()
    o = torch.empty_like(v, dtype=q.dtype)
    _launch(q, v, log_forget, state, state, o, None, float(scale), q.shape[0])
    return o, state


def fused_recurrent_hgrn2(
    q: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    inplace_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 one step at a time in one fused kernel, for short sequences and prompt-free decoding.

    Forward only: it has no backward, and raises when gradients would be needed (train with
    :func:`hgrn2.ops.chunk.chunk_hgrn2`). Shapes as in :func:`hgrn2.ops.hgrn2_recurrence`. With
    ``inplace_state`` the final state is written into ``initial_state`` (float32, contiguous) and returned.
    """
    check_kernel_dtype(q, v, log_forget)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, v, log_forget, initial_state)):
        raise ValueError("fused_recurrent_hgrn2 is forward only; use chunk_hgrn2 (backend='triton') for gradients")
    n_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    heads, key_dim, value_dim = q.shape[2], q.shape[3], v.shape[3]
    if inplace_state:
        if initial_state is None or initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            raise ValueError(
                "inplace_state=True needs a contiguous float32 initial_state to write the final state into"
            )
        final_state = initial_state
    elif output_final_state:
        final_state = torch.empty(n_seqs, heads, key_dim, value_dim, dtype=torch.float32, device=q.device)
    else:
        final_state = None
    q, v, log_forget = q.contiguous(), v.contiguous(), log_forget.contiguous()
    h0 = initial_state.contiguous() if initial_state is not None else None
    o = torch.empty_like(v, dtype=q.dtype)
    _launch(q, v, log_forget, h0, final_state, o, cu_seqlens, float(scale), n_seqs)
    return o, (final_state if (output_final_state or inplace_state) else None)

"""Step-by-step Triton kernels of HGRN2 for small per-head states, forward and backward.

The chunked kernels (``chunk.py``) compute in tiles of at least 16 × 16 and chunks of 64 steps, which suits
K = V = 128 but wastes most of the work when a head holds a 2 × 2 or 4 × 4 state (expand ratios 2 and 4 of
the image and LRA models) and when sequences are short (the 14-step row and column scans of a 224-pixel
image). These kernels keep a block of heads' [K, V] states in registers, with no matrix tiles, and walk the
steps. One program per (sequence, block of heads).

Forward: ``S_t = λ_t S_{t-1} + (1 - λ_t) ⊗ v_t``, ``o_t = scale · q_t^T S_t``.

Backward, with ``k = 1 - λ`` and ``b_t = Σ_{r<=t} log λ_r``:

* a forward sweep recomputes ``S_t`` and gives ``dq_t = scale · S_t do_t``;
* a reverse sweep carries ``dS_t = scale · q_t do_t^T + λ_{t+1} dS_{t+1}`` (from the final state's gradient),
  giving ``dk_t = dS_t v_t`` and ``dv_t = dS_t^T k_t``;
* ``dL/db_t = q_t ⊙ dq_t - k_t ⊙ dk_t`` (plus ``Σ_v dS_T ⊙ S_T`` at the end), so
  ``d log λ_t = Σ_{s>=t} dL/db_s - λ_t ⊙ dk_t``: a running sum in the reverse sweep, the last term from
  k = 1 - λ. No step divides by λ, so gates near 0 are safe;
* ``d S_0 = λ_1 dS_1``.

The plain-PyTorch twin is ``hgrn2.ops.reference.hgrn2_recurrence_naive``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hgrn2.ops.kernel_utils import check_kernel_dtype, one_minus_exp, sequence_bounds, sm_count

__all__ = ["MAX_STATE", "small_state_hgrn2"]

MAX_STATE = 1024  # largest K × V (each rounded up to a power of two) a head may hold in these kernels
_PROGRAM_STATE = 1024  # state elements per program: heads are grouped up to this


@triton.jit
def _program_start(h0_ptr, cu_seqlens, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BH: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr):  # fmt: skip
    """This program's sequence (first row, length) and block of BH heads: offsets and masks [BH, BK] into q-like
    rows, [BH, BV] into v-like rows and [BH, BK, BV] into the [N, H, K, V] states, and the initial state."""
    NHB: tl.constexpr = (H + BH - 1) // BH
    i_n, i_hb = tl.program_id(0) // NHB, tl.program_id(0) % NHB
    bos, length, _ = sequence_bounds(i_n, T, cu_seqlens, cu_seqlens, 1, IS_VARLEN)
    o_h = i_hb * BH + tl.arange(0, BH)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_h = o_h < H
    m_hk = m_h[:, None] & (o_k < K)[None, :]
    m_hv = m_h[:, None] & (o_v < V)[None, :]
    hk = o_h[:, None] * K + o_k[None, :]
    hv = o_h[:, None] * V + o_v[None, :]
    m_s = m_hk[:, :, None] & m_hv[:, None, :]
    s = i_n.to(tl.int64) * H * K * V + (o_h * K * V)[:, None, None] + (o_k * V)[None, :, None] + o_v[None, None, :]
    state = tl.zeros([BH, BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + s, mask=m_s, other=0.0)
    return bos, length, hk, hv, m_hk, m_hv, s, m_s, state


@triton.jit
def small_state_fwd_kernel(
    q_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, cu_seqlens, scale, T, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    bos, length, hk, hv, m_hk, m_hv, s, m_s, state = _program_start(
        h0_ptr, cu_seqlens, T, H, K, V, BH, BK, BV, HAS_H0, IS_VARLEN
    )
    for t in range(length):
        row = (bos + t).to(tl.int64)
        q = tl.load(q_ptr + row * H * K + hk, mask=m_hk, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * H * K + hk, mask=m_hk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row * H * V + hv, mask=m_hv, other=0.0).to(tl.float32)
        state = tl.exp(g)[:, :, None] * state + one_minus_exp(g)[:, :, None] * v[:, None, :]
        o = tl.sum(q[:, :, None] * state, 1) * scale
        tl.store(o_ptr + row * H * V + hv, o.to(o_ptr.dtype.element_ty), mask=m_hv)
    if STORE_HT:
        tl.store(ht_ptr + s, state, mask=m_s)


@triton.jit
def small_state_bwd_kernel(
    q_ptr, v_ptr, g_ptr, h0_ptr, do_ptr, dht_ptr, dq_ptr, dv_ptr, dg_ptr, dh0_ptr, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    # dq_ptr is float32: the reverse sweep reads back the dq the forward sweep wrote
    bos, length, hk, hv, m_hk, m_hv, s, m_s, state = _program_start(
        h0_ptr, cu_seqlens, T, H, K, V, BH, BK, BV, HAS_H0, IS_VARLEN
    )
    for t in range(length):  # forward sweep: the states again, and dq
        row = (bos + t).to(tl.int64)
        g = tl.load(g_ptr + row * H * K + hk, mask=m_hk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row * H * V + hv, mask=m_hv, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + row * H * V + hv, mask=m_hv, other=0.0).to(tl.float32)
        state = tl.exp(g)[:, :, None] * state + one_minus_exp(g)[:, :, None] * v[:, None, :]
        dq = tl.sum(state * do[:, None, :], 2) * scale
        tl.store(dq_ptr + row * H * K + hk, dq, mask=m_hk)
    d_state = tl.zeros([BH, BK, BV], dtype=tl.float32)
    if HAS_DHT:
        d_state += tl.load(dht_ptr + s, mask=m_s, other=0.0)
    d_b = tl.sum(d_state * state, 2)  # the final state's own dependence on b_T
    for i in range(length):  # reverse sweep
        row = (bos + length - 1 - i).to(tl.int64)
        q = tl.load(q_ptr + row * H * K + hk, mask=m_hk, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * H * K + hk, mask=m_hk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row * H * V + hv, mask=m_hv, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + row * H * V + hv, mask=m_hv, other=0.0).to(tl.float32)
        dq = tl.load(dq_ptr + row * H * K + hk, mask=m_hk, other=0.0)
        forget, k = tl.exp(g), one_minus_exp(g)
        d_state += (q * scale)[:, :, None] * do[:, None, :]
        dk = tl.sum(d_state * v[:, None, :], 2)
        dv = tl.sum(d_state * k[:, :, None], 1)
        d_b += q * dq - k * dk
        tl.store(dv_ptr + row * H * V + hv, dv.to(dv_ptr.dtype.element_ty), mask=m_hv)
        tl.store(dg_ptr + row * H * K + hk, (d_b - forget * dk).to(dg_ptr.dtype.element_ty), mask=m_hk)
        d_state = forget[:, :, None] * d_state
    if STORE_DH0:
        tl.store(dh0_ptr + s, d_state, mask=m_s)


class _Launch:
    """Sizes and launch settings shared by the forward and the backward."""

    def __init__(self, q, v, cu_seqlens):
        self.heads, self.key_dim, self.value_dim = q.shape[2], q.shape[3], v.shape[3]
        self.n_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        self.seq_len = q.shape[1]
        self.bk, self.bv = triton.next_power_of_2(self.key_dim), triton.next_power_of_2(self.value_dim)
        per_head = self.bk * self.bv
        if per_head > MAX_STATE:
            raise ValueError(
                f"the step-by-step kernels hold at most {MAX_STATE} state elements per head, got K={self.key_dim} "
                f"and V={self.value_dim}; use backend='triton' (the chunked kernels) for states of this size"
            )
        # as many heads per program as fit, then fewer while that leaves fewer than 4 programs per SM: a long
        # sequence is walked one step at a time, and only other programs hide each step's load latency
        self.bh = min(triton.next_power_of_2(self.heads), max(1, _PROGRAM_STATE // per_head))
        sms = sm_count(q.device)
        while self.bh > 1 and self.n_seqs * triton.cdiv(self.heads, self.bh) < 4 * sms:
            self.bh //= 2
        self.grid = (self.n_seqs * triton.cdiv(self.heads, self.bh),)
        self.num_warps = 4 if self.bh * per_head >= 512 else 1
        self.flags = dict(H=self.heads, K=self.key_dim, V=self.value_dim, BH=self.bh, BK=self.bk, BV=self.bv)

    def state(self, device) -> torch.Tensor:
        return torch.empty(self.n_seqs, self.heads, self.key_dim, self.value_dim, dtype=torch.float32, device=device)


class SmallStateHGRN2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, v, log_forget, initial_state, scale, output_final_state, cu_seqlens):
        launch = _Launch(q, v, cu_seqlens)
        o = torch.empty_like(v)
        final_state = launch.state(q.device) if output_final_state else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        dummy = o
        small_state_fwd_kernel[launch.grid](
            q, v, log_forget, h0 if h0 is not None else dummy, o,
            final_state if final_state is not None else dummy, cu_seqlens if cu_seqlens is not None else dummy,
            scale, launch.seq_len, HAS_H0=h0 is not None, STORE_HT=final_state is not None,
            IS_VARLEN=cu_seqlens is not None, num_warps=launch.num_warps, **launch.flags,
        )  # fmt: skip
        ctx.save_for_backward(q, v, log_forget, h0, cu_seqlens)
        ctx.launch, ctx.scale = launch, scale
        ctx.initial_dtype = initial_state.dtype if initial_state is not None else None
        return o, final_state

    @staticmethod
    def backward(ctx, do, d_final):
        q, v, log_forget, h0, cu_seqlens = ctx.saved_tensors
        launch = ctx.launch
        need_dh0 = h0 is not None and ctx.needs_input_grad[3]
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dv, dg = torch.empty_like(v), torch.empty_like(log_forget)
        dh0 = launch.state(q.device) if need_dh0 else None
        dummy = dq
        small_state_bwd_kernel[launch.grid](
            q, v, log_forget, h0 if h0 is not None else dummy, do.contiguous(),
            d_final.contiguous() if d_final is not None else dummy, dq, dv, dg, dh0 if dh0 is not None else dummy,
            cu_seqlens if cu_seqlens is not None else dummy, ctx.scale, launch.seq_len,
            HAS_H0=h0 is not None, HAS_DHT=d_final is not None, STORE_DH0=need_dh0,
            IS_VARLEN=cu_seqlens is not None, num_warps=launch.num_warps, **launch.flags,
        )  # fmt: skip
        dh0 = dh0.to(ctx.initial_dtype) if dh0 is not None else None
        return dq.to(q.dtype), dv, dg, dh0, None, None, None


def small_state_hgrn2(
    q: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 one step at a time, differentiable, for heads of at most ``MAX_STATE`` state elements.

    Shapes and arguments as in :func:`hgrn2.ops.hgrn2_recurrence`; returns ``(o, final_state)`` with the final
    state in float32. Gradients reach q, v, log_forget and initial_state.
    """
    check_kernel_dtype(q, v, log_forget)
    q, v, log_forget = q.contiguous(), v.contiguous(), log_forget.contiguous()
    return SmallStateHGRN2Function.apply(q, v, log_forget, initial_state, float(scale), output_final_state, cu_seqlens)

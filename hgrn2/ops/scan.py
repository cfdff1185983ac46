"""HGRN1's element-wise gated scan in Triton, forward and backward: h_t = λ_t ⊙ h_{t-1} + (1 - λ_t) ⊙ x_t.

One program per (sequence, block of channels) walks the sequence in tiles of BT steps; inside a tile the
linear recurrence is a parallel associative scan over (λ, (1 - λ) x) pairs, whose products of gates never
exceed 1. The backward runs the same forward scan over tiles loaded with their rows reversed:
dH_t = dh_t + λ_{t+1} dH_{t+1}, dx_t = (1 - λ_t) dH_t, d log λ_t = dH_t λ_t (h_{t-1} - x_t).
The plain-PyTorch twin is ``hgrn2.ops.reference.hgrn1_recurrence_naive``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hgrn2.ops.kernel_utils import check_kernel_dtype, one_minus_exp, sequence_bounds, sm_count, unused

__all__ = ["scan_hgrn1"]

TILE = 64  # steps per tile


@triton.jit
def _compose(a_first, u_first, a_then, u_then):
    """h -> a_then (a_first h + u_first) + u_then: two affine steps applied in order."""
    return a_first * a_then, a_then * u_first + u_then


@triton.jit
def scan_fwd_kernel(
    x_ptr, g_ptr, h0_ptr, h_ptr, ht_ptr, cu_seqlens, T, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    i_n, i_d = tl.program_id(0), tl.program_id(1)
    bos, length, _ = sequence_bounds(i_n, T, cu_seqlens, cu_seqlens, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    tile = o_t[:, None] * D + o_d[None, :]
    state = tl.zeros([BD], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + i_n.to(tl.int64) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    for c in range(tl.cdiv(length, BT)):
        offs = (bos + c * BT) * D + tile
        mask = (c * BT + o_t < length)[:, None] & m_d[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        decay, inflow = tl.associative_scan((tl.exp(g), one_minus_exp(g) * x), 0, _compose)
        h = decay * state[None, :] + inflow
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
        state = tl.sum(tl.where(o_t[:, None] == BT - 1, h, 0.0), 0)  # padded steps keep the last state
    if STORE_HT:
        tl.store(ht_ptr + i_n.to(tl.int64) * D + o_d, state, mask=m_d)


@triton.jit
def scan_bwd_kernel(
    x_ptr, g_ptr, h_ptr, h0_ptr, dh_ptr, dht_ptr, dx_ptr, dg_ptr, dh0_ptr, cu_seqlens, T, D: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):  # fmt: skip
    i_n, i_d = tl.program_id(0), tl.program_id(1)
    bos, length, _ = sequence_bounds(i_n, T, cu_seqlens, cu_seqlens, BT, IS_VARLEN)
    o_p = tl.arange(0, BT)
    o_rev = BT - 1 - o_p  # position p of a tile holds step BT - 1 - p: a forward scan runs backwards in time
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    tile = o_rev[:, None] * D + o_d[None, :]
    h0 = tl.zeros([BD], dtype=tl.float32)
    if HAS_H0:
        h0 += tl.load(h0_ptr + i_n.to(tl.int64) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    d_state = tl.zeros([BD], dtype=tl.float32)  # dH of the step after the tile
    if HAS_DHT:
        d_state += tl.load(dht_ptr + i_n.to(tl.int64) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    n_tiles = tl.cdiv(length, BT)
    for cc in range(n_tiles):
        c = n_tiles - 1 - cc
        steps = c * BT + o_rev
        offs = (bos + c * BT) * D + tile
        mask = (steps < length)[:, None] & m_d[None, :]
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        next_mask = (steps + 1 < length)[:, None] & m_d[None, :]
        forget_next = tl.exp(tl.load(g_ptr + offs + D, mask=next_mask, other=0.0).to(tl.float32))
        decay, inflow = tl.associative_scan((forget_next, dh), 0, _compose)
        d_total = decay * d_state[None, :] + inflow  # dH_t = dh_t + λ_{t+1} dH_{t+1}
        d_state = tl.sum(tl.where(o_p[:, None] == BT - 1, d_total, 0.0), 0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h_prev = tl.load(h_ptr + offs - D, mask=(steps >= 1)[:, None] & mask, other=0.0).to(tl.float32)
        h_prev = tl.where((steps == 0)[:, None], h0[None, :], h_prev)
        tl.store(dx_ptr + offs, (one_minus_exp(g) * d_total).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + offs, (d_total * tl.exp(g) * (h_prev - x)).to(dg_ptr.dtype.element_ty), mask=mask)
    if STORE_DH0:
        forget_first = tl.exp(tl.load(g_ptr + bos * D + o_d, mask=m_d & (length > 0), other=0.0).to(tl.float32))
        tl.store(dh0_ptr + i_n.to(tl.int64) * D + o_d, forget_first * d_state, mask=m_d)


def _channel_block(n_seqs: int, dim: int, device: torch.device) -> int:
    """Channels per program: 32, or 16 when that leaves the GPU half idle."""
    sms = sm_count(device)
    block = min(32, max(16, triton.next_power_of_2(dim)))
    if n_seqs * triton.cdiv(dim, block) < 2 * sms:
        block = 16
    return block


class ScanHGRN1Function(torch.autograd.Function):
    """Autograd wrapper of the HGRN1 scan kernels; saves the outputs h for the backward."""

    @staticmethod
    def forward(ctx, x, log_forget, initial_state, output_final_state, cu_seqlens):
        x, log_forget = x.contiguous(), log_forget.contiguous()
        batch, seq_len, dim = x.shape
        n_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
        block = _channel_block(n_seqs, dim, x.device)
        h = torch.empty_like(x)
        final_state = torch.empty(n_seqs, dim, dtype=torch.float32, device=x.device)
        h0 = initial_state.contiguous() if initial_state is not None else unused(x.device)
        cu = cu_seqlens if cu_seqlens is not None else unused(x.device, torch.int32)
        scan_fwd_kernel[(n_seqs, triton.cdiv(dim, block))](
            x, log_forget, h0, h, final_state, cu, seq_len, D=dim, BT=TILE, BD=block,
            HAS_H0=initial_state is not None, STORE_HT=output_final_state, IS_VARLEN=cu_seqlens is not None,
            num_warps=4,
        )  # fmt: skip
        ctx.save_for_backward(x, log_forget, h, initial_state, cu_seqlens)
        ctx.block, ctx.n_seqs = block, n_seqs
        return h, (final_state if output_final_state else None)

    @staticmethod
    def backward(ctx, dh, d_final):
        x, log_forget, h, initial_state, cu_seqlens = ctx.saved_tensors
        batch, seq_len, dim = x.shape
        dx, dg = torch.empty_like(x), torch.empty_like(log_forget)
        d_initial = torch.empty(ctx.n_seqs, dim, dtype=torch.float32, device=x.device)
        none = unused(x.device)
        dht = d_final.contiguous() if d_final is not None else none
        h0 = initial_state.contiguous() if initial_state is not None else none
        cu = cu_seqlens if cu_seqlens is not None else unused(x.device, torch.int32)
        need_d_initial = ctx.needs_input_grad[2]
        # 16 channels a program: with 32 the backward ran 5x slower per tile on an H100 (triton 3.6)
        scan_bwd_kernel[(ctx.n_seqs, triton.cdiv(dim, 16))](
            x, log_forget, h, h0, dh.contiguous(), dht, dx, dg, d_initial, cu, seq_len, D=dim, BT=TILE,
            BD=16, HAS_H0=initial_state is not None, HAS_DHT=d_final is not None, STORE_DH0=need_d_initial,
            IS_VARLEN=cu_seqlens is not None, num_warps=4,
        )  # fmt: skip
        if need_d_initial:
            d_initial = d_initial.to(initial_state.dtype)
        return dx, dg, (d_initial if need_d_initial else None), None, None


def scan_hgrn1(
    x: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN1 through the Triton scan; arguments as in :func:`hgrn2.ops.hgrn1_recurrence`.

    x and log_forget ``[B, T, D]`` (float16, bfloat16 or float32); returns h ``[B, T, D]`` in the input dtype
    and the float32 final state ``[B or N, D]`` or None. Differentiable in x, log_forget and initial_state.

    Example::

        >>> x = torch.randn(2, 100, 64, device="cuda")
        >>> h, state = scan_hgrn1(x, torch.nn.functional.logsigmoid(torch.randn_like(x)), output_final_state=True)
    """
    check_kernel_dtype(x, log_forget)
    return ScanHGRN1Function.apply(x, log_forget, initial_state, output_final_state, cu_seqlens)

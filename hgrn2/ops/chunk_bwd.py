"""Backward Triton kernels of the chunked HGRN2 recurrence (the op is ``hgrn2.ops.chunk``).

The state gradients come from the forward's two kernels run backwards (``chunk_delta_kernel`` and
``state_scan_kernel`` in ``hgrn2.ops.chunk_fwd``): dS leaving chunk c ← exp(b_C) ⊙ dS + scale · (q · exp(b))^T do.
Then, chunk-parallel:

* ``dqk_bwd_kernel``: one program per (K tile, chunk, head) gives dq and d log λ of the chunk.
* ``dv_bwd_kernel``: one program per (V tile, chunk, head) gives dv = A^T do + (k · exp(b_C - b)) dS_out, with
  the scores A the forward kept.

The gradient of the log gates needs no extra pass. Write A_sr = q_s ⊙ k_r ⊙ exp(b_s - b_r) (do_s · v_r) for
the contribution of step r's key to step s's output (r <= s; b the running sum of log λ). log λ_t sits in the
decay of every pair that spans it (r < t <= s), so d log λ_t = Σ_{r < t <= s} A_sr - λ_t ⊙ dk_t, the last term
from k = 1 - λ. The kernel sums exactly those pairs, so that no term cancels against another:

* within the chunk, q ⊙ dq - k ⊙ dk from the strictly causal score gradients, summed from the chunk's end
  (pairs with both steps at or after t cancel there in exact arithmetic; the diagonal, the largest of them, is
  left out and added to dq and dk afterwards);
* q ⊙ dq from the entering state, summed from the chunk's end (pairs from earlier chunks);
* k ⊙ dk from the leaving state's gradient, summed from the chunk's start up to t - 1 (pairs into later
  chunks);
* exp(b_C) ⊙ Σ_v S_in ⊙ dS_out (pairs from earlier chunks into later ones).

Summing q ⊙ dq - k ⊙ dk over whole steps instead loses about 5x in float32 (``benchmarks/results/ops-notes.md``).
Scores and their gradients use the forward's reference point, half the chunk's log decay (``hgrn2.ops.chunk_fwd``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hgrn2.ops.chunk_fwd import key_tile, reference_spread
from hgrn2.ops.kernel_utils import (
    LOG_FORGET_FLOOR,
    chunk_bounds,
    chunk_rows,
    key_to_chunk_end,
    load_log_forget,
    log_decay_to_end,
    matmul,
    one_minus_exp,
    output_gate_grad,
)


@triton.jit
def intra_grads(
    q, k, g, b, d_scores, extra, o_t, C: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    """dq and dk of this K tile from the strictly causal score gradients dA [C, C]:
    dq_t = Σ_s dA_ts k_s exp(b_t - b_s), dk_s = Σ_t dA_ts q_t exp(b_t - b_s); and the chunk's own part of
    d log λ, Σ over the pairs s < t <= t' of A_t's = q_t' ⊙ k_s ⊙ exp(b_t' - b_s) dA_t's, plus the reverse sum of
    ``extra`` [C, BK] (other terms summed from the chunk's end, taken in the same scan).

    Matmuls give dq and dk while the decays' spread allows; that part of d log λ is then the reverse sum of
    q ⊙ dq - k ⊙ dk, in which the pairs after t cancel. With PAIRS (float32 inputs), or past the spread, one
    column s at a time forms b_t - b_s from the gates between s and t, as ``intra_scores`` does; with PAIRS it
    also sums the spanning pairs themselves, so that d log λ keeps float32's relative precision where λ_t is
    small and the pairs after t are not."""
    spread, by_matmul = reference_spread(b, g)
    if PAIRS:
        by_matmul = False
    if by_matmul:
        dq = tl.exp(spread) * matmul(d_scores, k * tl.exp(-spread), DT, PRECISION, INTERPRET)
        dk = tl.exp(-spread) * matmul(tl.trans(d_scores), q * tl.exp(spread), DT, PRECISION, INTERPRET)
        span = tl.cumsum(q * dq - k * dk + extra, 0, reverse=True)
    else:
        dq = tl.zeros_like(q)
        dk = tl.zeros_like(q)
        span = tl.zeros_like(q)
        for s in range(C):
            row = o_t[:, None] == s
            k_s = tl.sum(tl.where(row, k, 0.0), 0)
            rel = tl.cumsum(tl.where(o_t[:, None] > s, g, 0.0), 0)  # b_t - b_s for t >= s
            decay = tl.exp(tl.where(o_t[:, None] >= s, rel, float("-inf")))  # [C, BK]
            ds_col = tl.sum(tl.where(o_t[None, :] == s, d_scores, 0.0), 1)  # dA[:, s]
            from_s = ds_col[:, None] * k_s[None, :] * decay  # what column s adds to dq
            dq += from_s
            dk = tl.where(row, tl.sum(ds_col[:, None] * q * decay, 0)[None, :], dk)
            if PAIRS:  # the pairs (s, t') span every t with s < t <= t'
                span += tl.where(o_t[:, None] > s, tl.cumsum(q * from_s, 0, reverse=True), 0.0)
        if PAIRS:
            span += tl.cumsum(extra, 0, reverse=True)
        else:
            span = tl.cumsum(q * dq - k * dk + extra, 0, reverse=True)
    return dq, dk, span


@triton.jit
def causal_score_grads(raw, o_t, scale):
    """The strictly causal part of the score gradients scale · do v^T [C, C], and their diagonal dA_tt [C]."""
    d_scores = raw * scale
    diagonal = tl.sum(tl.where(o_t[:, None] == o_t[None, :], d_scores, 0.0), 1)
    return tl.where(o_t[:, None] > o_t[None, :], d_scores, 0.0), diagonal


@triton.jit
def key_tile_program(
    T, cu_seqlens, chunk_indices, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, IS_VARLEN: tl.constexpr,
    FLIP: tl.constexpr,
):  # fmt: skip
    """This program's K tile, chunk and head (grid: K tiles x chunks, heads), the chunk's steps and their mask, its
    tokens (first token and offsets, ``kernel_utils.chunk_rows``), the slot of its entering state, and the tile's
    channels and their mask."""
    NK: tl.constexpr = (K + BK - 1) // BK
    i_k, i_c, i_h = tl.program_id(0) % NK, tl.program_id(0) // NK, tl.program_id(1)
    i_n, c, bos, length = chunk_bounds(i_c, T, cu_seqlens, chunk_indices, C, IS_VARLEN)
    o_t = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    row0, o_r = chunk_rows(bos, length, c * C, o_t, FLIP)
    return i_k, i_c, i_h, o_t, c * C + o_t < length, row0, o_r, i_c.to(tl.int64) + i_n, o_k, o_k < K


@triton.jit
def state_products(
    do_ptr, v_ptr, h_ptr, dh_ptr, row0, slot, i_c, i_h, o_t, m_t, o_k, m_k, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Sums over V for one K tile of a chunk: the score gradients dA = do v^T [C, C], do against the entering state
    (-> dq) and v against the gradient of the leaving state (-> dk), [C, BK] each, and Σ_v S_in ⊙ dS_out [BK]
    (-> d log λ of every step)."""
    NV: tl.constexpr = (V + BV - 1) // BV
    raw = tl.zeros([C, C], dtype=tl.float32)
    dq_state = tl.zeros([C, BK], dtype=tl.float32)
    dk_state = tl.zeros([C, BK], dtype=tl.float32)
    through = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        kv_tile = o_k[:, None] * V + o_v[None, :]
        v_offs = row0 * (H * V) + i_h * V + o_t[:, None] * (H * V) + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        do = tl.load(do_ptr + v_offs, mask=m_tv, other=0.0)
        v = tl.load(v_ptr + v_offs, mask=m_tv, other=0.0)
        s_in = tl.load(h_ptr + (slot * H + i_h) * K * V + kv_tile, mask=m_kv, other=0.0).to(tl.float32)
        ds_out = tl.load(dh_ptr + (i_c.to(tl.int64) * H + i_h) * K * V + kv_tile, mask=m_kv, other=0.0).to(tl.float32)
        raw += matmul(do, tl.trans(v), DT, PRECISION, INTERPRET)
        dq_state += matmul(do, tl.trans(s_in), DT, PRECISION, INTERPRET)
        dk_state += matmul(v, tl.trans(ds_out), DT, PRECISION, INTERPRET)
        through += tl.sum(s_in * ds_out, 1)
    return raw, dq_state, dk_state, through


@triton.jit
def dqk_bwd_kernel(
    q_ptr, g_ptr, v_ptr, do_ptr, h_ptr, dh_ptr, dq_ptr, dg_ptr, cu_seqlens, chunk_indices, scale: tl.constexpr, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, FLIP: tl.constexpr, ACT: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    IDT: tl.constexpr, IPRECISION: tl.constexpr, INTERPRET: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    # one program per (K tile, chunk, head); o_r: each step's token offset from row0 (o_t, or -o_t with FLIP)
    i_k, i_c, i_h, o_t, m_t, row0, o_r, slot, o_k, m_k = key_tile_program(
        T, cu_seqlens, chunk_indices, K, C, BK, IS_VARLEN, FLIP
    )
    raw, dq_state, dk_state, through = state_products(
        do_ptr, v_ptr, h_ptr, dh_ptr, row0, slot, i_c, i_h, o_r, m_t, o_k, m_k, H, K, V, C, BK, BV, DT, PRECISION,
        INTERPRET,
    )  # fmt: skip
    # q and the log gates of this K tile, loaded after the walk over V so that they are not live during it
    _, _, m_tk, k_offs, q, g, b = key_tile(q_ptr, g_ptr, row0, i_h, i_k, o_r, m_t, H, K, BK, ACT)
    k = one_minus_exp(g)
    d_scores, diagonal = causal_score_grads(raw, o_t, scale)
    dq_in = tl.exp(b) * dq_state * scale
    b_end = tl.sum(g, 0)
    if PAIRS:
        # q ⊙ dq from the entering state is summed from the chunk's end in the same scan as the chunk's own pairs
        dq, dk, span = intra_grads(q, k, g, b, d_scores, q * dq_in, o_t, C, IDT, IPRECISION, INTERPRET, PAIRS)
        dk_out = tl.exp(log_decay_to_end(g)) * dk_state
        k_out = k * dk_out  # k ⊙ dk from the leaving state
        # d log λ_t = Σ over the pairs r < t <= s (module docstring) - λ_t ⊙ dk_t; none below the floor
        dg = span + (tl.cumsum(k_out, 0) - k_out)
    else:
        # half-precision inputs: two scans along the chunk instead of four. The decay to the chunk's end is
        # b_C - b_t, off by at most ~1e-4 in its exponent (log_decay_to_end), below half precision's rounding; and
        # Σ_{r < t} k_out_r = Σ_r k_out_r - Σ_{r >= t} k_out_r, so the pairs into later chunks are summed in the scan
        # from the chunk's end that sums the chunk's own pairs and q ⊙ dq from the entering state
        dk_out = tl.exp(b_end[None, :] - b) * dk_state
        k_out = k * dk_out  # k ⊙ dk from the leaving state
        dq, dk, span = intra_grads(
            q, k, g, b, d_scores, q * dq_in - k_out, o_t, C, IDT, IPRECISION, INTERPRET, PAIRS
        )  # fmt: skip
        dg = span + tl.sum(k_out, 0)[None, :]
    dg += tl.exp(b_end)[None, :] * through[None, :]
    dq += dq_in + diagonal[:, None] * k
    dk += dk_out + diagonal[:, None] * q
    dg = tl.where(g > LOG_FORGET_FLOOR, dg - tl.exp(g) * dk, 0.0)  # none below the floor
    if ACT != 0:
        dq = dq * output_gate_grad(tl.load(q_ptr + k_offs, mask=m_tk, other=0.0).to(tl.float32), ACT)
    tl.store(dq_ptr + k_offs, dq.to(dq_ptr.dtype.element_ty), mask=m_tk)
    tl.store(dg_ptr + k_offs, dg.to(dg_ptr.dtype.element_ty), mask=m_tk)


@triton.jit
def dv_bwd_kernel(
    g_ptr, do_ptr, a_ptr, dh_ptr, dv_ptr, cu_seqlens, chunk_indices, scale: tl.constexpr, T, H: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
    FLIP: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # dv_s = Σ_{t >= s} A[t, s] scale · do_t + (k_s · exp(b_C - b_s)) dS_out
    NV: tl.constexpr = (V + BV - 1) // BV
    NK: tl.constexpr = (K + BK - 1) // BK
    i_v, i_c, i_h = tl.program_id(0) % NV, tl.program_id(0) // NV, tl.program_id(1)
    _, c, bos, length = chunk_bounds(i_c, T, cu_seqlens, chunk_indices, C, IS_VARLEN)
    o_t = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_t = c * C + o_t < length
    m_tv = m_t[:, None] & m_v[None, :]
    row0, o_r = chunk_rows(bos, length, c * C, o_t, FLIP)  # the chunk's tokens
    v_offs = row0 * (H * V) + i_h * V + o_r[:, None] * (H * V) + o_v[None, :]
    a_offs = ((bos + c * C) * H + i_h) * C + o_t[:, None] * (H * C) + o_t[None, :]  # the forward's, in scan order
    scores = tl.load(a_ptr + a_offs, mask=m_t[:, None], other=0.0)
    do = tl.load(do_ptr + v_offs, mask=m_tv, other=0.0).to(tl.float32) * scale
    dv = matmul(tl.trans(scores), do, DT, PRECISION, INTERPRET)
    for i_k in range(NK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        g = load_log_forget(g_ptr + row0 * (H * K) + i_h * K + o_r[:, None] * (H * K) + o_k[None, :], m_tk)
        k_end = key_to_chunk_end(g)  # decay to the chunk's end
        ds_out = tl.load(
            dh_ptr + (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        dv += matmul(k_end, ds_out, DT, PRECISION, INTERPRET)
    tl.store(dv_ptr + v_offs, dv.to(dv_ptr.dtype.element_ty), mask=m_tv)

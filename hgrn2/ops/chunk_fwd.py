"""Forward Triton kernels of the chunked HGRN2 recurrence (the op is ``hgrn2.ops.chunk``).

Per head, with chunks of C steps split into sub-blocks of BC steps, g = log λ and b its running sum:

* ``state_fwd_kernel``: one program per (sequence, head, K tile, V tile) walks the chunks in order and stores
  the state entering each chunk, then the final one: S ← exp(b_C) S + (k · exp(b_C - b))^T v.
* ``output_fwd_kernel``: one program per (V tile, chunk, head): o = q·exp(b) S_in + (intra-chunk part);
  it can also keep the diagonal sub-block scores for the backward.

Every exponent is a sum of log gates over a span of steps, so it is <= 0 and nothing overflows: on
diagonal sub-blocks the decays are formed pairwise (exp(b_t - b_s), s <= t); between sub-blocks j < i the
reference point is the start of sub-block i, where the output kernel keeps the running state
(q·exp(b_t - b_ref) against S_ref, and k·exp(b_ref - b_s) folded into S_ref); a diagonal sub-block whose
channels all decay by less than e^-60 is one matmul of q·exp(b) and k·exp(-b). The key
k = 1 - exp(g) is derived in registers. With ``GATED`` the kernels read the raw projections and compute
q = act(q_proj) and log λ = logaddexp(log β, log1p(-β) + logsigmoid(f)) themselves.

Addresses: a scalar int64 base per block of rows plus a loop-invariant int32 tile of offsets, so no 64-bit
per-element offsets stay live in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hgrn2.ops.kernel_utils import (
    chunk_bounds,
    load_bound,
    load_log_forget,
    load_query,
    log_forget_of,
    matmul,
    one_minus_exp,
    sequence_bounds,
)


@triton.jit
def state_fwd_kernel(
    g_ptr, v_ptr, h0_ptr, h_ptr, ht_ptr, cu_seqlens, chunk_offsets, log_beta_ptr, log1m_beta_ptr,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, GATED: tl.constexpr,
    HAS_BOUND: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, length, first_chunk = sequence_bounds(i_n, T, cu_seqlens, chunk_offsets, C, IS_VARLEN)
    n_chunks = tl.cdiv(length, C)
    o_t = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_tile = o_k[:, None] * V + o_v[None, :]
    k_tile = o_t[:, None] * (H * K) + o_k[None, :]
    v_tile = o_t[:, None] * (H * V) + o_v[None, :]
    log_beta, log1m_beta = load_bound(log_beta_ptr, log1m_beta_ptr, i_h * K + o_k, m_k, BK, HAS_BOUND)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + kv_tile, mask=m_kv, other=0.0).to(tl.float32)
    slot0 = first_chunk + i_n  # each sequence keeps one extra slot, for the state after its last chunk
    # the next chunk's tiles are loaded before this chunk is computed, so their latency overlaps the work
    m_next = o_t < length
    g_next = tl.load(g_ptr + (bos * H + i_h) * K + k_tile, mask=m_next[:, None] & m_k[None, :], other=0.0)
    v_next = tl.load(v_ptr + (bos * H + i_h) * V + v_tile, mask=m_next[:, None] & m_v[None, :], other=0.0)
    for c in range(n_chunks):
        tl.store(h_ptr + ((slot0 + c) * H + i_h) * K * V + kv_tile, state.to(h_ptr.dtype.element_ty), mask=m_kv)
        m_tk = m_next[:, None] & m_k[None, :]
        g_raw, v = g_next, v_next
        row1 = bos + (c + 1) * C
        m_next = (c + 1) * C + o_t < length
        g_next = tl.load(g_ptr + (row1 * H + i_h) * K + k_tile, mask=m_next[:, None] & m_k[None, :], other=0.0)
        v_next = tl.load(v_ptr + (row1 * H + i_h) * V + v_tile, mask=m_next[:, None] & m_v[None, :], other=0.0)
        g = log_forget_of(g_raw, m_tk, log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND)
        to_end = tl.cumsum(g, 0, reverse=True) - g  # b_C - b_t: a sum of the gates after t
        k_end = one_minus_exp(g) * tl.exp(to_end)  # [C, BK]
        state = state * tl.exp(tl.sum(g, 0))[:, None] + matmul(tl.trans(k_end), v, DT, PRECISION, INTERPRET)
    tl.store(h_ptr + ((slot0 + n_chunks) * H + i_h) * K * V + kv_tile, state.to(h_ptr.dtype.element_ty), mask=m_kv)
    if STORE_HT:
        tl.store(ht_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + kv_tile, state, mask=m_kv)


@triton.jit
def output_fwd_kernel(
    q_ptr, g_ptr, v_ptr, h_ptr, o_ptr, a_ptr, cu_seqlens, chunk_indices, log_beta_ptr, log1m_beta_ptr, scale,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, GATED: tl.constexpr, HAS_BOUND: tl.constexpr,
    ACT: tl.constexpr, STORE_SCORES: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    # With STORE_SCORES the first V tile also writes the diagonal sub-block scores (without scale) to a_ptr,
    # float32 [B * T, H, BC], for the backward.
    NV: tl.constexpr = (V + BV - 1) // BV
    i_v, i_c, i_h = tl.program_id(0) % NV, tl.program_id(0) // NV, tl.program_id(1)
    i_n, c, bos, length = chunk_bounds(i_c, T, cu_seqlens, chunk_indices, C, IS_VARLEN)
    NC: tl.constexpr = C // BC
    o_r = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    k_tile = o_r[:, None] * (H * K) + o_k[None, :]
    v_tile = o_r[:, None] * (H * V) + o_v[None, :]
    q_head, g_head = q_ptr + i_h * K, g_ptr + i_h * K
    v_head, o_head = v_ptr + i_h * V, o_ptr + i_h * V
    log_beta, log1m_beta = load_bound(log_beta_ptr, log1m_beta_ptr, i_h * K + o_k, m_k, BK, HAS_BOUND)
    slot = i_c.to(tl.int64) + i_n
    # the state entering sub-block i (the chunk's entering state and the keys of sub-blocks before i, decayed
    # to the start of i), carried in registers
    state = tl.load(
        h_ptr + (slot * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0
    ).to(tl.float32)  # fmt: skip
    t0 = c * C
    for i in range(NC):
        row0 = bos + t0 + i * BC
        m_t = t0 + i * BC + o_r < length
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        q = load_query(q_head + row0 * (H * K) + k_tile, m_tk, ACT)
        g = load_log_forget(
            g_head + row0 * (H * K) + k_tile, m_tk, log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND
        )  # fmt: skip
        b = tl.cumsum(g, 0)  # decay from the start of sub-block i, inclusive
        q_local = q * tl.exp(b)
        acc = matmul(q_local, state, DT, PRECISION, INTERPRET)  # [BC, BV]
        # diagonal sub-block: when every channel decays by less than e^-60 across it, one matmul of q·exp(b) and
        # k·exp(-b) (both <= e^60, causal entries exact); otherwise pairwise decays, one key row at a time
        if tl.min(tl.sum(g, 0)) > -60.0:
            scores = matmul(q_local, tl.trans(one_minus_exp(g) * tl.exp(-b)), tl.float32, "ieee", INTERPRET)
            scores = tl.where(o_r[:, None] >= o_r[None, :], scores, 0.0)
        else:
            scores = tl.zeros([BC, BC], dtype=tl.float32)
            b_s = tl.zeros([BK], dtype=tl.float32)
            for s in range(BC):
                g_s = load_log_forget(
                    g_head + (row0 + s) * (H * K) + o_k, m_k & (t0 + i * BC + s < length),
                    log_beta, log1m_beta, GATED, HAS_BOUND,
                )  # fmt: skip
                b_s += g_s
                decay = tl.exp(tl.where(o_r[:, None] >= s, b - b_s[None, :], float("-inf")))
                column = tl.sum(q * one_minus_exp(g_s)[None, :] * decay, 1)
                scores = tl.where(o_r[None, :] == s, column[:, None], scores)
        if STORE_SCORES:
            a_offs = (row0 * H + i_h) * BC + o_r[:, None] * (H * BC) + o_r[None, :]
            tl.store(a_ptr + a_offs, scores, mask=m_t[:, None] & (i_v == 0))
        v = tl.load(v_head + row0 * (H * V) + v_tile, mask=m_tv, other=0.0)
        acc += matmul(scores, v, DT, PRECISION, INTERPRET)
        tl.store(o_head + row0 * (H * V) + v_tile, (acc * scale).to(o_ptr.dtype.element_ty), mask=m_tv)
        # advance the state past sub-block i
        k_end = one_minus_exp(g) * tl.exp(tl.cumsum(g, 0, reverse=True) - g)
        state = state * tl.exp(tl.sum(g, 0))[:, None] + matmul(tl.trans(k_end), v, DT, PRECISION, INTERPRET)

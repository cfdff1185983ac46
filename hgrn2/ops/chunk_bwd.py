"""Backward Triton kernels of the chunked HGRN2 recurrence (the op is ``hgrn2.ops.chunk``).

* ``state_bwd_kernel``: one program per (sequence, head, K tile, V tile) walks the chunks backwards and stores
  dS, the gradient of the state leaving each chunk: dS ← exp(b_C) dS + scale · (q · exp(b))^T do.
* ``dqk_bwd_kernel``: one program per (K tile, chunk, head) gives dq and d log λ of the chunk.
* ``dv_bwd_kernel``: one program per (V tile, chunk, head) gives dv of the chunk.

The gradient of the log gates needs no extra pass: with b the running sum of log λ, every decay is
exp(b_t - b_s), so d b_t = q_t ⊙ dq_t - k_t ⊙ dk_t and d log λ_t = Σ_{τ >= t} d b_τ - λ_t ⊙ dk_t (the last
term from k = 1 - λ). The part of that sum beyond the chunk equals Σ_v S_out ⊙ dS_out, the product of the
state leaving the chunk and its gradient, which the forward stored and ``state_bwd_kernel`` gives.
Decays use the same non-positive exponents as the forward (see ``hgrn2.ops.chunk_fwd``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hgrn2.ops.kernel_utils import (
    chunk_bounds,
    gate_log_forget,
    gate_log_forget_grads,
    load_bound,
    load_log_forget,
    load_query,
    log_forget_of,
    matmul,
    one_minus_exp,
    output_gate,
    output_gate_grad,
    sequence_bounds,
)


@triton.jit
def state_bwd_kernel(
    q_ptr, g_ptr, do_ptr, dht_ptr, dh_ptr, dh0_ptr, cu_seqlens, chunk_offsets, log_beta_ptr, log1m_beta_ptr,
    scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    GATED: tl.constexpr, HAS_BOUND: tl.constexpr, ACT: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
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
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        d_state += tl.load(dht_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + kv_tile, mask=m_kv, other=0.0).to(
            tl.float32
        )
    # the previous chunk's tiles are loaded before this chunk is computed, so their latency overlaps the work
    row1 = bos + (n_chunks - 1) * C
    m_next = ((n_chunks - 1) * C + o_t < length) & (n_chunks >= 1)
    q_next = tl.load(q_ptr + (row1 * H + i_h) * K + k_tile, mask=m_next[:, None] & m_k[None, :], other=0.0)
    g_next = tl.load(g_ptr + (row1 * H + i_h) * K + k_tile, mask=m_next[:, None] & m_k[None, :], other=0.0)
    do_next = tl.load(do_ptr + (row1 * H + i_h) * V + v_tile, mask=m_next[:, None] & m_v[None, :], other=0.0)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        # dS leaving chunk c, stored at the chunk's global index
        tl.store(
            dh_ptr + ((first_chunk + c) * H + i_h) * K * V + kv_tile, d_state.to(dh_ptr.dtype.element_ty), mask=m_kv
        )  # fmt: skip
        m_tk = m_next[:, None] & m_k[None, :]
        q_raw, g_raw, do = q_next, g_next, do_next
        row1 = bos + (c - 1) * C
        m_next = ((c - 1) * C + o_t < length) & (c >= 1)
        q_next = tl.load(q_ptr + (row1 * H + i_h) * K + k_tile, mask=m_next[:, None] & m_k[None, :], other=0.0)
        g_next = tl.load(g_ptr + (row1 * H + i_h) * K + k_tile, mask=m_next[:, None] & m_k[None, :], other=0.0)
        do_next = tl.load(do_ptr + (row1 * H + i_h) * V + v_tile, mask=m_next[:, None] & m_v[None, :], other=0.0)
        q = tl.where(m_tk, output_gate(q_raw.to(tl.float32), ACT), 0.0)
        g = log_forget_of(g_raw, m_tk, log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND)
        q_start = q * tl.exp(tl.cumsum(g, 0)) * scale
        d_state = d_state * tl.exp(tl.sum(g, 0))[:, None] + matmul(tl.trans(q_start), do, DT, PRECISION, INTERPRET)
    if STORE_DH0:
        tl.store(dh0_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + kv_tile, d_state, mask=m_kv)


@triton.jit
def dqk_bwd_kernel(
    q_ptr, g_ptr, v_ptr, do_ptr, h_ptr, dh_ptr, dq_ptr, dg_ptr, dbeta_ptr, cu_seqlens, chunk_indices,
    log_beta_ptr, log1m_beta_ptr, inv_beta_ptr, inv_1m_beta_ptr, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, IS_VARLEN: tl.constexpr, GATED: tl.constexpr, HAS_BOUND: tl.constexpr, ACT: tl.constexpr,
    DT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # one program per (K tile, chunk, head); BV covers all of V (dA = do v^T sums over it)
    NK: tl.constexpr = (K + BK - 1) // BK
    i_k, i_c, i_h = tl.program_id(0) % NK, tl.program_id(0) // NK, tl.program_id(1)
    i_n, c, bos, length = chunk_bounds(i_c, T, cu_seqlens, chunk_indices, C, IS_VARLEN)
    NC: tl.constexpr = C // BC
    o_r = tl.arange(0, BC)
    o_nc = tl.arange(0, NC)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    k_tile = o_r[:, None] * (H * K) + o_k[None, :]
    v_tile = o_r[:, None] * (H * V) + o_v[None, :]
    kv_tile = o_k[:, None] * V + o_v[None, :]
    q_head, g_head = q_ptr + i_h * K, g_ptr + i_h * K
    v_head, do_head = v_ptr + i_h * V, do_ptr + i_h * V
    log_beta, log1m_beta = load_bound(log_beta_ptr, log1m_beta_ptr, i_h * K + o_k, m_k, BK, HAS_BOUND)
    slot = i_c.to(tl.int64) + i_n
    h_in_ptrs = h_ptr + (slot * H + i_h) * K * V + kv_tile  # re-read where used (a cache hit)
    # dS, the gradient of the state at the end of the current sub-block, starts as that of the chunk's end
    d_state = tl.load(dh_ptr + (i_c.to(tl.int64) * H + i_h) * K * V + kv_tile, mask=m_kv, other=0.0).to(tl.float32)
    # everything after this chunk reaches log λ_t through the state leaving it: Σ_v S_out ⊙ dS_out
    h_out = tl.load(h_ptr + ((slot + 1) * H + i_h) * K * V + kv_tile, mask=m_kv, other=0.0).to(tl.float32)
    suffix = tl.sum(h_out * d_state, 1)  # [BK]
    t0 = c * C
    # before[i] = sum of the gates of the sub-blocks before i
    before = tl.zeros([NC, BK], dtype=tl.float32)
    running = tl.zeros([BK], dtype=tl.float32)
    for m in range(NC):
        before = tl.where(o_nc[:, None] == m, running[None, :], before)
        m_tm = t0 + m * BC + o_r < length
        g_m = load_log_forget(
            g_head + (bos + t0 + m * BC) * (H * K) + k_tile, m_tm[:, None] & m_k[None, :],
            log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND,
        )  # fmt: skip
        running += tl.sum(g_m, 0)
    d_beta_sum = tl.zeros([BK], dtype=tl.float32)
    for ii in range(NC):
        i = NC - 1 - ii
        row0 = bos + t0 + i * BC
        m_t = t0 + i * BC + o_r < length
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        q = load_query(q_head + row0 * (H * K) + k_tile, m_tk, ACT)
        g = load_log_forget(
            g_head + row0 * (H * K) + k_tile, m_tk, log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND
        )  # fmt: skip
        b = tl.cumsum(g, 0)
        do = tl.load(do_head + row0 * (H * V) + v_tile, mask=m_tv, other=0.0).to(tl.float32) * scale
        v = tl.load(v_head + row0 * (H * V) + v_tile, mask=m_tv, other=0.0)
        d_scores = matmul(do, tl.trans(v), DT, PRECISION, INTERPRET)  # dA = do v^T
        # diagonal sub-block: two matmuls when every channel decays by less than e^-60 across it (as in the
        # forward); otherwise pairwise decays, one step s at a time
        if tl.min(tl.sum(g, 0)) > -60.0:
            d_scores = tl.where(o_r[:, None] >= o_r[None, :], d_scores, 0.0)
            # float32 operands: d log λ cancels these diagonal terms against each other, so they are kept exact
            dq = tl.exp(b) * matmul(d_scores, one_minus_exp(g) * tl.exp(-b), tl.float32, "ieee", INTERPRET)
            dk = tl.exp(-b) * matmul(tl.trans(d_scores), q * tl.exp(b), tl.float32, "ieee", INTERPRET)
        else:
            dq = tl.zeros([BC, BK], dtype=tl.float32)
            dk = tl.zeros([BC, BK], dtype=tl.float32)
            b_s = tl.zeros([BK], dtype=tl.float32)
            for s in range(BC):
                g_s = load_log_forget(
                    g_head + (row0 + s) * (H * K) + o_k, m_k & (t0 + i * BC + s < length),
                    log_beta, log1m_beta, GATED, HAS_BOUND,
                )  # fmt: skip
                b_s += g_s
                decay = tl.exp(tl.where(o_r[:, None] >= s, b - b_s[None, :], float("-inf")))  # [BC, BK]
                ds_col = tl.sum(tl.where(o_r[None, :] == s, d_scores, 0.0), 1)  # dA[:, s]
                dq += ds_col[:, None] * one_minus_exp(g_s)[None, :] * decay
                dk += tl.where(o_r[:, None] == s, tl.sum(ds_col[:, None] * q * decay, 0)[None, :], 0.0)
        # keys of earlier sub-blocks j < i, and the state entering the chunk -> dq
        dq_local = tl.zeros([BC, BK], dtype=tl.float32)
        span = tl.zeros([BK], dtype=tl.float32)
        for jj in range(i):
            j = i - 1 - jj
            row_j = bos + t0 + j * BC
            m_tj = t0 + j * BC + o_r < length
            g_j = load_log_forget(
                g_head + row_j * (H * K) + k_tile, m_tj[:, None] & m_k[None, :],
                log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND,
            )  # fmt: skip
            v_j = tl.load(v_head + row_j * (H * V) + v_tile, mask=m_tj[:, None] & m_v[None, :], other=0.0)
            k_ref = one_minus_exp(g_j) * tl.exp(tl.cumsum(g_j, 0, reverse=True) - g_j + span[None, :])
            dq_local += matmul(matmul(do, tl.trans(v_j), DT, PRECISION, INTERPRET), k_ref, DT, PRECISION, INTERPRET)
            span += tl.sum(g_j, 0)
        before_i = tl.sum(tl.where(o_nc[:, None] == i, before, 0.0), 0)
        h_in = tl.load(h_in_ptrs, mask=m_kv, other=0.0)
        dq_local += matmul(do, tl.trans(h_in), DT, PRECISION, INTERPRET) * tl.exp(before_i[None, :])
        dq += dq_local * tl.exp(b)
        # queries of later sub-blocks and the state leaving the chunk -> dk, through the running dS (the
        # gradient of the state at the end of sub-block i), then move dS back past sub-block i
        to_end = tl.cumsum(g, 0, reverse=True) - g
        dk += tl.exp(to_end) * matmul(v, tl.trans(d_state), DT, PRECISION, INTERPRET)
        d_state = d_state * tl.exp(tl.sum(g, 0))[:, None] + matmul(
            tl.trans(q * tl.exp(b)), do, DT, PRECISION, INTERPRET
        )  # fmt: skip
        # d log λ_t = Σ_{τ >= t} (q⊙dq - k⊙dk)_τ (to the end of the sequence) - λ_t ⊙ dk_t
        d_b = q * dq - one_minus_exp(g) * dk
        dg = tl.cumsum(d_b, 0, reverse=True) + suffix[None, :] - tl.exp(g) * dk
        suffix += tl.sum(d_b, 0)
        k_offs = row0 * (H * K) + i_h * K + k_tile
        if GATED:
            inv_beta, inv_1m_beta = load_bound(inv_beta_ptr, inv_1m_beta_ptr, i_h * K + o_k, m_k, BK, HAS_BOUND)
            dq = dq * output_gate_grad(tl.load(q_ptr + k_offs, mask=m_tk, other=0.0).to(tl.float32), ACT)
            f = tl.load(g_ptr + k_offs, mask=m_tk, other=0.0).to(tl.float32)
            _, log_sig, pre = gate_log_forget(f, log_beta[None, :], log1m_beta[None, :], HAS_BOUND)
            d_f, d_beta = gate_log_forget_grads(
                f, log_sig, pre, log_beta[None, :], log1m_beta[None, :], inv_beta[None, :], inv_1m_beta[None, :],
                HAS_BOUND,
            )  # fmt: skip
            d_beta_sum += tl.sum(tl.where(m_tk, dg * d_beta, 0.0), 0)
            dg = dg * d_f
        tl.store(dq_ptr + k_offs, dq.to(dq_ptr.dtype.element_ty), mask=m_tk)
        tl.store(dg_ptr + k_offs, dg.to(dg_ptr.dtype.element_ty), mask=m_tk)
    if HAS_BOUND:
        tl.store(dbeta_ptr + (i_c.to(tl.int64) * H + i_h) * K + o_k, d_beta_sum, mask=m_k)


@triton.jit
def dv_bwd_kernel(
    q_ptr, g_ptr, do_ptr, a_ptr, dh_ptr, dv_ptr, cu_seqlens, chunk_indices, log_beta_ptr, log1m_beta_ptr,
    scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, GATED: tl.constexpr, HAS_BOUND: tl.constexpr,
    ACT: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # one program per (V tile, chunk, head); BK covers all of K. dv_s = Σ_{t >= s in the sub-block} A[t, s] do_t
    # + (k_s · exp(b_end - b_s)) dS_end, with the diagonal sub-block scores A saved by the forward and dS_end
    # the gradient of the state at the end of the sub-block, carried backwards through the chunk.
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
    do_head, dv_head = do_ptr + i_h * V, dv_ptr + i_h * V
    log_beta, log1m_beta = load_bound(log_beta_ptr, log1m_beta_ptr, i_h * K + o_k, m_k, BK, HAS_BOUND)
    # dS, the gradient of the state at the end of the current sub-block, starts as that of the chunk's end
    d_state = tl.load(
        dh_ptr + (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
        mask=m_k[:, None] & m_v[None, :], other=0.0,
    ).to(tl.float32)  # fmt: skip
    t0 = c * C
    for ii in range(NC):
        i = NC - 1 - ii
        row0 = bos + t0 + i * BC
        m_t = t0 + i * BC + o_r < length
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        g = load_log_forget(
            g_head + row0 * (H * K) + k_tile, m_tk, log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND
        )  # fmt: skip
        k_end = one_minus_exp(g) * tl.exp(tl.cumsum(g, 0, reverse=True) - g)  # decay to the end of sub-block i
        a_offs = (row0 * H + i_h) * BC + o_r[:, None] * (H * BC) + o_r[None, :]
        scores = tl.load(a_ptr + a_offs, mask=m_t[:, None], other=0.0)
        do = tl.load(do_head + row0 * (H * V) + v_tile, mask=m_tv, other=0.0).to(tl.float32) * scale
        dv = matmul(tl.trans(scores), do, DT, PRECISION, INTERPRET) + matmul(k_end, d_state, DT, PRECISION, INTERPRET)
        tl.store(dv_head + row0 * (H * V) + v_tile, dv.to(dv_ptr.dtype.element_ty), mask=m_tv)
        # move dS back past sub-block i
        q = load_query(q_head + row0 * (H * K) + k_tile, m_tk, ACT)
        q_start = q * tl.exp(tl.cumsum(g, 0))
        d_state = d_state * tl.exp(tl.sum(g, 0))[:, None] + matmul(tl.trans(q_start), do, DT, PRECISION, INTERPRET)

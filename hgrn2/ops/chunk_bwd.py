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
    matmul,
    one_minus_exp,
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
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        # dS leaving chunk c, stored at the chunk's global index
        tl.store(
            dh_ptr + ((first_chunk + c) * H + i_h) * K * V + kv_tile, d_state.to(dh_ptr.dtype.element_ty), mask=m_kv
        )  # fmt: skip
        row0 = bos + c * C
        m_t = c * C + o_t < length
        m_tk = m_t[:, None] & m_k[None, :]
        q = load_query(q_ptr + (row0 * H + i_h) * K + k_tile, m_tk, ACT)
        g = load_log_forget(
            g_ptr + (row0 * H + i_h) * K + k_tile, m_tk, log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND
        )  # fmt: skip
        do = tl.load(do_ptr + (row0 * H + i_h) * V + v_tile, mask=m_t[:, None] & m_v[None, :], other=0.0)
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
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    # the [K, V] tiles are re-read where used (cache hits) rather than held in registers across the loop
    h_in_ptrs = h_ptr + (slot * H + i_h) * K * V + kv_tile
    d_state_ptrs = dh_ptr + (i_c.to(tl.int64) * H + i_h) * K * V + kv_tile
    # everything after this chunk reaches log λ_t through the state leaving it: Σ_v S_out ⊙ dS_out
    h_out = tl.load(h_ptr + ((slot + 1) * H + i_h) * K * V + kv_tile, mask=m_kv, other=0.0).to(tl.float32)
    suffix = tl.sum(h_out * tl.load(d_state_ptrs, mask=m_kv, other=0.0).to(tl.float32), 1)  # [BK]
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
    after = tl.zeros([BK], dtype=tl.float32)  # sum of the gates of the sub-blocks after i
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
        # diagonal sub-block: pairwise decays, one step s at a time
        d_scores = matmul(do, tl.trans(v), DT, PRECISION, INTERPRET)  # dA = do v^T
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
        # queries of later sub-blocks j > i, and the state leaving the chunk -> dk
        dk_local = tl.zeros([BC, BK], dtype=tl.float32)
        span = tl.zeros([BK], dtype=tl.float32)
        for j in range(i + 1, NC):
            row_j = bos + t0 + j * BC
            m_tj = t0 + j * BC + o_r < length
            m_tkj = m_tj[:, None] & m_k[None, :]
            q_j = load_query(q_head + row_j * (H * K) + k_tile, m_tkj, ACT)
            g_j = load_log_forget(
                g_head + row_j * (H * K) + k_tile, m_tkj, log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND
            )  # fmt: skip
            do_j = tl.load(do_head + row_j * (H * V) + v_tile, mask=m_tj[:, None] & m_v[None, :], other=0.0)
            q_ref = q_j * tl.exp(tl.cumsum(g_j, 0) + span[None, :])
            d_scores = matmul(do_j.to(tl.float32) * scale, tl.trans(v), DT, PRECISION, INTERPRET)  # [t in j, s in i]
            dk_local += matmul(tl.trans(d_scores), q_ref, DT, PRECISION, INTERPRET)
            span += tl.sum(g_j, 0)
        d_state = tl.load(d_state_ptrs, mask=m_kv, other=0.0)
        dk_local += matmul(v, tl.trans(d_state), DT, PRECISION, INTERPRET) * tl.exp(after[None, :])
        dk += dk_local * tl.exp(tl.cumsum(g, 0, reverse=True) - g)
        # d log λ_t = Σ_{τ >= t} (q⊙dq - k⊙dk)_τ (to the end of the sequence) - λ_t ⊙ dk_t
        d_b = q * dq - one_minus_exp(g) * dk
        dg = tl.cumsum(d_b, 0, reverse=True) + suffix[None, :] - tl.exp(g) * dk
        suffix += tl.sum(d_b, 0)
        after += tl.sum(g, 0)
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
    # one program per (V tile, chunk, head); BK covers all of K. dv_s = Σ_{t >= s} A[t, s] do_t + (k_s ·
    # exp(b_C - b_s)) dS_out, with the diagonal sub-block scores A saved by the forward.
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    d_state_ptrs = dh_ptr + (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    t0 = c * C
    after = tl.zeros([BK], dtype=tl.float32)  # sum of the gates of the sub-blocks after i
    for ii in range(NC):
        i = NC - 1 - ii
        row0 = bos + t0 + i * BC
        m_t = t0 + i * BC + o_r < length
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        g = load_log_forget(
            g_head + row0 * (H * K) + k_tile, m_tk, log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND
        )  # fmt: skip
        k_local = one_minus_exp(g) * tl.exp(tl.cumsum(g, 0, reverse=True) - g)  # decay to the end of sub-block i
        a_offs = (row0 * H + i_h) * BC + o_r[:, None] * (H * BC) + o_r[None, :]
        scores = tl.load(a_ptr + a_offs, mask=m_t[:, None], other=0.0)
        do = tl.load(do_head + row0 * (H * V) + v_tile, mask=m_tv, other=0.0).to(tl.float32) * scale
        dv = matmul(tl.trans(scores), do, DT, PRECISION, INTERPRET)
        span = tl.zeros([BK], dtype=tl.float32)
        for j in range(i + 1, NC):
            row_j = bos + t0 + j * BC
            m_tj = t0 + j * BC + o_r < length
            m_tkj = m_tj[:, None] & m_k[None, :]
            q_j = load_query(q_head + row_j * (H * K) + k_tile, m_tkj, ACT)
            g_j = load_log_forget(
                g_head + row_j * (H * K) + k_tile, m_tkj, log_beta[None, :], log1m_beta[None, :], GATED, HAS_BOUND
            )  # fmt: skip
            do_j = tl.load(do_head + row_j * (H * V) + v_tile, mask=m_tj[:, None] & m_v[None, :], other=0.0)
            q_ref = q_j * tl.exp(tl.cumsum(g_j, 0) + span[None, :])
            scores = matmul(q_ref, tl.trans(k_local), DT, PRECISION, INTERPRET)  # [t in j, s in i]
            dv += matmul(tl.trans(scores), do_j.to(tl.float32) * scale, DT, PRECISION, INTERPRET)
            span += tl.sum(g_j, 0)
        d_state = tl.load(d_state_ptrs, mask=m_k[:, None] & m_v[None, :], other=0.0)
        dv += matmul(k_local * tl.exp(after[None, :]), d_state, DT, PRECISION, INTERPRET)
        tl.store(dv_head + row0 * (H * V) + v_tile, dv.to(dv_ptr.dtype.element_ty), mask=m_tv)
        after += tl.sum(g, 0)

"""Forward Triton kernels of the chunked HGRN2 recurrence (the op is ``hgrn2.ops.chunk``).

Per head, with chunks of C steps, g = log λ and b its running sum inside a chunk (b_C its last value):

* ``chunk_delta_kernel``: one program per (chunk, head, K tile, V tile), all chunks at once: what the chunk
  adds to the state, Δ = (k · exp(b_C - b))^T v, and its decay exp(b_C). Run backwards it gives the chunk's
  share of the state gradient instead, scale · (q · exp(b))^T do.
* ``state_scan_kernel``: one program per (sequence, head, K tile, V tile) walks the chunks in order,
  S ← exp(b_C) ⊙ S + Δ, an elementwise update, and stores the state entering each chunk and the final one
  (backwards: the state gradient leaving each chunk, and the initial state's gradient).
* ``state_walk_kernel``: the two above in one, for calls with many (sequence, head) pairs: each program walks
  its chunks and forms every chunk's Δ on the way, so the deltas never reach memory.
* ``output_fwd_kernel``: one program per (V tile, chunk, head): o = (q · exp(b)) S_in + A v with the chunk's
  causal scores A = (q ⊙ exp(b_t - b_s)) k^T, s <= t, which it can keep for the backward.

The chunk-parallel kernels work on whole [C, ·] tiles. The scores use one reference point per chunk and channel,
half the chunk's log decay r = b_C / 2: A = (q · exp(b - r)) (k · exp(r - b))^T, exact for causal entries. Log gates
are at most 0, so b falls from b_1 <= 0 to b_C and |b - r| <= |b_C| / 2: the factors stay finite while
|b_C| / 2 < ``SPREAD`` (``reference_spread``); a K tile where it does not (gates near 0) forms its scores one key
column at a time from non-positive exponents (``intra_scores``). Log gates are raised to ``LOG_FORGET_FLOOR`` and
capped at 0 when loaded (``hgrn2.ops.kernel_utils``), so that λ = 0 (log λ = -inf) stays finite.
The key k = 1 - exp(g) is derived in registers and q = act(q_proj) on load (``ACT``). The gated entry's log λ
comes from one pass before these kernels (``hgrn2.ops.gate_pass``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hgrn2.ops.kernel_utils import (
    chunk_bounds,
    chunk_rows,
    key_to_chunk_end,
    load_log_forget,
    load_query,
    matmul,
    one_minus_exp,
    running_sum,
    sequence_bounds,
)

# Largest |b_t - b_m| for which the scores are one matmul of q·exp(b - b_m) and k·exp(b_m - b): each factor is at
# most e^40 and even the masked (non-causal) products, at most e^80, stay finite in float32 and bfloat16.
SPREAD = tl.constexpr(40.0)


@triton.jit
def reference_spread(b, g):
    """b - r for the reference point r = b_C / 2 of each channel of a chunk's log gates g [C, BK] (b their
    running sum), and whether every |b - r| <= |b_C| / 2 stays below ``SPREAD``: one reduction, b_C = Σ g."""
    half = 0.5 * tl.sum(g, 0)
    return b - half[None, :], tl.max(-half, 0) < SPREAD


@triton.jit
def intra_scores(
    q, k, g, b, o_t, C: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr
):  # fmt: skip
    """Σ over this K tile of q_t ⊙ k_s ⊙ exp(b_t - b_s), [C, C]; entries with s > t are not meaningful. The
    fallback forms b_t - b_s as Σ_{s < r <= t} g_r: after strong gates |b| is large and the difference of running
    sums would lose float32 precision where the decay is near one."""
    spread, by_matmul = reference_spread(b, g)
    if by_matmul:
        scores = matmul(q * tl.exp(spread), tl.trans(k * tl.exp(-spread)), DT, PRECISION, INTERPRET)
    else:
        scores = tl.zeros([C, C], dtype=tl.float32)
        for s in range(C):
            row = o_t[:, None] == s
            k_s = tl.sum(tl.where(row, k, 0.0), 0)
            rel = tl.cumsum(tl.where(o_t[:, None] > s, g, 0.0), 0)  # b_t - b_s for t >= s
            decay = tl.exp(tl.where(o_t[:, None] >= s, rel, float("-inf")))  # [C, BK]
            column = tl.sum(q * k_s[None, :] * decay, 1)
            scores = tl.where(o_t[None, :] == s, column[:, None], scores)
    return scores


@triton.jit
def key_tile(
    q_ptr, g_ptr, row0, i_h, i_k, o_t, m_t, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, ACT: tl.constexpr
):  # fmt: skip
    """K tile i_k of the chunk of tokens row0 + o_t ([C, BK], rows m_t valid): its channels o_k and their mask,
    the tile's mask and offsets, q = act(q_proj), the log gates g and their running sum b."""
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    k_offs = row0 * (H * K) + i_h * K + o_t[:, None] * (H * K) + o_k[None, :]
    q = load_query(q_ptr + k_offs, m_tk, ACT)
    g = load_log_forget(g_ptr + k_offs, m_tk)
    return o_k, m_k, m_tk, k_offs, q, g, tl.cumsum(g, 0)


@triton.jit
def chunk_delta(
    q_ptr, g_ptr, x_ptr, row0, m_t, o_t, o_k, o_v, m_k, m_v, i_h, scale, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BACKWARD: tl.constexpr, ACT: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, SUMS_BY_MATMUL: tl.constexpr = False, SUM_PARTS: tl.constexpr = 3,
):  # fmt: skip
    """One chunk's Δ [BK, BV] (float32) and log decay b_C [BK], the chunk of tokens row0 + o_t: forward x = v,
    Δ = (k · exp(b_C - b))^T v; BACKWARD x = do, Δ = scale · (q · exp(b))^T do. SUMS_BY_MATMUL: the running sum
    along the chunk as a matmul with a matrix of ones (``kernel_utils.ones_matmul``, log λ in SUM_PARTS bfloat16 parts)
    instead of a scan."""
    m_tk = m_t[:, None] & m_k[None, :]
    k_offs = row0 * (H * K) + i_h * K + o_t[:, None] * (H * K) + o_k[None, :]
    g = load_log_forget(g_ptr + k_offs, m_tk)
    v_offs = row0 * (H * V) + i_h * V + o_t[:, None] * (H * V) + o_v[None, :]
    x = tl.load(x_ptr + v_offs, mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_end = tl.sum(g, 0)  # [BK]
    if BACKWARD:
        q = load_query(q_ptr + k_offs, m_tk, ACT)
        w = q * tl.exp(running_sum(g, SUMS_BY_MATMUL, INTERPRET, SUM_PARTS)) * scale
    else:
        w = key_to_chunk_end(g, SUMS_BY_MATMUL, INTERPRET, SUM_PARTS)
    return matmul(tl.trans(w), x, DT, PRECISION, INTERPRET), b_end


@triton.jit
def chunk_delta_kernel(
    q_ptr, g_ptr, x_ptr, delta_ptr, decay_ptr, cu_seqlens, chunk_indices, scale: tl.constexpr, T, H: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BACKWARD: tl.constexpr,
    IS_VARLEN: tl.constexpr, FLIP: tl.constexpr, ACT: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    # Δ [chunks, H, K, V] (see chunk_delta; float32, or the states' dtype); the chunk's decay exp(b_C) float32
    # [chunks, H, K] (written by the first V tile)
    NK: tl.constexpr = (K + BK - 1) // BK
    NV: tl.constexpr = (V + BV - 1) // BV
    i_v = tl.program_id(0) % NV
    i_k = (tl.program_id(0) // NV) % NK
    i_c, i_h = tl.program_id(0) // (NV * NK), tl.program_id(1)
    _, c, bos, length = chunk_bounds(i_c, T, cu_seqlens, chunk_indices, C, IS_VARLEN)
    o_t = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    row0, o_r = chunk_rows(bos, length, c * C, o_t, FLIP)
    delta, b_end = chunk_delta(
        q_ptr, g_ptr, x_ptr, row0, c * C + o_t < length, o_r, o_k, o_v, m_k, m_v, i_h, scale, H, K, V, BACKWARD, ACT,
        DT, PRECISION, INTERPRET,
    )  # fmt: skip
    base = i_c.to(tl.int64) * H + i_h
    d_offs = base * K * V + o_k[:, None] * V + o_v[None, :]
    tl.store(delta_ptr + d_offs, delta.to(delta_ptr.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
    tl.store(decay_ptr + base * K + o_k, tl.exp(b_end), mask=m_k & (i_v == 0))


@triton.jit
def state_walk_kernel(
    q_ptr, g_ptr, x_ptr, s0_ptr, h_ptr, ht_ptr, cu_seqlens, chunk_offsets, scale: tl.constexpr, T, H: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
    STORE_HT: tl.constexpr, BACKWARD: tl.constexpr, IS_VARLEN: tl.constexpr, FLIP: tl.constexpr, ACT: tl.constexpr,
    DT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, STAGES: tl.constexpr,
    SUMS_BY_MATMUL: tl.constexpr, SUM_PARTS: tl.constexpr,
):  # fmt: skip
    # chunk_delta_kernel and state_scan_kernel in one: each program walks the chunks of one (sequence, head,
    # K tile, V tile) and forms every chunk's Δ on the way, so the deltas never reach memory. What it stores is
    # what state_scan_kernel stores (BACKWARD walks backwards, as its REVERSE).
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
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        state += tl.load(s0_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + kv_tile, mask=m_kv, other=0.0).to(tl.float32)
    slot0 = first_chunk if BACKWARD else first_chunk + i_n
    for step in tl.range(0, n_chunks, num_stages=STAGES):
        c = n_chunks - 1 - step if BACKWARD else step
        tl.store(h_ptr + ((slot0 + c) * H + i_h) * K * V + kv_tile, state.to(h_ptr.dtype.element_ty), mask=m_kv)
        row0, o_r = chunk_rows(bos, length, c * C, o_t, FLIP)
        delta, b_end = chunk_delta(
            q_ptr, g_ptr, x_ptr, row0, c * C + o_t < length, o_r, o_k, o_v, m_k, m_v, i_h, scale, H, K, V, BACKWARD,
            ACT, DT, PRECISION, INTERPRET, SUMS_BY_MATMUL, SUM_PARTS,
        )  # fmt: skip
        state = state * tl.exp(b_end)[:, None] + delta
    if not BACKWARD:
        tl.store(h_ptr + ((slot0 + n_chunks) * H + i_h) * K * V + kv_tile, state.to(h_ptr.dtype.element_ty), mask=m_kv)
    if STORE_HT:
        tl.store(ht_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + kv_tile, state, mask=m_kv)


@triton.jit
def state_scan_kernel(
    delta_ptr, decay_ptr, s0_ptr, h_ptr, ht_ptr, cu_seqlens, chunk_offsets, T, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
    STORE_HT: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    # forward: h[first chunk + n + c] = the state entering chunk c, and one more slot per sequence for the state
    # after its last chunk; REVERSE: h[first chunk + c] = the state gradient leaving chunk c, and ht the gradient
    # of the state entering the sequence. s0 is the initial state (or the final state's gradient).
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    _, length, first_chunk = sequence_bounds(i_n, T, cu_seqlens, chunk_offsets, C, IS_VARLEN)
    n_chunks = tl.cdiv(length, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_tile = o_k[:, None] * V + o_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        state += tl.load(s0_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + kv_tile, mask=m_kv, other=0.0).to(tl.float32)
    slot0 = first_chunk if REVERSE else first_chunk + i_n
    # the next chunk's Δ and decay are loaded before this chunk's update, so their latency overlaps it
    c = n_chunks - 1 if REVERSE else 0
    base = (first_chunk + c) * H + i_h
    delta_next = tl.load(delta_ptr + base * K * V + kv_tile, mask=m_kv & (n_chunks > 0), other=0.0)
    decay_next = tl.load(decay_ptr + base * K + o_k, mask=m_k & (n_chunks > 0), other=1.0)
    for step in range(n_chunks):
        c = n_chunks - 1 - step if REVERSE else step
        tl.store(h_ptr + ((slot0 + c) * H + i_h) * K * V + kv_tile, state.to(h_ptr.dtype.element_ty), mask=m_kv)
        delta, decay = delta_next, decay_next
        c_next = c - 1 if REVERSE else c + 1
        has_next = step + 1 < n_chunks
        base = (first_chunk + c_next) * H + i_h
        delta_next = tl.load(delta_ptr + base * K * V + kv_tile, mask=m_kv & has_next, other=0.0)
        decay_next = tl.load(decay_ptr + base * K + o_k, mask=m_k & has_next, other=1.0)
        state = state * decay[:, None] + delta.to(tl.float32)
    if not REVERSE:
        tl.store(h_ptr + ((slot0 + n_chunks) * H + i_h) * K * V + kv_tile, state.to(h_ptr.dtype.element_ty), mask=m_kv)
    if STORE_HT:
        tl.store(ht_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + kv_tile, state, mask=m_kv)


@triton.jit
def output_fwd_kernel(
    q_ptr, g_ptr, v_ptr, h_ptr, o_ptr, a_ptr, cu_seqlens, chunk_indices, scale: tl.constexpr, T, H: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
    FLIP: tl.constexpr, ACT: tl.constexpr, STORE_SCORES: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    IDT: tl.constexpr, IPRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # With STORE_SCORES the first V tile also writes the causal scores A (without scale), [B * T, H, C]
    # (bfloat16 for half-precision inputs, else float32), at the positions of the scan's order.
    NV: tl.constexpr = (V + BV - 1) // BV
    NK: tl.constexpr = (K + BK - 1) // BK
    i_v, i_c, i_h = tl.program_id(0) % NV, tl.program_id(0) // NV, tl.program_id(1)
    i_n, c, bos, length = chunk_bounds(i_c, T, cu_seqlens, chunk_indices, C, IS_VARLEN)
    o_t = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_t = c * C + o_t < length
    row0, o_r = chunk_rows(bos, length, c * C, o_t, FLIP)  # the chunk's tokens
    slot = i_c.to(tl.int64) + i_n
    acc = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(NK):
        o_k, m_k, _, _, q, g, b = key_tile(q_ptr, g_ptr, row0, i_h, i_k, o_r, m_t, H, K, BK, ACT)
        s_in = tl.load(
            h_ptr + (slot * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        ).to(tl.float32)  # fmt: skip
        acc += matmul(q * tl.exp(b), s_in, DT, PRECISION, INTERPRET)
        scores += intra_scores(q, one_minus_exp(g), g, b, o_t, C, IDT, IPRECISION, INTERPRET)
    scores = tl.where(o_t[:, None] >= o_t[None, :], scores, 0.0)
    if STORE_SCORES:
        a_offs = ((bos + c * C) * H + i_h) * C + o_t[:, None] * (H * C) + o_t[None, :]  # positions in scan order
        tl.store(a_ptr + a_offs, scores.to(a_ptr.dtype.element_ty), mask=m_t[:, None] & (i_v == 0))
    v_offs = row0 * (H * V) + i_h * V + o_r[:, None] * (H * V) + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    v = tl.load(v_ptr + v_offs, mask=m_tv, other=0.0)
    acc += matmul(scores, v, DT, PRECISION, INTERPRET)
    tl.store(o_ptr + v_offs, (acc * scale).to(o_ptr.dtype.element_ty), mask=m_tv)

"""Step-by-step Triton kernels of HGRN2 for small per-head states, forward and backward.

The chunked kernels (``chunk.py``) compute in tiles of at least 16 × 16 and chunks of 16 to 64 steps, which suits
K = V = 128 but wastes most of the work when a head holds a 2 × 2 or 4 × 4 state (expand ratios 2 and 4 of
the image and LRA models) and when sequences are short (the 14-step row and column scans of a 224-pixel
image). These kernels keep a block of heads' [K, V] states in registers, with no matrix tiles, and walk the
steps. One program per (sequence, block of heads). Each load brings ``STEPS_PER_LOAD`` steps' inputs, which the
walk then takes from registers. One step per load is the default: blocks of 16 steps, meant to spare a memory
latency per step, cost more than they save where a step's work is small beside the block it is taken from (a
masked sum over the block per input; measured on an H100, ``benchmarks/results/ops-notes.md``).

Forward: ``S_t = λ_t S_{t-1} + (1 - λ_t) ⊗ v_t``, ``o_t = scale · q_t^T S_t``.

Backward, with ``k = 1 - λ`` and ``b_t = Σ_{r<=t} log λ_r``:

* a forward sweep recomputes ``S_t`` and gives ``dq_t = scale · S_t do_t``;
* a reverse sweep carries ``dS_t = scale · q_t do_t^T + λ_{t+1} dS_{t+1}`` (from the final state's gradient),
  giving ``dk_t = dS_t v_t`` and ``dv_t = dS_t^T k_t``;
* ``dL/db_t = q_t ⊙ dq_t - k_t ⊙ dk_t`` (plus ``Σ_v dS_T ⊙ S_T`` at the end), so
  ``d log λ_t = Σ_{s>=t} dL/db_s - λ_t ⊙ dk_t``: a running sum in the reverse sweep, the last term from
  k = 1 - λ. No step divides by λ, so gates near 0 are safe. The running sum equals λ_t ⊙ Σ_v S_{t-1} ⊙ dS_t, but
  its terms cancel, which float32 inputs cannot afford where λ_t is near 0 (half-precision inputs can: the sum is
  float32); for float32 inputs the forward sweep therefore saves every S_{t-1} and the reverse sweep forms
  ``λ_t ⊙ (Σ_v S_{t-1} ⊙ dS_t - dk_t)`` from it;
* ``d S_0 = λ_1 dS_1``.

``small_state_hgrn2_gated`` takes the raw projections instead of q and log λ and forms both gates in the kernels
(``hgrn2.ops.kernel_utils``), forward and in both backward sweeps, so that neither gate reaches memory: at these
state sizes the elementwise gate passes of PyTorch move more bytes than the scans.

The plain-PyTorch twin is ``hgrn2.ops.reference.hgrn2_recurrence_naive``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hgrn2.ops.gates import activation
from hgrn2.ops.kernel_utils import (
    FUSED_ACTIVATIONS,
    bound_constants,
    check_kernel_dtype,
    decay_toward,
    gate_log_forget,
    gate_log_forget_grads,
    one_minus_exp,
    output_gate,
    output_gate_grad,
    sequence_bounds,
    sm_count,
    unused,
)
from hgrn2.ops.validation import check_lower_bound, check_scan_order

__all__ = ["MAX_STATE", "small_state_hgrn2", "small_state_hgrn2_gated"]

MAX_STATE = 1024  # largest K × V (each rounded up to a power of two) a head may hold in these kernels
_PROGRAM_STATE = 1024  # state elements per program: heads are grouped up to this
STEPS_PER_LOAD = 1  # steps whose inputs one load brings in (more are walked from registers; see the docstring)
# With one step per load, PREFETCH (0, 1 or 2) is how many steps ahead of the walk each step's inputs are loaded:
# their loads are issued that many steps before the step runs and converted only then, so that a load's latency
# overlaps the steps between (with 0, each step waits for its own inputs).
PREFETCH = 0


@triton.jit
def _program_start(h0_ptr, cu_seqlens, T, W, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BH: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
                   COLUMNS: tl.constexpr):  # fmt: skip
    """This program's sequence (first row, length, rows between its steps) and block of BH heads: offsets and
    masks [BH, BK] into q-like rows, [BH, BV] into v-like rows and [BH, BK, BV] into the [N, H, K, V] states, and
    the initial state. With COLUMNS each input row of T·W rows is a row-major T × W grid and sequence n is column
    n % W of grid n // W."""
    NHB: tl.constexpr = (H + BH - 1) // BH
    i_n, i_hb = tl.program_id(0) // NHB, tl.program_id(0) % NHB
    if COLUMNS:
        bos = (i_n // W).to(tl.int64) * T * W + i_n % W
        length = T
        stride = W
    else:
        bos, length, _ = sequence_bounds(i_n, T, cu_seqlens, cu_seqlens, 1, IS_VARLEN)
        stride = 1
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
    return bos, length, stride, hk, hv, m_hk, m_hv, s, m_s, state


@triton.jit
def _block_rows(bos, length, stride, t0, o_b, REVERSE: tl.constexpr):
    """Input rows [BT] (int64) of walk steps t0 .. t0 + BT - 1 and which of them exist: step t is the sequence's
    position t, or length - 1 - t with REVERSE."""
    t = t0 + o_b
    position = length - 1 - t if REVERSE else t
    return bos + position.to(tl.int64) * stride, t < length


@triton.jit
def _row(block, o_b, i: tl.constexpr):
    """Step i of a block [BT, X, Y] of steps, as [X, Y] (registers only: a masked sum over the block)."""
    return tl.sum(tl.where((o_b == i)[:, None, None], block, 0.0), 0)


@triton.jit
def _put(block, o_b, i: tl.constexpr, row):
    """The block [BT, X, Y] with step i replaced by ``row`` [X, Y]."""
    return tl.where((o_b == i)[:, None, None], row[None, :, :], block)


@triton.jit
def _raw_block(ptr, rows, offs, mask):
    """Rows ``rows`` [BT] of a [tokens, H·X]-strided tensor at ``offs`` [BH, BX] within each row: [BT, BH, BX]
    in the tensor's own dtype, 0 where masked (steps past the sequence's end: λ = 1 and k = 0 there keep the
    state as it is). A prefetched block stays so until it is used."""
    return tl.load(ptr + rows[:, None, None] + offs[None, :, :], mask=mask, other=0.0)


@triton.jit
def _block(ptr, rows, offs, mask):
    """:func:`_raw_block` in float32."""
    return _raw_block(ptr, rows, offs, mask).to(tl.float32)


@triton.jit
def _step_inputs(q_ptr, g_ptr, v_ptr, x_ptr, bos, length, stride, t, o_b, hk, hv, m_hk, m_hv, H: tl.constexpr,
                 K: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr, LOAD_Q: tl.constexpr,
                 LOAD_X: tl.constexpr):  # fmt: skip
    """Walk step t's input row [1] and whether it exists, and its raw q (log λ's unless LOAD_Q), log λ (or forget
    projection), v and x (do; v's unless LOAD_X), each [1, BH, ·]: the loads a step waits on, issued PREFETCH
    steps early. Steps past the sequence's end load zeros."""
    rows, m_b = _block_rows(bos, length, stride, t, o_b, REVERSE)
    m_b = m_b & (t + o_b >= 0)  # the reverse sweep looks ahead to steps before the first
    m_bk, m_bv = m_b[:, None, None] & m_hk[None, :, :], m_b[:, None, None] & m_hv[None, :, :]
    g = _raw_block(g_ptr, rows * H * K, hk, m_bk)
    v = _raw_block(v_ptr, rows * H * V, hv, m_bv)
    q = g
    x = v
    if LOAD_Q:
        q = _raw_block(q_ptr, rows * H * K, hk, m_bk)
    if LOAD_X:
        x = _raw_block(x_ptr, rows * H * V, hv, m_bv)
    return rows, m_b, q, g, v, x


@triton.jit
def _reverse_step_inputs(q_ptr, g_ptr, v_ptr, do_ptr, dq_ptr, bos, length, stride, t, o_b, hk, hv, m_hk, m_hv,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr):  # fmt: skip
    """:func:`_step_inputs` of the backward's reverse sweep: q, log λ, v and do, and the dq of its forward sweep."""
    rows, m_b, q, g, v, do = _step_inputs(
        q_ptr, g_ptr, v_ptr, do_ptr, bos, length, stride, t, o_b, hk, hv, m_hk, m_hv, H, K, V, REVERSE, True, True
    )  # fmt: skip
    return rows, m_b, q, g, v, do, _raw_block(dq_ptr, rows * H * K, hk, m_b[:, None, None] & m_hk[None, :, :])


@triton.jit
def _shift(ahead1, ahead2, loaded, PREFETCH: tl.constexpr):
    """The prefetched inputs (tuples of :func:`_step_inputs`) once a step has taken ``ahead1``: with PREFETCH 2,
    ``ahead2`` moves up and ``loaded`` (two steps on) takes its place; with 1, ``loaded`` (the next step)."""
    if PREFETCH == 2:
        return ahead2, loaded
    return loaded, loaded


@triton.jit
def _bound(log_beta_ptr, log1m_beta_ptr, hk, m_hk, HAS_BOUND: tl.constexpr):
    """log β and log(1 - β) of the lower bound at this program's [BH, BK] (head, channel) pairs, as [1, BH, BK]
    (zeros without a lower bound)."""
    if HAS_BOUND:
        log_beta = tl.load(log_beta_ptr + hk, mask=m_hk, other=0.0)
        log1m_beta = tl.load(log1m_beta_ptr + hk, mask=m_hk, other=0.0)
    else:
        log_beta = tl.zeros(hk.shape, dtype=tl.float32)
        log1m_beta = tl.zeros(hk.shape, dtype=tl.float32)
    return log_beta[None, :, :], log1m_beta[None, :, :]


@triton.jit
def _query_of(q, m_bk, ACT: tl.constexpr, GATED: tl.constexpr):
    """q for a block of steps [BT, BH, BK] from what was loaded (any dtype): itself, or the output gate of the
    projection when GATED."""
    q = q.to(tl.float32)
    if GATED:
        q = tl.where(m_bk, output_gate(q, ACT), 0.0)
    return q


@triton.jit
def _log_forget_of(g, m_bk, log_beta, log1m_beta, GATED: tl.constexpr, HAS_BOUND: tl.constexpr):
    """log λ for a block of steps [BT, BH, BK] from what was loaded (any dtype): itself, or the lower-bounded gate
    of the forget projection when GATED; 0 (λ = 1) at masked steps either way."""
    g = g.to(tl.float32)
    if GATED:
        g, _, _, _ = gate_log_forget(g, log_beta, log1m_beta, HAS_BOUND)
        g = tl.where(m_bk, g, 0.0)
    return g


@triton.jit
def _query_block(q_ptr, rows, hk, m_bk, ACT: tl.constexpr, GATED: tl.constexpr):
    """q for a block of steps [BT, BH, BK]: loaded, or the output gate of the loaded projection when GATED."""
    return _query_of(_block(q_ptr, rows, hk, m_bk), m_bk, ACT, GATED)


@triton.jit
def _log_forget_block(g_ptr, rows, hk, m_bk, log_beta, log1m_beta, GATED: tl.constexpr, HAS_BOUND: tl.constexpr):
    """log λ for a block of steps [BT, BH, BK]: loaded, or the lower-bounded gate of the loaded forget projection
    when GATED; 0 (λ = 1) at masked steps either way."""
    return _log_forget_of(_block(g_ptr, rows, hk, m_bk), m_bk, log_beta, log1m_beta, GATED, HAS_BOUND)


@triton.jit
def _forward_block(state, q_blk, g_blk, v_blk, o_b, scale: tl.constexpr, BT: tl.constexpr):
    """The walk through one block of steps [BT, BH, ·] (float32 q and log λ): the state after it and the block's
    outputs."""
    o_blk = tl.zeros_like(v_blk)
    for i in tl.static_range(BT):
        g, v = _row(g_blk, o_b, i), _row(v_blk, o_b, i)
        state = decay_toward(state, one_minus_exp(g)[:, :, None], v[:, None, :])
        o_blk = _put(o_blk, o_b, i, tl.sum(_row(q_blk, o_b, i)[:, :, None] * state, 1) * scale)
    return state, o_blk


@triton.jit
def small_state_fwd_kernel(
    q_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, cu_seqlens, log_beta_ptr, log1m_beta_ptr, scale: tl.constexpr, T, W,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    COLUMNS: tl.constexpr, REVERSE: tl.constexpr, GATED: tl.constexpr, HAS_BOUND: tl.constexpr, ACT: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    # GATED: q_ptr and g_ptr hold the raw projections, and q and log λ are formed here, step block by step block
    bos, length, stride, hk, hv, m_hk, m_hv, s, m_s, state = _program_start(
        h0_ptr, cu_seqlens, T, W, H, K, V, BH, BK, BV, HAS_H0, IS_VARLEN, COLUMNS
    )
    log_beta, log1m_beta = _bound(log_beta_ptr, log1m_beta_ptr, hk, m_hk, HAS_BOUND)
    o_b = tl.arange(0, BT)
    if PREFETCH == 0:
        for t0 in range(0, length, BT):  # BT steps' inputs per load: one memory latency per block, not per step
            rows, m_b = _block_rows(bos, length, stride, t0, o_b, REVERSE)
            m_bk, m_bv = m_b[:, None, None] & m_hk[None, :, :], m_b[:, None, None] & m_hv[None, :, :]
            q_blk = _query_block(q_ptr, rows * H * K, hk, m_bk, ACT, GATED)
            g_blk = _log_forget_block(g_ptr, rows * H * K, hk, m_bk, log_beta, log1m_beta, GATED, HAS_BOUND)
            v_blk = _block(v_ptr, rows * H * V, hv, m_bv)
            state, o_blk = _forward_block(state, q_blk, g_blk, v_blk, o_b, scale, BT)
            o_offs = rows[:, None, None] * H * V + hv[None, :, :]
            tl.store(o_ptr + o_offs, o_blk.to(o_ptr.dtype.element_ty), mask=m_bv)
    else:  # one step at a time (BT = 1), its inputs loaded PREFETCH steps ahead
        args = (q_ptr, g_ptr, v_ptr, v_ptr, bos, length, stride)
        ahead1 = _step_inputs(*args, 0, o_b, hk, hv, m_hk, m_hv, H, K, V, REVERSE, True, False)
        ahead2 = _step_inputs(*args, 1, o_b, hk, hv, m_hk, m_hv, H, K, V, REVERSE, True, False)
        for t in range(0, length):
            rows, m_b, q_raw, g_raw, v_raw, _ = ahead1
            loaded = _step_inputs(*args, t + PREFETCH, o_b, hk, hv, m_hk, m_hv, H, K, V, REVERSE, True, False)
            ahead1, ahead2 = _shift(ahead1, ahead2, loaded, PREFETCH)
            m_bk, m_bv = m_b[:, None, None] & m_hk[None, :, :], m_b[:, None, None] & m_hv[None, :, :]
            q_blk = _query_of(q_raw, m_bk, ACT, GATED)
            g_blk = _log_forget_of(g_raw, m_bk, log_beta, log1m_beta, GATED, HAS_BOUND)
            state, o_blk = _forward_block(state, q_blk, g_blk, v_raw.to(tl.float32), o_b, scale, 1)
            o_offs = rows[:, None, None] * H * V + hv[None, :, :]
            tl.store(o_ptr + o_offs, o_blk.to(o_ptr.dtype.element_ty), mask=m_bv)
    if STORE_HT:
        tl.store(ht_ptr + s, state, mask=m_s)


@triton.jit
def _states_block(state, g_blk, v_blk, do_blk, rows, t0, length, o_b, states_ptr, s_head, m_s, scale: tl.constexpr,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  EXACT: tl.constexpr):  # fmt: skip
    """The backward's forward sweep through one block of steps: the state after it and the block's dq (with EXACT,
    every state before a step stored at states_ptr)."""
    dq_blk = tl.zeros_like(g_blk)
    for i in tl.static_range(BT):
        if EXACT:
            row = tl.sum(tl.where(o_b == i, rows, 0), 0)
            tl.store(states_ptr + row * H * K * V + s_head, state, mask=m_s & (t0 + i < length))
        g, v = _row(g_blk, o_b, i), _row(v_blk, o_b, i)
        state = decay_toward(state, one_minus_exp(g)[:, :, None], v[:, None, :])
        dq_blk = _put(dq_blk, o_b, i, tl.sum(state * _row(do_blk, o_b, i)[:, None, :], 2) * scale)
    return state, dq_blk


@triton.jit
def _reverse_block(d_state, d_b, q_blk, g_blk, v_blk, do_blk, dq_blk, rows, t0, length, o_b, states_ptr, s_head, m_s,
                   scale: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   EXACT: tl.constexpr):  # fmt: skip
    """The backward's reverse sweep through one block of steps, its last step first: the state gradient and the
    running sum d_b before it, and the block's dv and d log λ."""
    dv_blk = tl.zeros_like(v_blk)
    dg_blk = tl.zeros_like(g_blk)
    for i in tl.static_range(BT):
        r = BT - 1 - i
        q, g, v = _row(q_blk, o_b, r), _row(g_blk, o_b, r), _row(v_blk, o_b, r)
        forget, k = tl.exp(g), one_minus_exp(g)
        d_state += (q * scale)[:, :, None] * _row(do_blk, o_b, r)[:, None, :]
        dk = tl.sum(d_state * v[:, None, :], 2)
        dv_blk = _put(dv_blk, o_b, r, tl.sum(d_state * k[:, :, None], 1))
        if EXACT:
            row = tl.sum(tl.where(o_b == r, rows, 0), 0)
            before = tl.load(states_ptr + row * H * K * V + s_head, mask=m_s & (t0 + r < length), other=0.0)
            dg_blk = _put(dg_blk, o_b, r, forget * (tl.sum(before * d_state, 2) - dk))
        else:
            d_b += q * _row(dq_blk, o_b, r) - k * dk
            dg_blk = _put(dg_blk, o_b, r, d_b - forget * dk)
        d_state -= k[:, :, None] * d_state
    return d_state, d_b, dv_blk, dg_blk


@triton.jit
def _through_gates(dq_blk, dg_blk, p_blk, f_blk, m_bk, log_beta, log1m_beta, inv_beta, d_beta, ACT: tl.constexpr,
                   HAS_BOUND: tl.constexpr):  # fmt: skip
    """dq and d log λ of a block taken through the gates to the raw projections p and f (float32), and the lower
    bound's gradient summed on."""
    dq_blk = dq_blk * output_gate_grad(p_blk, ACT)
    _, sig, sig_neg, lam = gate_log_forget(f_blk, log_beta, log1m_beta, HAS_BOUND)
    d_f, d_bound = gate_log_forget_grads(sig, sig_neg, lam, log1m_beta, inv_beta, HAS_BOUND)
    if HAS_BOUND:
        d_beta += tl.sum(tl.where(m_bk, dg_blk * d_bound, 0.0), 0)
    return dq_blk, dg_blk * d_f, d_beta


@triton.jit
def small_state_bwd_kernel(
    q_ptr, v_ptr, g_ptr, h0_ptr, do_ptr, dht_ptr, dq_ptr, dv_ptr, dg_ptr, dh0_ptr, states_ptr, cu_seqlens,
    log_beta_ptr, log1m_beta_ptr, inv_beta_ptr, d_beta_ptr, scale: tl.constexpr, T, W, H: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    COLUMNS: tl.constexpr, REVERSE: tl.constexpr, EXACT: tl.constexpr, GATED: tl.constexpr,
    HAS_BOUND: tl.constexpr, ACT: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    # dq_ptr is float32: the reverse sweep reads back the dq the forward sweep wrote. With EXACT the forward sweep
    # also writes every state S_{t-1} (float32, one [H, K, V] per input row, at states_ptr) and the reverse sweep
    # forms d log λ_t = λ_t ⊙ Σ_v S_{t-1} ⊙ dS_t - λ_t ⊙ dk_t from it: no running sum, no cancellation.
    # GATED: q_ptr and g_ptr hold the raw projections; the reverse sweep turns dq and d log λ into their gradients
    # (written over dq and to dg_ptr) and sums the lower bound's over the sequence into d_beta_ptr [N, H, K]
    bos, length, stride, hk, hv, m_hk, m_hv, s, m_s, state = _program_start(
        h0_ptr, cu_seqlens, T, W, H, K, V, BH, BK, BV, HAS_H0, IS_VARLEN, COLUMNS
    )
    log_beta, log1m_beta = _bound(log_beta_ptr, log1m_beta_ptr, hk, m_hk, HAS_BOUND)
    o_b = tl.arange(0, BT)
    s_head = hk[:, :, None] * V + (hv % V)[:, None, :]  # [BH, BK, BV] within one row of the saved states
    if PREFETCH == 0:
        for t0 in range(0, length, BT):  # forward sweep: the states again, and dq
            rows, m_b = _block_rows(bos, length, stride, t0, o_b, REVERSE)
            m_bk, m_bv = m_b[:, None, None] & m_hk[None, :, :], m_b[:, None, None] & m_hv[None, :, :]
            g_blk = _log_forget_block(g_ptr, rows * H * K, hk, m_bk, log_beta, log1m_beta, GATED, HAS_BOUND)
            v_blk = _block(v_ptr, rows * H * V, hv, m_bv)
            do_blk = _block(do_ptr, rows * H * V, hv, m_bv)
            state, dq_blk = _states_block(
                state, g_blk, v_blk, do_blk, rows, t0, length, o_b, states_ptr, s_head, m_s, scale, H, K, V, BT, EXACT
            )  # fmt: skip
            tl.store(dq_ptr + rows[:, None, None] * H * K + hk[None, :, :], dq_blk, mask=m_bk)
    else:  # one step at a time (BT = 1), its inputs loaded PREFETCH steps ahead
        args = (q_ptr, g_ptr, v_ptr, do_ptr, bos, length, stride)
        ahead1 = _step_inputs(*args, 0, o_b, hk, hv, m_hk, m_hv, H, K, V, REVERSE, False, True)
        ahead2 = _step_inputs(*args, 1, o_b, hk, hv, m_hk, m_hv, H, K, V, REVERSE, False, True)
        for t in range(0, length):
            rows, m_b, _, g_raw, v_raw, do_raw = ahead1
            loaded = _step_inputs(*args, t + PREFETCH, o_b, hk, hv, m_hk, m_hv, H, K, V, REVERSE, False, True)
            ahead1, ahead2 = _shift(ahead1, ahead2, loaded, PREFETCH)
            m_bk = m_b[:, None, None] & m_hk[None, :, :]
            g_blk = _log_forget_of(g_raw, m_bk, log_beta, log1m_beta, GATED, HAS_BOUND)
            state, dq_blk = _states_block(
                state, g_blk, v_raw.to(tl.float32), do_raw.to(tl.float32), rows, t, length, o_b, states_ptr, s_head,
                m_s, scale, H, K, V, 1, EXACT,
            )  # fmt: skip
            tl.store(dq_ptr + rows[:, None, None] * H * K + hk[None, :, :], dq_blk, mask=m_bk)
    d_state = tl.zeros([BH, BK, BV], dtype=tl.float32)
    if HAS_DHT:
        d_state += tl.load(dht_ptr + s, mask=m_s, other=0.0)
    d_b = tl.sum(d_state * state, 2)  # the final state's own dependence on b_T
    d_beta = tl.zeros([BH, BK], dtype=tl.float32)
    inv_beta = _bound(inv_beta_ptr, inv_beta_ptr, hk, m_hk, HAS_BOUND and GATED)[0]  # 1/β, for the gated sweep
    n_blocks = tl.cdiv(length, BT)
    if PREFETCH == 0:
        for j in range(n_blocks):  # reverse sweep, the last block first
            t0 = (n_blocks - 1 - j) * BT
            rows, m_b = _block_rows(bos, length, stride, t0, o_b, REVERSE)
            m_bk, m_bv = m_b[:, None, None] & m_hk[None, :, :], m_b[:, None, None] & m_hv[None, :, :]
            q_blk = _query_block(q_ptr, rows * H * K, hk, m_bk, ACT, GATED)
            g_blk = _log_forget_block(g_ptr, rows * H * K, hk, m_bk, log_beta, log1m_beta, GATED, HAS_BOUND)
            v_blk = _block(v_ptr, rows * H * V, hv, m_bv)
            do_blk = _block(do_ptr, rows * H * V, hv, m_bv)
            dq_ptrs = dq_ptr + rows[:, None, None] * H * K + hk[None, :, :]
            dq_blk = tl.zeros_like(g_blk)
            if not EXACT:
                dq_blk = tl.load(dq_ptrs, mask=m_bk, other=0.0)
            d_state, d_b, dv_blk, dg_blk = _reverse_block(
                d_state, d_b, q_blk, g_blk, v_blk, do_blk, dq_blk, rows, t0, length, o_b, states_ptr, s_head, m_s,
                scale, H, K, V, BT, EXACT,
            )  # fmt: skip
            dv_offs = rows[:, None, None] * H * V + hv[None, :, :]
            tl.store(dv_ptr + dv_offs, dv_blk.to(dv_ptr.dtype.element_ty), mask=m_bv)
            if GATED:  # through the gates, from the projections again (just loaded, so cached)
                if EXACT:
                    dq_blk = tl.load(dq_ptrs, mask=m_bk, other=0.0)
                p_blk = _block(q_ptr, rows * H * K, hk, m_bk)
                f_blk = _block(g_ptr, rows * H * K, hk, m_bk)
                dq_blk, dg_blk, d_beta = _through_gates(
                    dq_blk, dg_blk, p_blk, f_blk, m_bk, log_beta, log1m_beta, inv_beta, d_beta, ACT, HAS_BOUND
                )  # fmt: skip
                tl.store(dq_ptrs, dq_blk, mask=m_bk)
            dg_offs = rows[:, None, None] * H * K + hk[None, :, :]
            tl.store(dg_ptr + dg_offs, dg_blk.to(dg_ptr.dtype.element_ty), mask=m_bk)
    else:  # one step at a time, the last first, its inputs (dq included) loaded PREFETCH steps ahead
        args = (q_ptr, g_ptr, v_ptr, do_ptr, dq_ptr, bos, length, stride)
        ahead1 = _reverse_step_inputs(*args, length - 1, o_b, hk, hv, m_hk, m_hv, H, K, V, REVERSE)
        ahead2 = _reverse_step_inputs(*args, length - 2, o_b, hk, hv, m_hk, m_hv, H, K, V, REVERSE)
        for j in range(0, length):
            t = length - 1 - j
            rows, m_b, q_raw, g_raw, v_raw, do_raw, dq_blk = ahead1
            loaded = _reverse_step_inputs(*args, t - PREFETCH, o_b, hk, hv, m_hk, m_hv, H, K, V, REVERSE)
            ahead1, ahead2 = _shift(ahead1, ahead2, loaded, PREFETCH)
            m_bk, m_bv = m_b[:, None, None] & m_hk[None, :, :], m_b[:, None, None] & m_hv[None, :, :]
            q_blk = _query_of(q_raw, m_bk, ACT, GATED)
            g_blk = _log_forget_of(g_raw, m_bk, log_beta, log1m_beta, GATED, HAS_BOUND)
            if EXACT:
                dq_blk = tl.zeros_like(g_blk)
            d_state, d_b, dv_blk, dg_blk = _reverse_block(
                d_state, d_b, q_blk, g_blk, v_raw.to(tl.float32), do_raw.to(tl.float32), dq_blk, rows, t, length, o_b,
                states_ptr, s_head, m_s, scale, H, K, V, 1, EXACT,
            )  # fmt: skip
            dv_offs = rows[:, None, None] * H * V + hv[None, :, :]
            tl.store(dv_ptr + dv_offs, dv_blk.to(dv_ptr.dtype.element_ty), mask=m_bv)
            dq_ptrs = dq_ptr + rows[:, None, None] * H * K + hk[None, :, :]
            if GATED:  # through the gates, from the projections loaded for this step
                if EXACT:
                    dq_blk = tl.load(dq_ptrs, mask=m_bk, other=0.0)
                dq_blk, dg_blk, d_beta = _through_gates(
                    dq_blk, dg_blk, q_raw.to(tl.float32), g_raw.to(tl.float32), m_bk, log_beta, log1m_beta, inv_beta,
                    d_beta, ACT, HAS_BOUND,
                )  # fmt: skip
                tl.store(dq_ptrs, dq_blk, mask=m_bk)
            dg_offs = rows[:, None, None] * H * K + hk[None, :, :]
            tl.store(dg_ptr + dg_offs, dg_blk.to(dg_ptr.dtype.element_ty), mask=m_bk)
    if STORE_DH0:
        tl.store(dh0_ptr + s, d_state, mask=m_s)
    if GATED and HAS_BOUND:
        i_n = tl.program_id(0) // ((H + BH - 1) // BH)
        tl.store(d_beta_ptr + i_n.to(tl.int64) * H * K + hk, d_beta, mask=m_hk)


def _pow2_at_least(n) -> int:
    """The least power of two >= n, as a Python int found by comparisons. Under ``torch.compile`` a size seen to
    change between calls becomes symbolic, and the launch settings made from it (num_warps, the tile sizes) must be
    constants: each comparison guards on the size, so the compiled graph holds them for every size that gives the
    same power of two, where a bit trick (``triton.next_power_of_2``) or ``int()`` would leave them symbolic."""
    power = 1
    while power < n:
        power *= 2
    return power


class _Launch:
    """Sizes and launch settings shared by the forward and the backward."""

    def __init__(self, q, v, cu_seqlens, reverse: bool = False, columns: int | None = None):
        self.heads, self.key_dim, self.value_dim = q.shape[2], q.shape[3], v.shape[3]
        self.n_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        self.seq_len, self.width = q.shape[1], 1
        if columns is not None:  # each row of T = h·W steps is an h × W grid: B·W sequences of h steps
            self.n_seqs, self.seq_len, self.width = q.shape[0] * columns, q.shape[1] // columns, columns
        self.bk, self.bv = _pow2_at_least(self.key_dim), _pow2_at_least(self.value_dim)
        per_head = self.bk * self.bv
        if per_head > MAX_STATE:
            raise ValueError(
                f"the step-by-step kernels hold at most {MAX_STATE} state elements per head, got K={self.key_dim} "
                f"and V={self.value_dim}; use backend='triton' (the chunked kernels) for states of this size"
            )
        # as many heads per program as fit, then fewer while that leaves fewer than 4 programs per SM: a long
        # sequence is walked one step at a time, and only other programs hide each step's load latency
        self.bh = min(_pow2_at_least(self.heads), max(1, _PROGRAM_STATE // per_head))
        sms = sm_count(q.device)
        while self.bh > 1 and self.n_seqs * triton.cdiv(self.heads, self.bh) < 4 * sms:
            self.bh //= 2
        self.grid = (self.n_seqs * triton.cdiv(self.heads, self.bh),)
        # warps for about 8 elements a thread of the state and of each block of steps' inputs (more spill: the
        # backward holds seven such blocks)
        block = STEPS_PER_LOAD * self.bh * max(self.bk, self.bv)
        self.num_warps = min(8, triton.next_power_of_2(max(1, max(block, self.bh * per_head) // 256)))
        self.flags = dict(
            H=self.heads, K=self.key_dim, V=self.value_dim, BH=self.bh, BK=self.bk, BV=self.bv, BT=STEPS_PER_LOAD,
            IS_VARLEN=cu_seqlens is not None, COLUMNS=columns is not None, REVERSE=reverse,
            PREFETCH=PREFETCH if STEPS_PER_LOAD == 1 else 0,
        )  # fmt: skip

    def state(self, device) -> torch.Tensor:
        return torch.empty(self.n_seqs, self.heads, self.key_dim, self.value_dim, dtype=torch.float32, device=device)


class SmallStateHGRN2Function(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, v, log_forget, initial_state, scale, output_final_state, cu_seqlens, reverse=False, columns=None,
        lower_bound=None, act=None,
    ):  # fmt: skip
        # act (an index of FUSED_ACTIVATIONS) set: q and log_forget are the raw projections, gated in the kernels
        launch = _Launch(q, v, cu_seqlens, reverse, columns)
        gated, has_bound = act is not None, lower_bound is not None
        bound = bound_constants(lower_bound, launch.heads, launch.key_dim, q.device)
        flags = launch.flags | dict(GATED=gated, HAS_BOUND=has_bound, ACT=act or 0)
        o = torch.empty_like(v)
        final_state = launch.state(q.device) if output_final_state else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        none = unused(q.device)
        small_state_fwd_kernel[launch.grid](
            q, v, log_forget, h0 if h0 is not None else none, o, final_state if final_state is not None else none,
            cu_seqlens if cu_seqlens is not None else unused(q.device, torch.int32),
            *(bound[:2] if has_bound else (none, none)), scale, launch.seq_len, launch.width,
            HAS_H0=h0 is not None, STORE_HT=final_state is not None, num_warps=launch.num_warps, **flags,
        )  # fmt: skip
        ctx.save_for_backward(q, v, log_forget, h0, cu_seqlens, *bound)
        ctx.launch, ctx.scale, ctx.flags = launch, scale, flags
        ctx.initial_dtype = initial_state.dtype if initial_state is not None else None
        ctx.bound_shape = lower_bound.shape if has_bound else None
        ctx.bound_dtype = lower_bound.dtype if has_bound else None
        return o, final_state

    @staticmethod
    def backward(ctx, do, d_final):
        q, v, log_forget, h0, cu_seqlens, *bound = ctx.saved_tensors
        launch, flags = ctx.launch, ctx.flags
        need_dh0 = h0 is not None and ctx.needs_input_grad[3]
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dv, dg = torch.empty_like(v), torch.empty_like(log_forget)
        dh0 = launch.state(q.device) if need_dh0 else None
        has_bound = flags["HAS_BOUND"]
        d_beta = torch.empty(launch.n_seqs, launch.heads, launch.key_dim, device=q.device) if has_bound else None
        none = unused(q.device)
        # float32 inputs: every step's state, read back for an exact d log λ (see the kernel)
        exact = q.dtype == torch.float32
        states = (
            torch.empty(q.shape[0] * q.shape[1], launch.heads, launch.key_dim, launch.value_dim, device=q.device)
            if exact
            else none
        )
        small_state_bwd_kernel[launch.grid](
            q, v, log_forget, h0 if h0 is not None else none, do.contiguous(),
            d_final.contiguous() if d_final is not None else none, dq, dv, dg, dh0 if dh0 is not None else none,
            states, cu_seqlens if cu_seqlens is not None else unused(q.device, torch.int32),
            *(bound if has_bound else [none] * 3), d_beta if has_bound else none, ctx.scale, launch.seq_len,
            launch.width, HAS_H0=h0 is not None, HAS_DHT=d_final is not None, STORE_DH0=need_dh0, EXACT=exact,
            num_warps=launch.num_warps, **flags,
        )  # fmt: skip
        dh0 = dh0.to(ctx.initial_dtype) if dh0 is not None else None
        d_bound = d_beta.sum(0).sum_to_size(ctx.bound_shape).to(ctx.bound_dtype) if has_bound else None
        return dq.to(q.dtype), dv, dg, dh0, None, None, None, None, None, d_bound, None


def _order_checked(q, v, g, cu_seqlens, columns):
    check_kernel_dtype(q, v, g)
    check_scan_order(q.shape[1], cu_seqlens, columns)
    return q.contiguous(), v.contiguous(), g.contiguous()


def small_state_hgrn2(
    q: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    reverse: bool = False,
    columns: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 one step at a time, differentiable, for heads of at most ``MAX_STATE`` state elements.

    Shapes and arguments as in :func:`hgrn2.ops.hgrn2_recurrence`; returns ``(o, final_state)`` with the final
    state in float32. Gradients reach q, v, log_forget and initial_state.

    Two more orders read the inputs where they are, with no reordered copy, and write the outputs in place:
    ``reverse=True`` runs each sequence from its last step to its first (the same as flipping the inputs along T,
    scanning, and flipping the output back); ``columns=W`` takes each of the B rows of T = h·W steps as a
    row-major h × W grid and scans its W columns top to bottom (the same as scanning ``x.unflatten(1, (h, W))
    .transpose(1, 2).flatten(0, 1)``, B·W sequences of h steps, whose initial and final states are
    ``[B·W, H, K, V]`` in that order). The two combine; neither takes ``cu_seqlens`` with ``columns``.
    """
    q, v, log_forget = _order_checked(q, v, log_forget, cu_seqlens, columns)
    return SmallStateHGRN2Function.apply(
        q, v, log_forget, initial_state, float(scale), output_final_state, cu_seqlens, bool(reverse), columns
    )


def small_state_hgrn2_gated(
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
    reverse: bool = False,
    columns: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`small_state_hgrn2` from the raw projections, with both gates formed in the kernels:
    ``q = output_gate(q_proj)`` and ``log λ = logaddexp(log β, log1p(-β) + logsigmoid(forget_proj))`` with
    β = ``lower_bound`` (broadcasting to ``[H, K]``; None means β = 0), as in
    :func:`hgrn2.ops.hgrn2_gated_recurrence`. Neither q nor log λ reaches memory, forward or backward; gradients
    reach q_proj, v, forget_proj, lower_bound and initial_state. Activations other than those of
    ``FUSED_ACTIVATIONS`` run in PyTorch first.
    """
    q_proj, v, forget_proj = _order_checked(q_proj, v, forget_proj, cu_seqlens, columns)
    check_lower_bound(lower_bound, q_proj.shape[2], q_proj.shape[3])
    if output_gate not in FUSED_ACTIVATIONS:
        q_proj, output_gate = activation(q_proj, output_gate).contiguous(), "identity"
    return SmallStateHGRN2Function.apply(
        q_proj, v, forget_proj, initial_state, float(scale), output_final_state, cu_seqlens, bool(reverse), columns,
        lower_bound, FUSED_ACTIVATIONS[output_gate],
    )  # fmt: skip

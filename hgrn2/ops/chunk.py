"""Chunked Triton kernels of the HGRN2 recurrence, forward and backward, as a ``torch.autograd.Function``.

Per head: S_t = diag(λ_t) S_{t-1} + (1 - λ_t) ⊗ v_t and o_t = scale · q_t^T S_t. A call runs, in chunks of 64 steps
(``LAUNCH["chunk"]``; 16 for heads of at most 16 channels): the state entering each chunk (bfloat16 for bfloat16
inputs, else float32), then every chunk's output and its causal scores, kept for the backward (bfloat16 for
half-precision inputs); the backward forms the state gradients the same way, backwards, then dq/d log λ and dv chunk
by chunk. The states come from a walk over the chunks that forms each chunk's state delta on the way when the call
has enough (sequence, head) pairs to fill the GPU, else from every chunk's delta at once followed by an elementwise
walk. The key 1 - λ is derived inside the kernels and never written. The kernels live in ``hgrn2.ops.chunk_fwd`` and
``hgrn2.ops.chunk_bwd``. The gated entry's log λ comes from one elementwise pass over the raw forget projection
before them, and the gradients of that projection and of the lower bound from one pass after them
(``hgrn2.ops.gate_pass``); the output gate q = act(q_proj) is applied inside the kernels.

The gradient of the gated entry's lower bound sums d log λ over every position of every sequence, so it
magnifies whatever rounding d log λ carries. The backward sums each d log λ_t over the pairs of steps that span t,
so that no term cancels against another (``hgrn2.ops.chunk_bwd``); with half-precision states and matmul
operands that gradient then comes out about 1.5e-3 from float64 over 16 chunks. ``precise_bound_grad=True``
(per call) or ``PRECISE_BOUND_GRAD = True`` (the default of every call) keeps the chunk states in float32 and
multiplies float32 operands in TF32 where the states enter, for about 1e-3, at the cost of the float32 states.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hgrn2.ops.chunk_bwd import dqk_bwd_kernel, dv_bwd_kernel
from hgrn2.ops.chunk_fwd import (
    chunk_delta_kernel,
    output_fwd_kernel,
    state_scan_kernel,
    state_walk_kernel,
)
from hgrn2.ops.gate_pass import gate_grads, log_forget
from hgrn2.ops.gates import activation
from hgrn2.ops.kernel_utils import (
    FUSED_ACTIVATIONS,
    bound_constants,
    check_kernel_dtype,
    dot_config,
    interpreting,
    sequence_layout,
    sm_count,
    state_dtype,
    sum_parts,
    unused,
)
from hgrn2.ops.validation import check_lower_bound

# Heads of at most 16 channels (K and V) run in chunks of LAUNCH["small_head_chunk"] steps, the chunk-parallel
# kernels with LAUNCH["small_head_warps"] warps and the walk with LAUNCH["small_head_walk_warps"]. Shorter chunks do
# less work between a chunk's own steps (C x C scores per chunk), which outweighs the state's (K x V) there, but
# make the walk over chunks longer; their [C, 16] tiles need few threads. At ListOps' training shape (K = V = 4,
# T = 2,000, B = 128) on an H100, training steps/s: chunks of 64 with 8 warps 11.8, with 2 warps 15.2-16.2; chunks
# of 16 with 8 warps 8.2, with 2 warps 15.8, with one warp 18.9, and one warp in the walk too 19.5; chunks of 32 with
# one warp 18.5 (benchmarks/results/ops-notes.md). Heads of exactly 16 channels were not timed.
# LAUNCH["<kernel>_maxnreg"] (0: no limit) caps the registers of a thread of the output, dq/d log λ or dv kernel, so
# that two of its programs can share an SM at the price of spills; LAUNCH["<kernel>_stages"] (0: Triton's default,
# 3) sets how many stages its loop over K tiles is software-pipelined in, which sets most of its shared memory.
# Both apply to half-precision inputs with heads of more than SMALL_HEAD channels, the calls they were timed on:
# float32 inputs spill about 2 KB a thread under a cap of 128 (sm90 compile), and small heads run one warp. The
# output kernel's default, K tiles of 32 in two stages under a cap of 128 (two 8-warp programs an SM instead of
# one), took the forward 4-8% below K tiles of 64 in three stages at every shape timed on an H100, and the gated
# entry with the precise path 2% (benchmarks/results/ops-notes.md).
# LAUNCH["intra_precision"] is the precision of INTRA_DOT's float32 operands ("tf32x3": three TF32 passes, about
# float32's).
SMALL_HEAD = 16
PRECISE_BOUND_GRAD = False  # True: float32 states and TF32 matmuls where the lower bound's gradient is formed
# Operands and precision of the matmuls between a chunk's own steps (the scores and their gradients): float32
# operands in TF32, since d log λ cancels the score gradients against one another, and bfloat16 operands for the
# forward's scores would double the output's error where the gates forget within a chunk (ops-notes.md). The
# scores kept for the backward are stored in bfloat16 for half-precision inputs: dv reads them only as the
# operand of a bfloat16 matmul.
INTRA_DOT = dict(IDT=tl.float32, IPRECISION="tf32")
# Steps per chunk (LAUNCH["chunk"]): every chunk-parallel matmul has that many rows. Tiles and warps of each
# kernel (a tile is capped by the head size). The chunk-parallel kernels hold several
# [64, 64] float32 tiles, so their warps set how many registers each thread needs and so how many programs
# share an SM. Chosen by timing on an H100 (experiments/kernel_versions.py --variants).
# The chunk states come from one of two paths: with at least ``walk_programs_per_sm`` programs per SM of
# [walk_tile, walk_tile] state tiles, one kernel walks the chunks and forms each chunk's delta on the way
# (``state_walk_kernel``); with fewer (few, long sequences), every chunk's delta is formed at once and an
# elementwise walk follows (``chunk_delta_kernel``, then ``state_scan_kernel``). Since the walk's sums became
# matmuls, one program per SM is enough for it: from 0.9 per SM, 16K tokens at T = 4K (128 programs on an H100's
# 132 SMs) run the walk, 11% faster forward than the deltas path. With ``half_deltas`` that path
# stores the deltas in the states' dtype (bfloat16 for bfloat16 inputs unless the lower bound's gradient is to be
# precise) instead of float32; the walk still sums them in float32. With ``keep_log_forget`` (the default) the gated
# entry keeps the log λ of its forward for the backward instead of forming it again: on an H100 the 374M LM
# (T = 2048, B = 8), with float32 log λ, trained at 148,200 tokens/s in 21.6 GiB with it and at 139,126 in 20.1 GiB
# without (benchmarks/results/ops-notes.md). ``log_forget_dtype`` is the dtype that log λ is stored in for
# half-precision inputs (float32 inputs, and the precise path, always keep float32): "float16" (the default),
# "float32", or "inputs" (the inputs' own half precision). Half the bytes of float32, for the pass that writes it
# and for every kernel that reads it: on an H100 the gated forward + backward at 64K tokens took 4.79 ms with
# bfloat16 log λ against 5.09 with float32. bfloat16's 8 bits of mantissa moved the lower bound's gradient over 16
# chunks to 2.8e-3, past the 2.5e-3 of test_bfloat16_lower_bound_gradient_over_many_chunks; float16's 11 keep every
# error of the gated entry within 5% of float32's (2.33e-3 against 2.24e-3 for d β), and the kernels' floor of
# log λ = -30 lies well inside its range (benchmarks/results/ops-notes.md).
# The walk forms each chunk's running sums of log λ as matmuls with a matrix of ones (``kernel_utils.ones_matmul``)
# for heads of more than SMALL_HEAD channels: each chunk of the walk waits on the one before, so the scans' passes
# between warps were its latency (walks 24% faster on an H100 at 64K tokens, ops-notes.md); small heads, whose tiles
# span few warps, keep the scans. Those matmuls take log λ in as many bfloat16 parts as its dtype needs
# (``kernel_utils.sum_parts``: one for bfloat16, two for float16, three for float32); LAUNCH["walk_sum_parts"] = 3
# takes three whatever the dtype, as the walk did before (the parts past the dtype's are zeros).
LAUNCH = dict(
    chunk=64, delta_bv=128, delta_warps=8, scan_tile=32, scan_warps=2, output_bk=32, output_bv=128, output_warps=8,
    dqk_bk=64, dqk_bv=64, dqk_warps=8, dv_bk=64, dv_bv=128, dv_warps=8, walk_tile=64, walk_warps=4, walk_stages=2,
    walk_programs_per_sm=0.9, half_deltas=False, keep_log_forget=True, log_forget_dtype="float16",
    small_head_chunk=16,
    small_head_warps=1, small_head_walk_warps=1, output_stages=2, dqk_stages=0, dv_stages=0, output_maxnreg=128,
    dqk_maxnreg=0, dv_maxnreg=0, intra_precision="tf32", walk_sum_parts=0,
)  # fmt: skip

__all__ = ["chunk_hgrn2", "chunk_hgrn2_gated"]


def launch_setting(text: str) -> tuple[str, object]:
    """``"key=value"`` as an entry of ``LAUNCH``, the value in the type of that entry's default ("true" or "false"
    for a flag): for command-line overrides of the launch settings. Raises ``ValueError`` naming what is wrong."""
    key, sep, value = text.partition("=")
    if not sep or key not in LAUNCH:
        raise ValueError(f"{text!r}: expected KEY=VALUE with KEY one of {', '.join(LAUNCH)}")
    kind = type(LAUNCH[key])
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise ValueError(f"{text!r}: {key} takes true or false")
        return key, value.lower() == "true"
    try:
        return key, kind(value)
    except ValueError:
        raise ValueError(f"{text!r}: {key} takes values of type {kind.__name__}, such as {LAUNCH[key]!r}") from None


LOG_FORGET_DTYPES = {"float16": torch.float16, "float32": torch.float32, "inputs": None}


def log_forget_storage(name: str, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``LAUNCH["log_forget_dtype"]`` names for half-precision inputs of ``input_dtype``."""
    if name not in LOG_FORGET_DTYPES:
        raise ValueError(
            f"LAUNCH['log_forget_dtype'] = {name!r}: expected one of {', '.join(map(repr, LOG_FORGET_DTYPES))}"
        )
    return LOG_FORGET_DTYPES[name] or input_dtype


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class _Launch:
    """Shapes, chunk layout, tiles and compile-time flags shared by the kernels of one call."""

    def __init__(self, q, v, cu_seqlens, gated, act, lower_bound, precise, reverse=False):
        self.gated = gated  # log λ from the raw projection by hgrn2.ops.gate_pass, then the same kernels
        self.dtype = q.dtype
        self.batch, self.seq_len, self.heads, self.key_dim = q.shape
        self.value_dim = v.shape[-1]
        small = max(self.key_dim, self.value_dim) <= SMALL_HEAD
        self.small_head = small
        self.chunk = LAUNCH["small_head_chunk"] if small else LAUNCH["chunk"]
        self.n_seqs, self.n_chunks, self.chunk_offsets, self.chunk_indices = sequence_layout(
            self.batch, self.seq_len, cu_seqlens, self.chunk
        )
        dummy = unused(q.device, torch.int32)
        self.cu_seqlens = cu_seqlens if cu_seqlens is not None else dummy
        self.chunk_offsets = self.chunk_offsets if self.chunk_offsets is not None else dummy
        self.chunk_indices = self.chunk_indices if self.chunk_indices is not None else dummy
        # K and V tiles: 64 for the chunk-parallel kernels (the output kernel holds up to 128 values), 32 for the
        # elementwise walk over chunks, which runs one program per tile of every (sequence, head)
        self.bk = min(64, _pow2(self.key_dim))
        self.value_tile = {
            name: min(LAUNCH[f"{name}_bv"], _pow2(self.value_dim)) for name in ("delta", "output", "dqk", "dv")
        }
        tile = LAUNCH["scan_tile"]
        self.scan_bk, self.scan_bv = min(tile, _pow2(self.key_dim)), min(tile, _pow2(self.value_dim))
        dot_dtype, precision = dot_config(q.dtype)
        self.flags = dict(
            H=self.heads, K=self.key_dim, V=self.value_dim, C=self.chunk, IS_VARLEN=cu_seqlens is not None,
            FLIP=bool(reverse), DT=dot_dtype, PRECISION=precision,
            INTERPRET=interpreting(),
        )  # fmt: skip
        self.act = act
        self.bound = bound_constants(lower_bound, self.heads, self.key_dim, q.device)
        precise = precise and q.dtype != torch.float32
        self.state_dtype = torch.float32 if precise else state_dtype(q.dtype)
        # matmul settings of the two kernels whose rounding the lower bound's gradient magnifies
        self.precise_flags = dict(DT=tl.float32, PRECISION="tf32") if precise else {}
        half_intra = INTRA_DOT | dict(IPRECISION=LAUNCH["intra_precision"])
        self.intra = half_intra if q.dtype != torch.float32 else dict(IDT=tl.float32, IPRECISION="ieee")
        self.scores_dtype = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
        # the gated entry's log λ: float32 for float32 inputs and the precise path, else LAUNCH["log_forget_dtype"]
        self.log_forget_dtype = torch.float32
        if not precise and q.dtype != torch.float32:
            self.log_forget_dtype = log_forget_storage(LAUNCH["log_forget_dtype"], q.dtype)

    def warps(self, kernel: str) -> int:
        """Warps of a kernel ('walk', or a chunk-parallel 'delta', 'output', 'dqk' or 'dv') for this call's head
        size."""
        if self.small_head:
            return LAUNCH["small_head_walk_warps" if kernel == "walk" else "small_head_warps"]
        return LAUNCH[f"{kernel}_warps"]

    def key_tile(self, kernel: str) -> int:
        """K tile of the output, dqk or dv kernel: ``LAUNCH[f"{kernel}_bk"]``, at most the head's (padded) size."""
        return min(LAUNCH[f"{kernel}_bk"], self.bk)

    def options(self, kernel: str) -> dict:
        """Launch options of the output, dqk or dv kernel: its warps, any register cap and any number of software
        pipeline stages (``LAUNCH[f"{kernel}_stages"]``, 0: Triton's default)."""
        cap, stages = LAUNCH[f"{kernel}_maxnreg"], LAUNCH[f"{kernel}_stages"]
        if self.small_head or self.dtype == torch.float32:  # settings timed on half-precision, larger heads only
            cap, stages = 0, 0
        return (
            dict(num_warps=self.warps(kernel))
            | (dict(maxnreg=cap) if cap else {})
            | (dict(num_stages=stages) if stages else {})
        )

    def deltas(self, q, g, x, scale, backward: bool):
        """Every chunk's Δ ([chunks, H, K, V], float32 or with ``LAUNCH["half_deltas"]`` the states' dtype) and
        decay exp(b_C) (float32 [chunks, H, K])."""
        shape = (self.n_chunks, self.heads, self.key_dim, self.value_dim)
        dtype = self.state_dtype if LAUNCH["half_deltas"] else torch.float32
        delta = torch.empty(shape, dtype=dtype, device=g.device)
        decay = torch.empty(self.n_chunks, self.heads, self.key_dim, dtype=torch.float32, device=g.device)
        bv = self.value_tile["delta"]
        tiles = triton.cdiv(self.key_dim, self.bk) * triton.cdiv(self.value_dim, bv)
        flags = self.flags if backward else self.flags | self.precise_flags  # TF32 deltas: the forward's states
        chunk_delta_kernel[(self.n_chunks * tiles, self.heads)](
            q, g, x, delta, decay, self.cu_seqlens, self.chunk_indices, scale,
            self.seq_len, BK=self.bk, BV=bv, BACKWARD=backward, ACT=self.act, num_warps=self.warps("delta"), **flags,
        )  # fmt: skip
        return delta, decay

    def states(self, q, g, x, scale, s0, out, out_last, backward: bool, store_last: bool):
        """The state entering every chunk and the final state (backwards: the state gradient leaving every chunk
        and the initial state's gradient) into ``out`` and ``out_last``, by one of the two paths of ``LAUNCH``."""
        tile = LAUNCH["walk_tile"]
        bk, bv = min(tile, _pow2(self.key_dim)), min(tile, _pow2(self.value_dim))
        grid = (self.n_seqs * self.heads, triton.cdiv(self.key_dim, bk), triton.cdiv(self.value_dim, bv))
        if grid[0] * grid[1] * grid[2] < LAUNCH["walk_programs_per_sm"] * sm_count(q.device):
            delta, decay = self.deltas(q, g, x, scale, backward)
            self.scan(delta, decay, s0, out, out_last, reverse=backward, store_last=store_last)
            return
        flags = self.flags if backward else self.flags | self.precise_flags
        state_walk_kernel[grid](
            q, g, x, s0 if s0 is not None else unused(q.device), out, out_last, self.cu_seqlens, self.chunk_offsets,
            scale, self.seq_len, BK=bk, BV=bv, HAS_S0=s0 is not None,
            STORE_HT=store_last, BACKWARD=backward, ACT=self.act, STAGES=LAUNCH["walk_stages"],
            SUMS_BY_MATMUL=not self.small_head, SUM_PARTS=max(sum_parts(g.dtype), LAUNCH["walk_sum_parts"]),
            num_warps=self.warps("walk"), **flags,
        )  # fmt: skip

    def scan(self, delta, decay, s0, out, out_last, reverse: bool, store_last: bool):
        """Walk the chunks of every sequence (backwards with ``reverse``), see ``state_scan_kernel``."""
        grid = (
            self.n_seqs * self.heads,
            triton.cdiv(self.key_dim, self.scan_bk),
            triton.cdiv(self.value_dim, self.scan_bv),
        )
        state_scan_kernel[grid](
            delta, decay, s0 if s0 is not None else unused(delta.device), out, out_last, self.cu_seqlens,
            self.chunk_offsets,
            self.seq_len, H=self.heads, K=self.key_dim, V=self.value_dim, C=self.chunk, BK=self.scan_bk,
            BV=self.scan_bv, HAS_S0=s0 is not None, STORE_HT=store_last, REVERSE=reverse,
            IS_VARLEN=self.flags["IS_VARLEN"], num_warps=LAUNCH["scan_warps"],
        )  # fmt: skip


def _forward(q, v, g, launch: _Launch, scale, initial_state, output_final_state, keep_scores):
    L = launch
    h = torch.empty(L.n_chunks + L.n_seqs, L.heads, L.key_dim, L.value_dim, dtype=L.state_dtype, device=q.device)
    final_state = torch.empty(L.n_seqs, L.heads, L.key_dim, L.value_dim, dtype=torch.float32, device=q.device)
    h0 = initial_state.contiguous() if initial_state is not None else None
    o = torch.empty_like(v)
    scores = torch.empty(
        q.shape[0] * q.shape[1] * L.heads * L.chunk if keep_scores else 1, dtype=L.scores_dtype, device=q.device
    )
    L.states(q, g, v, scale, h0, h, final_state, backward=False, store_last=output_final_state)
    bv = L.value_tile["output"]
    grid = (triton.cdiv(L.value_dim, bv) * L.n_chunks, L.heads)
    output_fwd_kernel[grid](
        q, g, v, h, o, scores, L.cu_seqlens, L.chunk_indices, scale, L.seq_len,
        BK=L.key_tile("output"), BV=bv, ACT=L.act, STORE_SCORES=keep_scores, **L.options("output"), **L.flags,
        **L.intra,
    )  # fmt: skip
    return o, h, scores, (final_state if output_final_state else None)


def _backward(q, v, g, h, scores, do, d_final, launch: _Launch, scale, need_d_initial):
    L = launch
    d_states = torch.empty(L.n_chunks, L.heads, L.key_dim, L.value_dim, dtype=h.dtype, device=q.device)
    d_initial = torch.empty(L.n_seqs, L.heads, L.key_dim, L.value_dim, dtype=torch.float32, device=q.device)
    dht = d_final.contiguous() if d_final is not None else None
    L.states(q, g, do, scale, dht, d_states, d_initial, backward=True, store_last=need_d_initial)
    # the gated entry's d log λ stays float32 whatever log λ's dtype: the gate pass sums it into d β
    dq, dv = torch.empty_like(q), torch.empty_like(v)
    dg = torch.empty_like(g, dtype=torch.float32 if L.gated else g.dtype)
    bk = L.key_tile("dqk")
    grid = (triton.cdiv(L.key_dim, bk) * L.n_chunks, L.heads)
    flags = L.flags | L.precise_flags
    dqk_bwd_kernel[grid](
        q, g, v, do, h, d_states, dq, dg, L.cu_seqlens, L.chunk_indices, scale, L.seq_len, BK=bk,
        BV=L.value_tile["dqk"], ACT=L.act, PAIRS=q.dtype == torch.float32,
        **L.options("dqk"), **flags, **L.intra,
    )  # fmt: skip
    bv = L.value_tile["dv"]
    dv_bwd_kernel[(triton.cdiv(L.value_dim, bv) * L.n_chunks, L.heads)](
        g, do, scores, d_states, dv, L.cu_seqlens, L.chunk_indices, scale, L.seq_len,
        BK=L.key_tile("dv"), BV=bv, **L.options("dv"), **_only(L.flags, *_DV_FLAGS),
    )  # fmt: skip
    return dq, dv, dg, (d_initial if need_d_initial else None)


_DV_FLAGS = ("H", "K", "V", "C", "IS_VARLEN", "FLIP", "DT", "PRECISION", "INTERPRET")


def _only(flags: dict, *names: str) -> dict:
    return {name: flags[name] for name in names}


class ChunkHGRN2Function(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels. With ``gated`` the first and third inputs are the raw
    projections (q_proj, forget_proj): the kernels apply the output gate to q_proj, and log λ comes from
    ``hgrn2.ops.gate_pass``."""

    @staticmethod
    def forward(
        ctx, q, v, g, lower_bound, initial_state, scale, output_final_state, cu_seqlens, gated, act, precise, reverse
    ):  # fmt: skip
        q, v, g = q.contiguous(), v.contiguous(), g.contiguous()
        precise = precise and lower_bound is not None and ctx.needs_input_grad[3]
        launch = _Launch(q, v, cu_seqlens, gated, act, lower_bound, precise, reverse)
        keep_scores = any(ctx.needs_input_grad[:5])
        log_lambda = log_forget(g, launch.bound, launch.log_forget_dtype) if gated else g
        o, h, scores, final_state = _forward(
            q, v, log_lambda, launch, scale, initial_state, output_final_state, keep_scores
        )
        # the raw projection, and with LAUNCH["keep_log_forget"] log λ, which the backward otherwise forms again
        kept = log_lambda if gated and LAUNCH["keep_log_forget"] else None
        ctx.save_for_backward(q, v, g, h, scores, kept)
        ctx.launch, ctx.scale = launch, scale
        ctx.lower_bound_shape = None if lower_bound is None else lower_bound.shape
        ctx.lower_bound_dtype = None if lower_bound is None else lower_bound.dtype
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        if final_state is not None:
            return o, final_state
        return o, None

    @staticmethod
    def backward(ctx, do, d_final):
        q, v, g, h, scores, kept = ctx.saved_tensors
        need_d_initial = ctx.needs_input_grad[4]
        launch = ctx.launch
        if kept is not None:
            log_lambda = kept
        else:
            log_lambda = log_forget(g, launch.bound, launch.log_forget_dtype) if launch.gated else g
        dq, dv, dg, d_initial = _backward(
            q, v, log_lambda, h, scores, do.contiguous(), d_final, launch, ctx.scale, need_d_initial
        )
        d_beta = None
        if launch.gated:
            dg, d_beta = gate_grads(g, dg, launch.bound)
        d_lower_bound = None
        if ctx.needs_input_grad[3] and d_beta is not None:
            d_lower_bound = d_beta.sum_to_size(ctx.lower_bound_shape).to(ctx.lower_bound_dtype)
        if d_initial is not None:
            d_initial = d_initial.to(ctx.initial_state_dtype)
        return dq, dv, dg, d_lower_bound, d_initial, None, None, None, None, None, None, None


def chunk_hgrn2(
    q: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 through the chunked Triton kernels; arguments as in :func:`hgrn2.ops.hgrn2_recurrence`
    (``reverse``: each sequence scanned from its last step to its first, read where it lies).

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
        q, v, log_forget, None, initial_state, float(scale), output_final_state, cu_seqlens, False, 0, False,
        bool(reverse),
    )  # fmt: skip


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
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 from the raw projections, gates formed in Triton (the output gate inside the chunk kernels, log λ in
    one elementwise pass before them, and their gradients likewise):
    q = output_gate(q_proj) for 'silu', 'sigmoid' or 'identity' (other activations run unfused) and
    log λ = logaddexp(log β, log1p(-β) + logsigmoid(forget_proj)) with β = ``lower_bound`` (broadcasting to
    ``[H, K]``, values in [0, 1); None means β = 0). Differentiable in q_proj, v, forget_proj, lower_bound and
    initial_state; matches ``hgrn2.ops.gates`` followed by :func:`chunk_hgrn2` (``reverse`` likewise).

    ``precise_bound_grad`` (None: ``PRECISE_BOUND_GRAD``, False by default): True keeps the chunk states in
    float32 and multiplies in TF32 where the lower bound's gradient is formed, when the inputs are half precision
    and that gradient is needed (see the module docstring): that gradient slightly more exact, the states twice the
    memory, about the same time on an H100 (benchmarks/results/ops-notes.md has the measurements).
    """
    check_kernel_dtype(q_proj, v, forget_proj)
    check_lower_bound(lower_bound, q_proj.shape[2], q_proj.shape[3])
    if output_gate not in FUSED_ACTIVATIONS:
        q_proj, output_gate = activation(q_proj, output_gate), "identity"
    return ChunkHGRN2Function.apply(
        q_proj, v, forget_proj, lower_bound, initial_state, float(scale), output_final_state, cu_seqlens, True,
        FUSED_ACTIVATIONS[output_gate], PRECISE_BOUND_GRAD if precise_bound_grad is None else precise_bound_grad,
        bool(reverse),
    )  # fmt: skip

"""Triton building blocks shared by the HGRN2 and HGRN1 kernels: accurate gate math and launch helpers.

The device functions keep every quantity in float32. Three of them exist for accuracy where the obvious
formula cancels or rounds away: ``one_minus_exp`` (the key ``1 - λ`` when λ is within 1e-6 of 1),
``gate_log_forget`` (log λ near λ = 1 from 1 - λ) and ``decay_toward`` (a step of the state, S + (1 - λ)(x - S)).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Output-gate activations the kernels fuse; any other name falls back to the unfused path.
FUSED_ACTIVATIONS = {"identity": 0, "silu": 1, "swish": 1, "sigmoid": 2}


@triton.jit
def fast_log(x):
    """Natural logarithm of float32 x > 0 from the GPU's hardware base-2 logarithm (PTX ``lg2.approx.f32``: one
    special-function instruction, subnormal inputs included, absolute error of a few 1e-7 in log2) times ln 2.
    ``tl.log`` compiles to libdevice's ``logf``, a range reduction and polynomial of about 20 instructions, which
    made the gate pass's log λ, one per element, its largest part. Callers take it where |log x| is not small
    (log λ below log(15/16), where the series of ``gate_log_forget`` does not apply), so that the absolute error is
    a relative one of at most a few 1e-6. The interpreter takes ``tl.log``."""
    if _INTERPRET:
        return tl.log(x)
    else:
        log2 = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        return log2 * 0.6931471805599453


@triton.jit
def one_minus_exp(g):
    """1 - exp(g) for g <= 0; a fifth-order series near 0, where 1 - exp(g) would lose every digit."""
    series = -g * (1.0 + g * (0.5 + g * (1.0 / 6.0 + g * (1.0 / 24.0 + g * (1.0 / 120.0)))))
    return tl.where(g > -0.125, series, 1.0 - tl.exp(g))


@triton.jit
def decay_toward(state, k, x):
    """One step of a decaying state, λ S + (1 - λ) x, for the key ``k`` = 1 - λ (broadcast against S), formed as
    S + k (x - S): λ itself never appears. Rounded to float32, λ within 1e-6 of 1 is off by up to half its spacing,
    3e-8, which is 30% of 1 - λ at 1e-7, and the step-by-step loop repeats that bias at every step the state
    remembers: in a float32 replay of 7,990 steps at 1 - λ ≈ 1.5e-7 a channel of the final state was off by 6.4e-5
    of its norm with λ S + k x and by 8.1e-6 with this form. S is a convex combination of the initial state and
    the inputs, so x - S costs no precision. The backward's d S ← λ d S is d S - k d S for the same reason."""
    return state + k * (x - state)


@triton.jit
def gate_log_forget(f, log_beta, log1m_beta, HAS_BOUND: tl.constexpr):
    """log λ for λ = β + (1 - β) σ(f) (β = 0 without HAS_BOUND); also returns σ(f), σ(-f) and λ, which the
    backward needs. ``log_beta``/``log1m_beta`` (log β with β clamped to the smallest normal float, log(1 - β))
    broadcast against f; pass them per channel, since they are exponentiated where they are.

    σ(±f) and λ are formed in linear space from one exponential, e^-|f|, and log λ with one hardware logarithm
    (``fast_log``): of λ where λ <= 1/2, and of 1 - (1 - β) σ(-f) where λ > 1/2 (a series below 1 - λ = 1/16),
    which keeps λ's distance from 1 to float32's relative precision. A saturated gate beside a lower bound near 1
    puts λ within 1e-9 of 1; the log-space form logaddexp(log β, log1p(-β) + logsigmoid(f)) is off there by
    float32's absolute rounding, ~6e-8, and so was the key 1 - λ (100% at 1 - λ = 6e-10)."""
    e = tl.exp(-tl.abs(f))
    r = 1.0 / (1.0 + e)
    sig = tl.where(f >= 0.0, r, e * r)
    sig_neg = tl.where(f >= 0.0, e * r, r)
    if HAS_BOUND:
        one_m_beta = tl.exp(log1m_beta)
        key = one_m_beta * sig_neg  # 1 - λ
        lam = tl.exp(log_beta) + one_m_beta * sig
    else:
        key = sig_neg
        lam = sig
    series = -key * (
        1.0 + key * (0.5 + key * (1.0 / 3.0 + key * (0.25 + key * (0.2 + key * (1.0 / 6.0 + key * (1.0 / 7.0))))))
    )
    g = tl.where(key < 0.0625, series, fast_log(tl.where(key < 0.5, 1.0 - key, lam)))
    return g, sig, sig_neg, lam


@triton.jit
def gate_log_forget_grads(sig, sig_neg, lam, log1m_beta, inv_beta, HAS_BOUND: tl.constexpr):
    """d log λ / d f and d log λ / d β from :func:`gate_log_forget`'s σ(f), σ(-f) and λ, with torch's convention at
    β = 0 (clamped to the smallest normal float in log β, ``inv_beta`` 0 there): no gradient through log β, only
    through log(1 - β).

    d log λ / d f = (1 - β) σ(f) σ(-f) / λ. d log λ / d β = (1 - σ(f)) / λ = σ(-f) / λ, taken in that form rather
    than as 1/λ - σ(f)/λ (the sum of the two paths), whose terms cancel for saturated gates."""
    if HAS_BOUND:
        inv_lam = 1.0 / lam  # λ >= the clamped β > 0
        w_gate = tl.exp(log1m_beta) * sig * inv_lam  # (1 - β) σ(f) / λ
        d_beta = tl.where(inv_beta > 0.0, sig_neg * inv_lam, -w_gate)  # β = 0 where inv_beta is 0
        return w_gate * sig_neg, d_beta
    return sig_neg, tl.zeros_like(sig_neg)


@triton.jit
def output_gate(p, ACT: tl.constexpr):
    """q = act(p): 0 identity, 1 SiLU, 2 sigmoid."""
    if ACT == 1:
        return p * tl.sigmoid(p)
    elif ACT == 2:
        return tl.sigmoid(p)
    else:
        return p


@triton.jit
def output_gate_grad(p, ACT: tl.constexpr):
    """d act(p) / d p for the activations of ``output_gate``."""
    if ACT == 1:
        s = tl.sigmoid(p)
        return s * (1.0 + p * (1.0 - s))
    elif ACT == 2:
        s = tl.sigmoid(p)
        return s * (1.0 - s)
    else:
        return 1.0 + 0.0 * p


@triton.jit
def matmul(a, b, DT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b with both operands rounded to DT and a float32 result. The interpreter has no bfloat16
    arithmetic, so there the rounded operands are multiplied in float32 (the same products)."""
    if INTERPRET:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32))
    else:
        return tl.dot(a.to(DT), b.to(DT), input_precision=PRECISION)


@triton.jit
def ones_matmul(mask, x, INTERPRET: tl.constexpr, PARTS: tl.constexpr = 3):
    """Σ_s mask[t, s] x_s for a [C, C] mask and float32 x [C, N]: a running sum along the chunk's steps as a matmul
    with a matrix of ones, which bfloat16 holds exactly. x enters as up to three bfloat16 parts: its leading 8 bits
    of mantissa (the low 16 bits of its float32 pattern cleared), the next 8 bits of what is left, and the rest
    rounded to bfloat16, each difference exact in float32, so that each term is off by at most 2^-24 of itself and
    the sums are as close as a float32 scan's (tests/ops/test_kernel_utils.py). A scan along the steps crosses
    warps through shared memory for each column; the matmuls do not. ``PARTS`` (``sum_parts``) is how many of the
    parts x can have: 1 where x holds bfloat16 values (loaded from bfloat16), 2 for float16 values (an 11-bit
    mantissa: the leading 8 bits and the other 3), 3 for any float32; the parts left out would be zeros."""
    ones = tl.where(mask, 1.0, 0.0)
    if PARTS == 1:
        acc = matmul(ones, x, tl.bfloat16, "ieee", INTERPRET)
    else:
        high = (x.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        rest = x - high
        acc = matmul(ones, high, tl.bfloat16, "ieee", INTERPRET)
        if PARTS == 2:
            acc += matmul(ones, rest, tl.bfloat16, "ieee", INTERPRET)
        else:
            middle = (rest.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
            acc += matmul(ones, middle, tl.bfloat16, "ieee", INTERPRET)
            acc += matmul(ones, rest - middle, tl.bfloat16, "ieee", INTERPRET)
    return acc


def sum_parts(dtype: torch.dtype) -> int:
    """The bfloat16 parts (``ones_matmul``'s ``PARTS``) that values loaded from a tensor of ``dtype`` need."""
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 3)


def interpreting() -> bool:
    """Whether Triton runs through its CPU interpreter in this process."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ``interpreting()`` as a constexpr that JIT functions may read (``fast_log``: the interpreter cannot execute inline
# PTX), fixed when this module is imported, as Triton fixes the interpreter when it wraps each kernel.
_INTERPRET = tl.constexpr(interpreting())


def dot_config(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """Matmul operand dtype and precision for an input dtype: float32 stays exact (no TF32); float16 operands
    become bfloat16, whose range holds keys near 1e-6 that float16 would flush to subnormals."""
    if dtype == torch.float32:
        return tl.float32, "ieee"
    return tl.bfloat16, "tf32"


def unused(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new one-element tensor for pointer arguments that the launch's flags leave unread and unwritten. Never
    pass another argument there instead, an output least of all: under ``torch.compile`` each argument a kernel
    may write (every one, where torch cannot analyse the kernel) is copied, the copies are written, and each is
    then taken as its argument's new value in turn, so an output passed twice comes back as whichever copy is
    taken last, possibly one the kernel never wrote. Made for each call, not kept: a tensor kept across calls
    would be a constant of a compiled graph, and one that the kernels may write breaks its compilation."""
    return torch.empty(1, dtype=dtype, device=device)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere, e.g. under the Triton interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the per-chunk states the backward reads: bfloat16 for half inputs, else float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def check_kernel_dtype(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(
                f"the Triton kernels take float16, bfloat16 or float32 inputs, got {t.dtype}; "
                "use backend='torch' (or 'naive') for float64"
            )


def sequence_layout(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None, chunk: int):
    """Chunk bookkeeping for dense or packed sequences.

    Returns ``(n_seqs, n_chunks_total, chunk_offsets, chunk_indices)``: per sequence the index of its first
    chunk (int32 ``[N + 1]``) and per chunk ``(sequence, chunk within sequence)`` (int32 ``[NT, 2]``), both
    None for dense inputs, whose chunks the kernels index arithmetically.
    """
    if cu_seqlens is None:
        return batch, batch * triton.cdiv(seq_len, chunk), None, None
    bounds = cu_seqlens.tolist()
    counts = [triton.cdiv(b - a, chunk) for a, b in zip(bounds, bounds[1:])]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    indices = [(n, c) for n, count in enumerate(counts) for c in range(count)]
    device = cu_seqlens.device
    chunk_offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
    chunk_indices = torch.tensor(indices, dtype=torch.int32, device=device).reshape(-1, 2)
    return len(counts), offsets[-1], chunk_offsets, chunk_indices


TINY = tl.constexpr(1.1754943508222875e-38)  # the smallest normal float32, to which log β clamps β


@triton.jit
def bound_constants_kernel(
    beta_ptr, log_beta_ptr, log1m_beta_ptr, inv_beta_ptr, stride_h, stride_k, H: tl.constexpr, K: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """``bound_constants`` of every (head, channel) into three float32 [H, K] tensors, from β read through its
    strides (a broadcast β has stride 0) in its own dtype. log(1 - β) = log1p(-β) is formed as
    log(u) · (-β) / (u - 1) with u = 1 - β rounded (u = 1: -β), which is as exact as log1p where β is tiny."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = o < H * K
    beta = tl.load(beta_ptr + (o // K) * stride_h + (o % K) * stride_k, mask=mask, other=0.0).to(tl.float32)
    clamped = tl.maximum(beta, TINY)
    u = 1.0 - beta
    log1m = tl.where(u == 1.0, -beta, tl.log(u) * (-beta / tl.where(u == 1.0, -1.0, u - 1.0)))
    tl.store(log_beta_ptr + o, tl.log(clamped), mask=mask)
    tl.store(log1m_beta_ptr + o, log1m, mask=mask)
    tl.store(inv_beta_ptr + o, tl.where(beta >= TINY, 1.0 / clamped, 0.0), mask=mask)


def bound_constants(lower_bound: torch.Tensor | None, heads: int, key_dim: int, device: torch.device):
    """Per-(head, channel) constants of the lower-bounded gate: log β (β clamped to the smallest normal
    float, as the torch gate does), log(1 - β) and 1/β (0 where β was clamped); float32 [H, K] each, from one
    kernel launch (the torch ops they were formed with before took nine, each a launch's host time on every
    call of the gated ops)."""
    if lower_bound is None:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty, empty
    beta = lower_bound.detach().expand(heads, key_dim)  # a view: broadcast dimensions have stride 0
    # three tensors, not views of one: under torch.compile a launch may not pass one storage as two outputs
    out = [torch.empty(heads, key_dim, dtype=torch.float32, device=device) for _ in range(3)]
    block = min(1024, triton.next_power_of_2(heads * key_dim))
    bound_constants_kernel[(triton.cdiv(heads * key_dim, block),)](
        beta, *out, beta.stride(0), beta.stride(1), H=heads, K=key_dim, BLOCK=block
    )
    return tuple(out)


# ------------------------------------------------------------------------------------ device-side addressing


@triton.jit
def sequence_bounds(i_n, T, cu_seqlens, chunk_offsets, C: tl.constexpr, IS_VARLEN: tl.constexpr):
    """First token (int64), length and first global chunk index (int64) of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        length = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        length = T
        first_chunk = i_n.to(tl.int64) * tl.cdiv(T, C)
    return bos, length, first_chunk


@triton.jit
def chunk_bounds(i_c, T, cu_seqlens, chunk_indices, C: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Sequence index, chunk index within it, first token (int64) and length of the sequence of chunk i_c."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c)
        c = tl.load(chunk_indices + 2 * i_c + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        length = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        n_chunks = tl.cdiv(T, C)
        i_n = i_c // n_chunks
        c = i_c % n_chunks
        bos = i_n.to(tl.int64) * T
        length = T
    return i_n, c, bos, length


@triton.jit
def chunk_rows(bos, length, start, o_t, FLIP: tl.constexpr):
    """The tokens of the chunk whose first step is ``start``, in a sequence of ``length`` tokens from token ``bos``,
    as a first token (int64) and each step's offset from it: (bos + start, o_t); with FLIP (the sequence scanned
    from its last token to its first, the ops' ``reverse``) the steps count from the sequence's end,
    (bos + length - 1 - start, -o_t). Steps past the sequence's end are masked by the caller."""
    if FLIP:
        return bos + (length - 1 - start), -o_t
    else:
        return bos + start, o_t


@triton.jit
def load_bound(log_beta_ptr, log1m_beta_ptr, offs, mask, BK: tl.constexpr, HAS_BOUND: tl.constexpr):
    """Two per-channel constants of one head's lower bound (zeros without a lower bound)."""
    if HAS_BOUND:
        log_beta = tl.load(log_beta_ptr + offs, mask=mask, other=0.0)
        log1m_beta = tl.load(log1m_beta_ptr + offs, mask=mask, other=0.0)
    else:
        log_beta = tl.zeros([BK], dtype=tl.float32)
        log1m_beta = tl.zeros([BK], dtype=tl.float32)
    return log_beta, log1m_beta


# log λ is raised to this floor when loaded. The kernels form decays as differences of running sums of log λ,
# b_t - b_s: a gate of -inf (λ = 0, a reset) would make that -inf - (-inf) = NaN, and one of -1e20 would swallow
# its neighbours' gates in float32. e^-30 ≈ 1e-13 is below float32's resolution of any state it scales, and
# running sums near -30 lose no more than those of the gates of e^-30 that the kernels take anyway.
LOG_FORGET_FLOOR = tl.constexpr(-30.0)


@triton.jit
def load_log_forget(ptrs, mask):
    """log λ (float32, 0 where masked), raised to ``LOG_FORGET_FLOOR`` and capped at 0: the public ops reject
    positive values unless told not to check, and the chunk kernels' bounds on their exponents assume none."""
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.minimum(tl.maximum(x, LOG_FORGET_FLOOR), 0.0)


@triton.jit
def log_decay_to_end(g, BY_MATMUL: tl.constexpr = False, INTERPRET: tl.constexpr = False, PARTS: tl.constexpr = 3):
    """Σ_{s > t} g_s for each row t of a chunk's log gates g [C, BK]: the log decay from step t to the chunk's
    end. Formed as a suffix sum, it keeps float32's relative precision where b_C - b_t (a difference of running
    sums) would not: after strong gates |b| reaches hundreds and the difference loses ~|b| · 6e-8 in absolute
    terms, i.e. that much relative error in exp(b_C - b_t) (1e-4 at |b| = 2,000). BY_MATMUL: the same sum as a
    matmul with a matrix of ones (``ones_matmul``, g in ``PARTS`` bfloat16 parts) instead of a scan."""
    if BY_MATMUL:
        o_t = tl.arange(0, g.shape[0])
        return ones_matmul(o_t[:, None] < o_t[None, :], g, INTERPRET, PARTS)
    return tl.cumsum(g, 0, reverse=True) - g


@triton.jit
def running_sum(g, BY_MATMUL: tl.constexpr = False, INTERPRET: tl.constexpr = False, PARTS: tl.constexpr = 3):
    """Σ_{s <= t} g_s for each row t of g [C, BK], by a scan or (BY_MATMUL) a matmul with a matrix of ones (g in
    ``PARTS`` bfloat16 parts)."""
    if BY_MATMUL:
        o_t = tl.arange(0, g.shape[0])
        return ones_matmul(o_t[:, None] >= o_t[None, :], g, INTERPRET, PARTS)
    return tl.cumsum(g, 0)


@triton.jit
def key_to_chunk_end(g, BY_MATMUL: tl.constexpr = False, INTERPRET: tl.constexpr = False, PARTS: tl.constexpr = 3):
    """k_t · exp(b_C - b_t) for a chunk's log gates g [C, BK]: step t's key 1 - λ_t decayed to the chunk's end,
    the weight with which v_t enters the state leaving the chunk (and dS_out reaches dv_t)."""
    return one_minus_exp(g) * tl.exp(log_decay_to_end(g, BY_MATMUL, INTERPRET, PARTS))


@triton.jit
def load_query(ptrs, mask, ACT: tl.constexpr):
    """q (float32, 0 where masked), through the output gate."""
    p = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, output_gate(p, ACT), 0.0)

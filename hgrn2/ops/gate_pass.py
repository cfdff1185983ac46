"""The forget gate of the gated chunked op: one elementwise pass before the chunk kernels and one after.

``chunk_hgrn2_gated`` takes the raw forget projection f and the lower bound β. ``log_forget_kernel`` writes
log λ = log(β + (1 - β) σ(f)) once, formed in float32 (:func:`hgrn2.ops.kernel_utils.gate_log_forget`, exact near
λ = 1) and stored for half-precision inputs in float16 (``hgrn2.ops.chunk.LAUNCH["log_forget_dtype"]``; float32
for float32 inputs and the precise path), and the chunk kernels read it as the plain op reads its log gates
(raised to the floor as they load it). The backward takes the log λ the forward kept
(``LAUNCH["keep_log_forget"]``, the default) or forms it again, runs the chunk kernels, which give d log λ in
float32, and ``gate_grad_kernel`` turns that into the gradients of f and of β.

Forming the gate inside every chunk kernel instead was 13-20% slower on an H100: those kernels hold many
[64, 64] float32 tiles at once and run at the register limit, so the gate's live values cost them more than this
memory-bound pass does (``benchmarks/results/ops-notes.md``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hgrn2.ops.kernel_utils import gate_log_forget, gate_log_forget_grads, load_bound

ROWS, COLUMNS = 32, 128  # tile of (tokens, channels) each program takes


@triton.jit
def gate_tile(
    f_ptr, log_beta_ptr, log1m_beta_ptr, rows, HK: tl.constexpr, HAS_BOUND: tl.constexpr, BR: tl.constexpr,
    BC: tl.constexpr,
):  # fmt: skip
    """This program's [BR tokens, BC channels] tile of f [rows, H·K]: its offsets, mask, channels and log(1 - β),
    and :func:`gate_log_forget` of it (log λ, σ(f), σ(-f), λ)."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = o_c < HK
    mask = (o_r < rows)[:, None] & m_c[None, :]
    offs = o_r.to(tl.int64)[:, None] * HK + o_c[None, :]
    log_beta, log1m_beta = load_bound(log_beta_ptr, log1m_beta_ptr, o_c, m_c, BC, HAS_BOUND)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g, sig, sig_neg, lam = gate_log_forget(f, log_beta[None, :], log1m_beta[None, :], HAS_BOUND)
    return offs, mask, o_c, m_c, log1m_beta, g, sig, sig_neg, lam


@triton.jit
def log_forget_kernel(
    f_ptr, g_ptr, log_beta_ptr, log1m_beta_ptr, rows, HK: tl.constexpr, HAS_BOUND: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """log λ of a tile of f (formed in float32, stored in g's dtype)."""
    offs, mask, _, _, _, g, _, _, _ = gate_tile(f_ptr, log_beta_ptr, log1m_beta_ptr, rows, HK, HAS_BOUND, BR, BC)
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gate_grad_kernel(
    f_ptr, dg_ptr, df_ptr, dbeta_ptr, log_beta_ptr, log1m_beta_ptr, inv_beta_ptr, rows, HK: tl.constexpr,
    HAS_BOUND: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """d f = d log λ · d log λ / d f, and this tile's share of d β = Σ_t d log λ_t · d log λ_t / d β."""
    offs, mask, o_c, m_c, log1m_beta, _, sig, sig_neg, lam = gate_tile(
        f_ptr, log_beta_ptr, log1m_beta_ptr, rows, HK, HAS_BOUND, BR, BC
    )
    inv_beta, _ = load_bound(inv_beta_ptr, inv_beta_ptr, o_c, m_c, BC, HAS_BOUND)
    dg = tl.load(dg_ptr + offs, mask=mask, other=0.0)
    d_f, d_beta = gate_log_forget_grads(sig, sig_neg, lam, log1m_beta[None, :], inv_beta[None, :], HAS_BOUND)
    tl.store(df_ptr + offs, (dg * d_f).to(df_ptr.dtype.element_ty), mask=mask)
    if HAS_BOUND:
        share = tl.sum(tl.where(mask, dg * d_beta, 0.0), 0)
        tl.store(dbeta_ptr + tl.program_id(0).to(tl.int64) * HK + o_c, share, mask=m_c)


def _layout(forget_proj: torch.Tensor, bound: tuple[torch.Tensor, ...]) -> tuple[tuple[int, int], dict]:
    """The grid of both kernels over f [..., H, K], seen as [rows, H·K], and their shared arguments."""
    channels = forget_proj.shape[-2] * forget_proj.shape[-1]
    rows = forget_proj.numel() // channels
    grid = (triton.cdiv(rows, ROWS), triton.cdiv(channels, COLUMNS))
    return grid, dict(rows=rows, HK=channels, HAS_BOUND=bound[0].numel() > 0, BR=ROWS, BC=COLUMNS, num_warps=4)


def log_forget(
    forget_proj: torch.Tensor, bound: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """log λ [..., H, K] in ``dtype`` (the chunked op's ``_Launch.log_forget_dtype``) from the contiguous raw
    projection f and ``bound_constants``' (log β, log(1 - β), 1/β), which are empty without a lower bound."""
    grid, args = _layout(forget_proj, bound)
    g = torch.empty(forget_proj.shape, dtype=dtype, device=forget_proj.device)
    log_forget_kernel[grid](forget_proj, g, bound[0], bound[1], **args)
    return g


def gate_grads(
    forget_proj: torch.Tensor, d_log_forget: torch.Tensor, bound: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradients of f (f's dtype) and of β (float32 [H, K], None without a lower bound) from the float32
    gradient of log λ."""
    grid, args = _layout(forget_proj, bound)
    d_f = torch.empty_like(forget_proj)
    d_beta = torch.empty(grid[0] if args["HAS_BOUND"] else 1, args["HK"], device=forget_proj.device)
    gate_grad_kernel[grid](forget_proj, d_log_forget, d_f, d_beta, bound[0], bound[1], bound[2], **args)
    return d_f, (d_beta.sum(0).view(forget_proj.shape[-2:]) if args["HAS_BOUND"] else None)

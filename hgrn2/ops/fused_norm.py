"""Residual add + RMSNorm in one pass (Triton, forward and backward) and its plain-PyTorch twin.

A pre-norm block computes ``r = x + y`` (the residual stream plus a branch output) and then ``norm(r)``,
which the next projections read in the autocast dtype. Unfused that is an add, an upcast, a square, a mean,
an rsqrt, a product, a downcast and autograd's saved copies of each. Here one program per token reads x and
y once, writes r (float32 residual) and the normalised row (bfloat16 under autocast), and saves only r and
the per-group 1/rms for the backward, which again is one pass.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hgrn2.ops.kernel_utils import unused
from hgrn2.ops.reference import accumulation_dtype, output_dtype

__all__ = ["add_rmsnorm_reference", "fused_add_rmsnorm"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def add_rmsnorm_reference(
    x: torch.Tensor,
    branch: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    *,
    groups: int = 1,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused math: ``r = x + branch``; ``(r / rms(r) · weight).to(out_dtype)`` per group, and r."""
    residual = x if branch is None else x + branch
    acc = accumulation_dtype(residual.dtype)
    r = residual.to(acc).unflatten(-1, (groups, -1))  # [..., G, D / G]
    normed = (r * torch.rsqrt(r.pow(2).mean(dim=-1, keepdim=True) + eps)).flatten(-2)
    if weight is not None:
        normed = normed * weight.to(acc)
    return normed.to(out_dtype or output_dtype(residual.dtype, residual.device)), residual


@triton.jit
def add_rmsnorm_fwd_kernel(
    x_ptr, y_ptr, w_ptr, r_ptr, out_ptr, rstd_ptr, eps: tl.constexpr, G: tl.constexpr, GS: tl.constexpr,
    BG: tl.constexpr, BS: tl.constexpr, HAS_Y: tl.constexpr, HAS_W: tl.constexpr, STORE_RSTD: tl.constexpr,
):  # fmt: skip
    # one program per token: a [groups, group size] tile of its row
    row = tl.program_id(0).to(tl.int64)
    o_g, o_s = tl.arange(0, BG), tl.arange(0, BS)
    mask = (o_g[:, None] < G) & (o_s[None, :] < GS)
    cols = o_g[:, None] * GS + o_s[None, :]
    offs = row * (G * GS) + cols
    r = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        r += tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = r.to(r_ptr.dtype.element_ty)  # normalise the residual as stored, as the unfused norm would
        tl.store(r_ptr + offs, r, mask=mask)
        r = r.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / GS + eps)  # [BG]
    out = r * rstd[:, None]
    if HAS_W:
        out *= tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + row * G + o_g, rstd, mask=o_g < G)


@triton.jit
def add_rmsnorm_bwd_kernel(
    r_ptr, w_ptr, rstd_ptr, dout_ptr, dres_ptr, dx_ptr, dy_ptr, dw_ptr, n_rows, rows_per_program,
    G: tl.constexpr, GS: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, HAS_W: tl.constexpr,
    HAS_DRES: tl.constexpr, HAS_Y: tl.constexpr,
):  # fmt: skip
    # each program walks rows_per_program tokens and keeps its share of d weight in registers
    pid = tl.program_id(0)
    o_g, o_s = tl.arange(0, BG), tl.arange(0, BS)
    mask = (o_g[:, None] < G) & (o_s[None, :] < GS)
    cols = o_g[:, None] * GS + o_s[None, :]
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BG, BS], dtype=tl.float32)
    for i in range(rows_per_program):
        row = pid.to(tl.int64) * rows_per_program + i
        m = mask & (row < n_rows)
        offs = row * (G * GS) + cols
        r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row * G + o_g, mask=(o_g < G) & (row < n_rows), other=0.0)
        xhat = r * rstd[:, None]
        dxhat = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            dw += dxhat * xhat
            dxhat *= w
        dr = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / GS)[:, None])
        if HAS_DRES:
            dr += tl.load(dres_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dr.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_Y:
            tl.store(dy_ptr + offs, dr.to(dy_ptr.dtype.element_ty), mask=m)
    if HAS_W:
        tl.store(dw_ptr + pid.to(tl.int64) * (G * GS) + cols, dw, mask=mask)


def _tiles(dim: int, groups: int) -> dict:
    group_size = dim // groups
    return dict(G=groups, GS=group_size, BG=triton.next_power_of_2(groups), BS=triton.next_power_of_2(group_size))


def _warps(dim: int) -> int:
    return 4 if dim <= 2048 else 8


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, weight, groups, eps, out_dtype):
        dim = x.shape[-1]
        x2 = x.reshape(-1, dim).contiguous()
        y2 = branch.reshape(-1, dim).contiguous() if branch is not None else None
        residual = torch.empty_like(x2, dtype=torch.promote_types(x.dtype, branch.dtype)) if y2 is not None else x2
        normed = torch.empty_like(x2, dtype=out_dtype)
        rstd = torch.empty(x2.shape[0], groups, dtype=torch.float32, device=x.device)
        n_rows = x2.shape[0]
        if n_rows:
            none = unused(x.device)
            add_rmsnorm_fwd_kernel[(n_rows,)](
                x2, y2 if y2 is not None else none, weight if weight is not None else none,
                residual if y2 is not None else none, normed, rstd,
                eps, HAS_Y=y2 is not None, HAS_W=weight is not None, STORE_RSTD=True,
                num_warps=_warps(dim), **_tiles(dim, groups),
            )  # fmt: skip
        ctx.save_for_backward(residual, weight, rstd)
        ctx.groups, ctx.has_branch = groups, branch is not None
        ctx.x_dtype, ctx.branch_dtype = x.dtype, None if branch is None else branch.dtype
        ctx.shape = x.shape
        normed = normed.view(x.shape)
        if branch is None:
            return normed
        return normed, residual.view(x.shape)

    @staticmethod
    def backward(ctx, d_normed, d_residual=None):
        residual, weight, rstd = ctx.saved_tensors
        dim, n_rows = residual.shape[-1], residual.shape[0]
        d_normed = d_normed.reshape(-1, dim).contiguous()
        d_residual = d_residual.reshape(-1, dim).contiguous() if d_residual is not None else None
        dx = torch.empty(n_rows, dim, dtype=ctx.x_dtype, device=residual.device)
        dy = torch.empty(n_rows, dim, dtype=ctx.branch_dtype, device=residual.device) if ctx.has_branch else None
        if weight is None:
            programs = max(n_rows, 1)  # nothing to reduce across rows: one program per token
        elif residual.is_cuda:
            programs = min(n_rows, 4 * torch.cuda.get_device_properties(residual.device).multi_processor_count)
        else:
            programs = min(n_rows, 4)
        programs = max(programs, 1)
        rows_per_program = triton.cdiv(n_rows, programs)
        dw = torch.empty(programs, dim, dtype=torch.float32, device=residual.device) if weight is not None else None
        if n_rows:
            none = unused(dx.device)
            add_rmsnorm_bwd_kernel[(programs,)](
                residual, weight if weight is not None else none, rstd, d_normed,
                d_residual if d_residual is not None else none, dx, dy if dy is not None else none,
                dw if dw is not None else none, n_rows,
                rows_per_program, HAS_W=weight is not None, HAS_DRES=d_residual is not None, HAS_Y=dy is not None,
                num_warps=_warps(dim),
                **_tiles(dim, ctx.groups),
            )  # fmt: skip
        d_weight = dw.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        dx = dx.view(ctx.shape)
        return dx, (dy.view(ctx.shape) if dy is not None else None), d_weight, None, None, None


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch" or x.dtype not in _TRITON_DTYPES:
        return False
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (got one on {x.device}) or TRITON_INTERPRET=1 set before "
            "triton is imported; use backend='torch' on the CPU"
        )
    return x.is_cuda or backend == "triton"


def fused_add_rmsnorm(
    x: torch.Tensor,
    branch: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    *,
    groups: int = 1,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + branch`` and RMSNorm(r) in one kernel; returns ``(normed, r)`` (r is x when branch is None).

    Args:
        x: the residual stream ``[..., D]`` (float16, bfloat16 or float32 for the kernel; float64 runs the
            PyTorch twin). branch: a branch output of the same shape (any float dtype), or None.
        weight: ``[D]`` scale (RMSNorm) or None (the paper's SimpleRMSNorm).
        groups: normalise each of ``groups`` equal slices of D on its own (per-head norm).
        out_dtype: dtype of the normalised output; default the autocast dtype when autocast is on (what the
            next Linear would cast to), else r's dtype. Statistics are always float32 (float64 for float64).
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` (also on the CPU under TRITON_INTERPRET=1) or
            ``"torch"`` (:func:`add_rmsnorm_reference`).

    Example::

        >>> x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
        >>> normed, residual = fused_add_rmsnorm(x, y)
        >>> torch.allclose(residual, x + y)
        True
    """
    dim = x.shape[-1]
    if groups < 1 or dim % groups:
        raise ValueError(f"the last dim ({dim}) must split into groups={groups} equal slices")
    if branch is not None and branch.shape != x.shape:
        raise ValueError(f"branch must have the shape of x {list(x.shape)}, got {list(branch.shape)}")
    if weight is not None and weight.shape != (dim,):
        raise ValueError(f"weight must have shape [D] = [{dim}], got {list(weight.shape)}")
    promoted = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    out_dtype = out_dtype or output_dtype(promoted, x.device)
    if not _use_triton(backend, x) or promoted not in _TRITON_DTYPES:
        return add_rmsnorm_reference(x, branch, weight, groups=groups, eps=eps, out_dtype=out_dtype)
    out = _AddRMSNorm.apply(x, branch, weight, groups, float(eps), out_dtype)
    return (out, x) if branch is None else out

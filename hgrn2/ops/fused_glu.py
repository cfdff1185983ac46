"""The GLU channel mixer ``W_3 (act(W_1 x) ⊙ W_2 x)`` with a recomputed product and one-pass elementwise kernels.

Autograd of the unfused GLU keeps four activations of width G per token (the two projections, the product
that W_3 reads, and the activation's input). Here the forward keeps only ``W_1 x`` and ``W_2 x``: the
backward recomputes the product in the same Triton pass that forms both gate gradients (reads g, u and
d p once, writes d g, d u and p), which saves 2·G bytes per token and layer under bf16 autocast. The matmuls
are cuBLAS; the weights are cast to the compute dtype (the autocast dtype when autocast is on) in the forward
and again in the backward, so no cast copy is kept.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hgrn2.ops.gates import activation
from hgrn2.ops.reference import output_dtype

__all__ = ["FUSED_GLU_ACTIVATIONS", "fused_glu", "glu_reference"]

FUSED_GLU_ACTIVATIONS = {"identity": 0, "silu": 1, "swish": 1, "sigmoid": 2, "relu": 3}
_BLOCK = 1024


def glu_reference(x, gate_weight, up_weight, down_weight, gate_bias=None, up_bias=None, down_bias=None, act="identity"):
    """The unfused GLU (what ``hgrn2.layers.GLU`` computes)."""
    gate = activation(F.linear(x, gate_weight, gate_bias), act)
    return F.linear(gate * F.linear(x, up_weight, up_bias), down_weight, down_bias)


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """act(g) and d act / d g: 0 identity, 1 SiLU, 2 sigmoid, 3 ReLU."""
    if ACT == 1:
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    elif ACT == 2:
        s = tl.sigmoid(g)
        return s, s * (1.0 - s)
    elif ACT == 3:
        return tl.maximum(g, 0.0), tl.where(g > 0.0, 1.0, 0.0)
    else:
        return g, 1.0 + 0.0 * g


@triton.jit
def glu_product_kernel(g_ptr, u_ptr, p_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(p_ptr + offs, (a * u).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def glu_product_bwd_kernel(g_ptr, u_ptr, dp_ptr, dg_ptr, du_ptr, p_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dp = tl.load(dp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(p_ptr + offs, (a * u).to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dp * u * da).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dp * a).to(du_ptr.dtype.element_ty), mask=mask)


def _product(g: torch.Tensor, u: torch.Tensor, act: str, use_triton: bool) -> torch.Tensor:
    if not use_triton:
        return activation(g, act) * u
    p = torch.empty_like(g)
    n = g.numel()
    glu_product_kernel[(triton.cdiv(n, _BLOCK),)](g, u, p, n, ACT=FUSED_GLU_ACTIVATIONS[act], BLOCK=_BLOCK)
    return p


def _product_backward(g, u, dp, act: str, use_triton: bool):
    """(d g, d u, p) for p = act(g) ⊙ u."""
    if not use_triton:
        with torch.enable_grad():
            g_, u_ = g.detach().requires_grad_(), u.detach().requires_grad_()
            p = activation(g_, act) * u_
            dg, du = torch.autograd.grad(p, (g_, u_), dp)
        return dg, du, p.detach()
    p, dg, du = torch.empty_like(g), torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    grid = (triton.cdiv(n, _BLOCK),)
    glu_product_bwd_kernel[grid](g, u, dp, dg, du, p, n, ACT=FUSED_GLU_ACTIVATIONS[act], BLOCK=_BLOCK)
    return dg, du, p


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class _FusedGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, w3, b1, b2, b3, act, use_triton):
        dtype = output_dtype(x.dtype, x.device)
        xc = x.to(dtype)
        g = F.linear(xc, w1.to(dtype), _cast(b1, dtype))  # [..., G]
        u = F.linear(xc, w2.to(dtype), _cast(b2, dtype))  # [..., G]
        out = F.linear(_product(g, u, act, use_triton), w3.to(dtype), _cast(b3, dtype))  # [..., D]
        ctx.save_for_backward(xc, g, u, w1, w2, w3)
        ctx.act, ctx.use_triton, ctx.dtype, ctx.x_dtype = act, use_triton, dtype, x.dtype
        ctx.has_bias = (b1 is not None, b2 is not None, b3 is not None)
        return out

    @staticmethod
    def backward(ctx, d_out):
        xc, g, u, w1, w2, w3 = ctx.saved_tensors
        dtype = ctx.dtype
        w1c, w2c, w3c = w1.to(dtype), w2.to(dtype), w3.to(dtype)
        d_out = d_out.to(dtype).reshape(-1, d_out.shape[-1])  # [N, D]
        x2 = xc.reshape(-1, xc.shape[-1])
        g, u = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])  # [N, G]
        dp = d_out @ w3c
        dg, du, p = _product_backward(g, u, dp, ctx.act, ctx.use_triton)
        d_w3 = (d_out.T @ p).to(w3.dtype)
        d_x = torch.addmm(dg @ w1c, du, w2c).to(ctx.x_dtype).view(xc.shape)
        d_w1, d_w2 = (dg.T @ x2).to(w1.dtype), (du.T @ x2).to(w2.dtype)
        d_b1 = dg.sum(0).to(w1.dtype) if ctx.has_bias[0] else None
        d_b2 = du.sum(0).to(w2.dtype) if ctx.has_bias[1] else None
        d_b3 = d_out.sum(0).to(w3.dtype) if ctx.has_bias[2] else None
        return d_x, d_w1, d_w2, d_w3, d_b1, d_b2, d_b3, None, None


def fused_glu(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    *,
    act: str = "identity",
    backend: str = "auto",
) -> torch.Tensor:
    """``W_3 (act(W_1 x + b_1) ⊙ (W_2 x + b_2)) + b_3`` keeping only the two projections for the backward.

    Args:
        x: ``[..., D]``; gate_weight and up_weight ``[G, D]``; down_weight ``[D, G]``; biases or None.
        act: one of ``FUSED_GLU_ACTIVATIONS`` (the paper's LM uses the identity).
        backend: ``"auto"`` (Triton elementwise kernels on CUDA), ``"triton"`` (also on the CPU under
            TRITON_INTERPRET=1) or ``"torch"`` (the same recomputation with PyTorch elementwise ops).

    Returns ``[..., D]`` in the compute dtype (the autocast dtype under autocast, else x's), like
    :func:`glu_reference`, whose values and gradients it reproduces.
    """
    if act not in FUSED_GLU_ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(FUSED_GLU_ACTIVATIONS)} for the fused GLU, got {act!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    hidden, dim = gate_weight.shape
    if x.shape[-1] != dim or up_weight.shape != (hidden, dim) or down_weight.shape != (dim, hidden):
        raise ValueError(
            f"expected x [..., D], gate/up weights [G, D] and down weight [D, G]; got x {list(x.shape)}, "
            f"{list(gate_weight.shape)}, {list(up_weight.shape)}, {list(down_weight.shape)}"
        )
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1 set before triton is imported")
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda)
    use_triton = use_triton and output_dtype(x.dtype, x.device) != torch.float64
    return _FusedGLU.apply(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, act, use_triton)

"""The fused residual add + RMSNorm kernel (through TRITON_INTERPRET on the CPU) against float64 formulas."""

from __future__ import annotations

import pytest
import torch

from hgrn2.layers import RMSNorm
from hgrn2.ops.fused_norm import add_rmsnorm_reference, fused_add_rmsnorm
from tests.helpers import DEVICE, assert_rel_close


def _float64_norm(r: torch.Tensor, weight: torch.Tensor | None, groups: int, eps: float) -> torch.Tensor:
    """r / sqrt(mean(r²) + eps) per group, times the weight, by hand in float64."""
    r = r.double()
    rows = r.reshape(-1, groups, r.shape[-1] // groups)
    out = (rows / torch.sqrt((rows * rows).sum(-1, keepdim=True) / rows.shape[-1] + eps)).reshape(r.shape)
    return out * weight.double() if weight is not None else out


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("with_branch", [False, True])
def test_values_and_gradients_equal_float64_formula(groups, with_weight, with_branch):
    dim, eps = 48, 1e-6  # group size 12: neither the row nor the groups are powers of two
    x = torch.randn(3, 7, dim, device=DEVICE, requires_grad=True)
    branch = torch.randn(3, 7, dim, device=DEVICE).bfloat16().requires_grad_() if with_branch else None
    weight = (1 + 0.5 * torch.randn(dim, device=DEVICE)).requires_grad_() if with_weight else None
    normed, residual = fused_add_rmsnorm(x, branch, weight, groups=groups, eps=eps, backend="triton")
    assert normed.dtype == torch.float32 and residual.dtype == torch.float32
    d_normed, d_residual = torch.randn_like(normed), torch.randn_like(residual)
    inputs = [t for t in (x, branch, weight) if t is not None]
    loss = (normed * d_normed).sum() + ((residual * d_residual).sum() if with_branch else 0)
    grads = torch.autograd.grad(loss, inputs)

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    x64 = leaves[0]
    b64 = leaves[1] if with_branch else None
    w64 = leaves[-1] if with_weight else None
    r64 = x64 + b64 if with_branch else x64
    expected = _float64_norm(r64, w64, groups, eps)
    assert_rel_close(normed, expected, 1e-6, "normed")
    assert_rel_close(residual, r64, 1e-7, "residual")
    loss64 = (expected * d_normed.double()).sum() + ((r64 * d_residual.double()).sum() if with_branch else 0)
    expected_grads = torch.autograd.grad(loss64, leaves)
    for name, got, want in zip(["d x", "d branch", "d weight"][: len(grads)], grads, expected_grads):
        tol = 1e-2 if got.dtype == torch.bfloat16 else 1e-5
        assert_rel_close(got, want, tol, name)


def test_output_follows_autocast_dtype_and_matches_the_rmsnorm_module():
    x = torch.randn(5, 64, device=DEVICE)
    norm = RMSNorm(64, groups=2, affine=True).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        normed, residual = fused_add_rmsnorm(x, None, norm.weight, groups=2, backend="triton")
    assert normed.dtype == torch.bfloat16 and residual is x
    # the unfused path: the module in float32, then the cast an autocast Linear applies
    assert_rel_close(normed.float(), norm(x).bfloat16().float(), 4e-3, "bf16 normed")


def test_torch_backend_is_the_reference_and_float64_stays_float64():
    x, y = torch.randn(4, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)
    normed, residual = fused_add_rmsnorm(x, y)
    ref, _ = add_rmsnorm_reference(x, y)
    assert normed.dtype == torch.float64 and torch.equal(normed, ref)
    assert_rel_close(normed, _float64_norm(x + y, None, 1, 1e-6), 1e-12, "float64 normed")


def test_bad_arguments_are_named():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="groups=3"):
        fused_add_rmsnorm(x, groups=3)
    with pytest.raises(ValueError, match="branch must have the shape"):
        fused_add_rmsnorm(x, torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"weight must have shape \[D\] = \[10\]"):
        fused_add_rmsnorm(x, weight=torch.ones(4))
    with pytest.raises(ValueError, match="backend must be"):
        fused_add_rmsnorm(x, backend="cuda")

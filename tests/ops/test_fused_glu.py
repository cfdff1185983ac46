"""The fused GLU (recomputed product, Triton elementwise passes through TRITON_INTERPRET) against float64."""

from __future__ import annotations

import pytest
import torch

from hgrn2.layers import GLU
from hgrn2.ops.fused_glu import FUSED_GLU_ACTIVATIONS, fused_glu, glu_reference
from tests.helpers import DEVICE, assert_rel_close


def _weights(dim, hidden, bias):
    shapes = [(hidden, dim), (hidden, dim), (dim, hidden)] + ([(hidden,), (hidden,), (dim,)] if bias else [])
    tensors = [(0.3 * torch.randn(s, device=DEVICE)).requires_grad_() for s in shapes]
    return tensors + [None] * (6 - len(tensors))


@pytest.mark.parametrize("act", ["identity", "silu", "sigmoid", "relu"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_values_and_gradients_equal_float64_unfused_glu(act, backend):
    dim, hidden = 24, 40
    x = torch.randn(2, 5, dim, device=DEVICE, requires_grad=True)
    params = _weights(dim, hidden, bias=act != "identity")
    out = fused_glu(x, *params, act=act, backend=backend)
    d_out = torch.randn_like(out)
    leaves = [x] + [p for p in params if p is not None]
    grads = torch.autograd.grad((out * d_out).sum(), leaves)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    params64 = leaves64[1:] + [None] * (6 - len(leaves64) + 1)
    expected = glu_reference(leaves64[0], *params64, act=act)
    expected_grads = torch.autograd.grad((expected * d_out.double()).sum(), leaves64)
    assert out.dtype == torch.float32
    assert_rel_close(out, expected, 1e-5, "out")
    for i, (got, want) in enumerate(zip(grads, expected_grads)):
        assert_rel_close(got, want, 1e-5, f"grad {i}")


def test_bf16_autocast_matches_the_glu_module_under_autocast():
    module = GLU(32, 64).to(DEVICE)
    x = torch.randn(3, 9, 32, device=DEVICE, requires_grad=True)
    device_type = torch.device(DEVICE).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = fused_glu(x, module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight, backend="triton")
        expected = module(x)
    assert out.dtype == torch.bfloat16 == expected.dtype
    assert_rel_close(out.float(), expected.float(), 1e-2, "bf16 out")
    (out.float() * 2).sum().backward()
    got = module.gate_proj.weight.grad.clone(), x.grad.clone()
    module.zero_grad()
    x.grad = None
    (expected.float() * 2).sum().backward()
    assert module.gate_proj.weight.grad.dtype == torch.float32 == got[0].dtype
    assert_rel_close(got[0], module.gate_proj.weight.grad, 2e-2, "d gate weight")
    assert_rel_close(got[1], x.grad, 2e-2, "d x")


def test_unsupported_activation_and_shapes_raise():
    x, w = torch.randn(2, 8), torch.randn(16, 8)
    assert "gelu" not in FUSED_GLU_ACTIVATIONS
    with pytest.raises(ValueError, match="act must be one of"):
        fused_glu(x, w, w, w.T, act="gelu")
    with pytest.raises(ValueError, match=r"down weight \[D, G\]"):
        fused_glu(x, w, w, w)

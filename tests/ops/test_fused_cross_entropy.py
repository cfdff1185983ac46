"""The Triton linear cross-entropy (through TRITON_INTERPRET on the CPU) against float64 full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hgrn2.ops.fused_cross_entropy import cross_entropy_rows, fused_linear_cross_entropy
from tests.helpers import DEVICE, assert_rel_close


@pytest.mark.parametrize("block_size", [5, 64])
@pytest.mark.parametrize("vocab", [37, 3000])  # one vocabulary tile, and several (2048 wide) with a ragged end
def test_loss_gradients_and_accuracy_equal_float64_full_logits(block_size, vocab):
    hidden = torch.randn(23, 16, device=DEVICE, requires_grad=True)
    weight = (0.5 * torch.randn(vocab, 16, device=DEVICE)).requires_grad_()
    labels = torch.randint(0, vocab, (23,), device=DEVICE)
    labels[[0, 5, 6]] = -100
    loss, correct = fused_linear_cross_entropy(hidden, weight, labels, block_size=block_size, backend="triton")
    grads = torch.autograd.grad(loss * 1.7, (hidden, weight))

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h64 @ w64.T
    expected = F.cross_entropy(logits, labels, ignore_index=-100)
    expected_grads = torch.autograd.grad(expected * 1.7, (h64, w64))
    assert_rel_close(loss, expected, 1e-5, "loss")
    assert_rel_close(grads[0], expected_grads[0], 1e-5, "d hidden")
    assert_rel_close(grads[1], expected_grads[1], 1e-5, "d weight")
    keep = labels != -100
    assert correct.item() == (logits.argmax(-1)[keep] == labels[keep]).sum().item()


def test_rows_kernel_writes_scaled_softmax_minus_onehot_and_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 0.0, 0.0]], device=DEVICE)
    labels = torch.tensor([2, -100, 0], device=DEVICE)
    expected_grad = (logits.double().softmax(-1) - F.one_hot(labels.clamp_min(0), 4)) * 0.25
    expected_grad[1] = 0.0
    expected_loss = torch.logsumexp(logits.double(), -1) - logits.double()[[0, 1, 2], [2, 0, 0]]
    expected_loss[1] = 0.0
    loss, correct = cross_entropy_rows(logits, labels, torch.tensor([0.25], device=DEVICE), -100)
    assert_rel_close(loss, expected_loss, 1e-6, "row losses")
    assert_rel_close(logits, expected_grad, 1e-6, "gradient written over the logits")
    # row 0's maximum 3.0 first appears at column 1, so label 2 is not a correct prediction
    assert correct.tolist() == [0, 0, 1]


def test_without_gradients_gives_the_same_loss_and_all_ignored_gives_zero():
    hidden, weight = torch.randn(10, 8, device=DEVICE), torch.randn(50, 8, device=DEVICE)
    labels = torch.randint(0, 50, (10,), device=DEVICE)
    loss, correct = fused_linear_cross_entropy(hidden, weight, labels, block_size=4, backend="triton")
    assert_rel_close(loss, F.cross_entropy(hidden.double() @ weight.double().T, labels), 1e-5, "loss")
    assert correct.item() == ((hidden @ weight.T).argmax(-1) == labels).sum().item()
    ignored, _ = fused_linear_cross_entropy(hidden, weight, torch.full_like(labels, -100), backend="triton")
    assert ignored.item() == 0.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"labels must be int64 of shape \[N\] = \[4\]"):
        fused_linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend must be"):
        fused_linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.int64), backend="x")

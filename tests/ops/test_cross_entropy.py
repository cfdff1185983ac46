"""The blockwise linear cross-entropy against logits formed in full and torch's cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from hgrn2.ops.cross_entropy import linear_cross_entropy
from tests.helpers import assert_rel_close


@pytest.mark.parametrize("block_size", [3, 7, 64])
def test_loss_gradients_and_accuracy_equal_full_logits(block_size):
    hidden = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (23,))
    labels[[0, 5, 6]] = -100
    loss, correct = linear_cross_entropy(hidden, weight, labels, block_size=block_size)
    (loss * 1.7).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    expected = F.cross_entropy(logits, labels, ignore_index=-100)
    (expected * 1.7).backward()
    assert_rel_close(loss.double(), expected, 1e-6, "loss")
    assert_rel_close(grads[0], hidden.grad, 1e-6, "d hidden")
    assert_rel_close(grads[1], weight.grad, 1e-6, "d weight")
    keep = labels != -100
    assert correct.item() == (logits.argmax(-1)[keep] == labels[keep]).sum().item()


def test_without_grad_gives_the_same_loss():
    hidden, weight = torch.randn(10, 4), torch.randn(6, 4)
    labels = torch.randint(0, 6, (10,))
    loss, _ = linear_cross_entropy(hidden, weight, labels, block_size=4)
    assert_rel_close(loss, F.cross_entropy(hidden @ weight.T, labels), 1e-6, "loss")


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"labels must be int64 of shape \[N\] = \[4\]"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="same D"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 2), torch.zeros(4, dtype=torch.int64))

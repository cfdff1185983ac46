"""Bad input to the public ops raises ValueError naming the tensor, what was expected and what came."""

import pytest
import torch

from hgrn2.ops import hgrn1_recurrence, hgrn2_recurrence


def good_inputs():
    return torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 3), -torch.rand(1, 8, 2, 4)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, v, g: (q[0], v, g), r"q must have shape \[B, T, H, K\]"),
        (lambda q, v, g: (q, v[:, :5], g), r"v must have shape \[B, T, H, V\] = \[1, 8, 2, V\], got \[1, 5, 2, 3\]"),
        (lambda q, v, g: (q, v, g[..., :3]), r"log_forget must have shape .* got \[1, 8, 2, 3\]"),
        (lambda q, v, g: (q, v.double(), g), r"share one dtype"),
        (lambda q, v, g: (q.long(), v, g), r"q must be float16, bfloat16, float32 or float64, got torch.int64"),
        (lambda q, v, g: (q, v, g.abs() + 0.5), r"log_forget .* must be <= 0 .* largest value is"),
    ],
)
def test_hgrn2_rejects_bad_shapes_dtypes_and_gates(mutate, message):
    with pytest.raises(ValueError, match=message):
        hgrn2_recurrence(*mutate(*good_inputs()))


def test_hgrn2_rejects_an_initial_state_of_the_wrong_shape():
    q, v, g = good_inputs()
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, K, V\] = \[1, 2, 4, 3\], got"):
        hgrn2_recurrence(q, v, g, initial_state=torch.zeros(1, 2, 3, 4))


@pytest.mark.parametrize(
    "cu_seqlens, message",
    [
        (torch.tensor([0, 5, 3, 8]), "strictly increasing"),
        (torch.tensor([0, 3, 7]), r"must end at T = 8"),
        (torch.tensor([1, 8]), "must start at 0"),
        (torch.tensor([0.0, 8.0]), "int64"),
    ],
)
def test_hgrn2_rejects_bad_cu_seqlens(cu_seqlens, message):
    with pytest.raises(ValueError, match=message):
        hgrn2_recurrence(*good_inputs(), cu_seqlens=cu_seqlens)


def test_cu_seqlens_needs_batch_one_and_one_state_per_sequence():
    q, v, g = (torch.cat([t, t]) for t in good_inputs())
    with pytest.raises(ValueError, match="batch size must be 1"):
        hgrn2_recurrence(q, v, g, cu_seqlens=torch.tensor([0, 8]))
    q, v, g = good_inputs()
    with pytest.raises(ValueError, match=r"\[N, H, K, V\]"):
        hgrn2_recurrence(q, v, g, cu_seqlens=torch.tensor([0, 3, 8]), initial_state=torch.zeros(1, 2, 4, 3))


def test_unknown_backend_and_triton_without_device_are_explained():
    with pytest.raises(ValueError, match="backend must be one of"):
        hgrn2_recurrence(*good_inputs(), backend="cuda")


def test_hgrn1_rejects_mismatched_gates_and_positive_log_forget():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"log_forget must have shape \[B, T, D\]"):
        hgrn1_recurrence(x, -torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="must be <= 0"):
        hgrn1_recurrence(x, torch.rand(2, 5, 3))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, D\]"):
        hgrn1_recurrence(x, -torch.rand(2, 5, 3), initial_state=torch.zeros(2, 4))

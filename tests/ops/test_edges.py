"""The edges of the gates and of the shapes, on every backend.

λ = 0 (``log_forget = -inf``: a full reset, which users want at document boundaries), λ = 1 (0) and a very
negative finite log λ (-1e20) give the float64 loop's outputs, final states and gradients, with packed
sequences too; NaN or +inf gates are a ValueError; an empty batch, sequence or set of heads gives empty results.
On the CPU the Triton kernels run through the interpreter (tests/conftest.py).
"""

from __future__ import annotations

import decimal
import math
import warnings

import pytest
import torch

from hgrn2.ops import hgrn1_recurrence, hgrn2_gated_recurrence, hgrn2_recurrence, hgrn2_step
from hgrn2.ops.gates import lower_bounded_log_forget
from tests.helpers import DEVICE
from tests.ops.float64_oracle import EDGE_GATES, Case, check_case

pytest.importorskip("hgrn2.ops.chunk")

HGRN2_BACKENDS = ["naive", "torch", "triton", "recurrent"]


def _device(backend: str) -> str:
    return DEVICE if backend in ("triton", "recurrent") else "cpu"


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("edge", list(EDGE_GATES))
@pytest.mark.parametrize("backend", HGRN2_BACKENDS)
def test_hgrn2_at_a_gate_edge_matches_the_float64_loop(backend, edge, packed):
    # the chunked forms: 70 steps, two chunks of the kernels and five of the torch form, so that a reset is carried
    # across chunks; the step-by-step kernels: 20 steps of 4 x 4 states
    steps = backend == "recurrent"
    lengths = ((1, 12, 7) if steps else (1, 50, 19)) if packed else None
    interpreted = backend in ("triton", "recurrent")
    case = Case(
        op="hgrn2", backend=backend, dtype=torch.float32, batch=1 if packed or interpreted else 2,
        seq_len=20 if steps else 70, heads=1 if interpreted else 2, key_dim=4 if steps else 16,
        value_dim=4 if steps else 24, gates=edge, seed=11, lengths=lengths, scale=0.7,
    )  # fmt: skip
    check_case(case, _device(backend))


@pytest.mark.parametrize("edge", list(EDGE_GATES))
@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_hgrn1_at_a_gate_edge_matches_the_float64_loop(backend, edge):
    case = Case(
        op="hgrn1", backend=backend, dtype=torch.float32, batch=1, seq_len=70, heads=1, key_dim=20, value_dim=20,
        gates=edge, seed=12, lengths=(30, 40),
    )  # fmt: skip
    check_case(case, _device(backend))


@pytest.mark.parametrize("bound", [None, "mixed"])
@pytest.mark.parametrize("gates", ["minus_inf", "plus_inf"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gated_entry_with_infinite_forget_projections_matches_the_float64_loop(backend, gates, bound):
    """f = -inf gives λ = β (λ = 0 without a lower bound), f = +inf gives λ = 1; packed sequences."""
    case = Case(
        op="gated", backend=backend, dtype=torch.float32, batch=1, seq_len=40, heads=2, key_dim=16, value_dim=16,
        gates=gates, seed=13, lengths=(25, 15), bound=bound,
    )  # fmt: skip
    check_case(case, _device(backend))


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_decoding_steps_at_a_reset_match_the_float64_loop(backend):
    case = Case(
        op="step", backend=backend, dtype=torch.float32, batch=2, seq_len=6, heads=2, key_dim=16, value_dim=8,
        gates="lambda0", seed=14, scale=0.5,
    )  # fmt: skip
    check_case(case, _device(backend))


# ------------------------------------------------------------------------------------------- bad gates


@pytest.mark.parametrize(
    "value, message",
    [(math.nan, r"1 NaN"), (math.inf, r"1 values above 0 \(the largest value is inf\)"), (0.5, "largest value is 0.5")],
)
def test_nan_and_positive_log_forget_are_value_errors_that_name_the_fix(value, message):
    q, v = torch.randn(1, 5, 2, 3), torch.randn(1, 5, 2, 4)
    log_forget = -torch.rand(1, 5, 2, 3)
    log_forget[0, 3, 1, 0] = value
    for call in (
        lambda: hgrn2_recurrence(q, v, log_forget),
        lambda: hgrn1_recurrence(q[..., 0], log_forget[..., 0]),
    ):
        with pytest.raises(ValueError, match=rf"log_forget .* must be <= 0 .* not NaN.*{message}.*logsigmoid"):
            call()


def _check_values_raise_and_change_nothing(backend: str, device: str, seq_len: int) -> None:
    torch.manual_seed(0)
    q, v = torch.randn(1, seq_len, 2, 4, device=device), torch.randn(1, seq_len, 2, 4, device=device)
    log_forget = -torch.rand(1, seq_len, 2, 4, device=device)
    h0 = torch.randn(1, 2, 4, 4, device=device)
    good = hgrn2_recurrence(q, v, log_forget, initial_state=h0, output_final_state=True, backend=backend)
    unchecked = hgrn2_recurrence(
        q, v, log_forget, initial_state=h0, output_final_state=True, backend=backend, check_values=False
    )
    assert all(torch.equal(a, b) for a, b in zip(good, unchecked))
    log_forget[0, seq_len // 2, 0, 0] = 0.25  # a middle step (the only one at T = 1)
    copies = [t.clone() for t in (q, v, log_forget, h0)]
    with pytest.raises(ValueError, match=r"log_forget .* must be <= 0 .*largest value is 0.25"):
        hgrn2_recurrence(q, v, log_forget, initial_state=h0, output_final_state=True, backend=backend)
    with pytest.raises(ValueError, match=r"log_forget .* must be <= 0 .*largest value is 0.25"):
        hgrn1_recurrence(q[..., 0], log_forget[..., 0], backend=backend)
    for before, after in zip(copies, (q, v, log_forget, h0)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", HGRN2_BACKENDS)
def test_the_value_check_raises_on_every_backend_and_changes_no_input(backend):
    """With ``check_values`` a positive log λ is the same ValueError on every backend, though the Triton backends
    check once their kernels are launched; the caller's tensors (the initial state among them) are untouched, and
    good gates give what ``check_values=False`` gives."""
    _check_values_raise_and_change_nothing(backend, _device(backend), 5)


def test_checking_gates_that_require_grad_warns_nothing():
    q, v = torch.randn(1, 6, 2, 3), torch.randn(1, 6, 2, 4)
    log_forget = (-torch.rand(1, 6, 2, 3)).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading a tensor that requires grad back as a number warns
        hgrn2_recurrence(q, v, log_forget, backend="torch")
        hgrn1_recurrence(q[..., 0], log_forget[..., 0], backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("backend, seq_len", [("triton", 1), ("triton", 300), ("recurrent", 40)])
def test_the_value_check_on_a_gpu_after_the_launches(backend, seq_len):
    """The same on a GPU, where the check's device sync follows the launches: one step, the chunked kernels, the
    step-by-step ones."""
    _check_values_raise_and_change_nothing(backend, "cuda", seq_len)


def test_minus_inf_log_forget_passes_the_check_and_check_values_false_skips_it():
    q, v = torch.randn(1, 5, 2, 3), torch.randn(1, 5, 2, 4)
    resets = torch.full((1, 5, 2, 3), -math.inf)
    o, state = hgrn2_recurrence(q, v, resets, output_final_state=True)  # λ = 0 throughout: S_t = v_t
    assert torch.equal(state, v[0, -1][:, None, :].expand(2, 3, 4)[None])
    nan_gates = torch.full_like(resets, math.nan)
    o, _ = hgrn2_recurrence(q, v, nan_gates, check_values=False)  # no check: the caller vouches for the gates
    assert o.shape == v.shape
    h, _ = hgrn1_recurrence(q[..., 0], nan_gates[..., 0], check_values=False)
    assert h.shape == q[..., 0].shape


# ------------------------------------------------------------------------------------------ empty shapes


EMPTY = {"B=0": (0, 5, 2), "T=0": (2, 0, 2), "H=0": (2, 5, 0)}


@pytest.mark.parametrize("shape", list(EMPTY), ids=list(EMPTY))
@pytest.mark.parametrize("backend", ["auto", *HGRN2_BACKENDS])
def test_hgrn2_of_an_empty_batch_sequence_or_head_set_is_empty(backend, shape):
    batch, seq_len, heads = EMPTY[shape]
    device = _device(backend)
    q, v = torch.randn(batch, seq_len, heads, 4, device=device), torch.randn(batch, seq_len, heads, 3, device=device)
    h0 = torch.randn(batch, heads, 4, 3, device=device)
    o, state = hgrn2_recurrence(q, v, -q.abs(), initial_state=h0, output_final_state=True, backend=backend)
    assert o.shape == v.shape and state.shape == h0.shape and state.dtype == torch.float32
    assert torch.equal(state, h0)  # no step taken: the final state is the initial one
    beta = torch.rand(heads, 4, device=device)
    o, state = hgrn2_gated_recurrence(q, v, q, beta, output_final_state=True, backend=backend)
    assert o.shape == v.shape and torch.equal(state, torch.zeros_like(h0))


@pytest.mark.parametrize("shape", ["B=0", "H=0"])
@pytest.mark.parametrize("backend", ["auto", "naive", "triton"])
def test_a_decoding_step_of_an_empty_batch_or_head_set_is_empty(backend, shape):
    batch, _, heads = EMPTY[shape]
    device = _device(backend)
    q, v = torch.randn(batch, heads, 4, device=device), torch.randn(batch, heads, 3, device=device)
    state = torch.zeros(batch, heads, 4, 3, device=device)
    o, new_state = hgrn2_step(q, v, -q.abs(), state, backend=backend)
    assert o.shape == v.shape and new_state.shape == state.shape


@pytest.mark.parametrize("shape", list(EMPTY), ids=list(EMPTY))
@pytest.mark.parametrize("backend", ["auto", "naive", "torch", "triton"])
def test_hgrn1_of_an_empty_batch_sequence_or_channel_set_is_empty(backend, shape):
    batch, seq_len, dim = EMPTY[shape]
    device = _device(backend)
    x, h0 = torch.randn(batch, seq_len, dim, device=device), torch.randn(batch, dim, device=device)
    h, state = hgrn1_recurrence(x, -x.abs(), initial_state=h0, output_final_state=True, backend=backend)
    assert h.shape == x.shape and torch.equal(state, h0)


def test_an_empty_sequence_keeps_the_graph_to_the_initial_state():
    h0 = torch.randn(1, 2, 4, 3, requires_grad=True)
    q = torch.randn(1, 0, 2, 4)
    _, state = hgrn2_recurrence(q, torch.randn(1, 0, 2, 3), q, initial_state=h0, output_final_state=True)
    state.sum().backward()
    assert torch.equal(h0.grad, torch.ones_like(h0))


def test_gates_near_one_keep_the_key_to_its_relative_precision():
    """A saturated forget projection beside a lower bound near 1 puts λ within 1e-9 of 1. In float32, log λ and
    the key 1 - λ keep their relative precision (against log(β + (1 - β) σ(f)) in float64), in the torch gate and
    inside the kernels: with one step from a zero state the final state is (1 - λ) v exactly. Through logaddexp
    the key was off by float32's absolute rounding, 100% at 1 - λ = 6e-10."""
    f = torch.tensor([[19.487, 12.0, 5.0, 0.3, -4.0, 30.0]])
    beta = torch.tensor([0.8196, 0.999, 0.999, 0.5, 0.3, 0.0])
    with decimal.localcontext(decimal.Context(prec=50)):  # 50 digits: λ's distance from 1 survives
        exact = torch.tensor(
            [[float((b + (1 - b) / (1 + (-x).exp())).ln()) for x, b in zip(map(_decimal, f[0]), map(_decimal, beta))]],
            dtype=torch.float64,
        )
    log_forget = lower_bounded_log_forget(f, beta)
    assert ((log_forget.double() - exact) / exact).abs().max() < 1e-5
    v = torch.randn(1, 1, 1, 3)
    key = -torch.expm1(exact).reshape(1, 1, 6, 1)
    for backend in ("torch", "triton", "recurrent"):
        # with gradients: the chunked kernels, not the step kernel that short scans without them take
        projections = [x.reshape(1, 1, 1, 6).to(_device(backend)).requires_grad_() for x in (torch.ones(6), f)]
        _, state = hgrn2_gated_recurrence(
            projections[0], v.to(_device(backend)), projections[1], beta.reshape(1, 6).to(_device(backend)),
            output_final_state=True, backend=backend,
        )  # fmt: skip
        expected = key * v.double()
        error = ((state.double().cpu() - expected) / expected).abs().max().item()
        assert error < 1e-5, f"{backend}: final state relative error {error:.2e}"


def _decimal(x: torch.Tensor) -> decimal.Decimal:
    """The float32 value of ``x`` exactly, as a Decimal."""
    return decimal.Decimal(float(x))

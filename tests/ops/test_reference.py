"""The PyTorch recurrences: chunked form vs the step-by-step loop, state carry, packing, gradients."""

import pytest
import torch
import torch.nn.functional as F

from hgrn2.ops import hgrn1_recurrence, hgrn2_recurrence, hgrn2_step
from hgrn2.ops.reference import (
    hgrn1_recurrence_chunked,
    hgrn1_recurrence_naive,
    hgrn2_recurrence_chunked,
    hgrn2_recurrence_naive,
)
from tests.helpers import assert_rel_close

F64 = torch.float64


def hgrn2_inputs(batch, seq_len, heads, key_dim, value_dim, dtype=F64, gate_scale=1.0):
    q = torch.randn(batch, seq_len, heads, key_dim, dtype=dtype)
    v = torch.randn(batch, seq_len, heads, value_dim, dtype=dtype)
    log_forget = F.logsigmoid(torch.randn(batch, seq_len, heads, key_dim, dtype=dtype) * gate_scale)
    return q, v, log_forget


def test_naive_matches_a_hand_computed_two_step_example():
    # One head, K = V = 1: S_1 = (1 - λ_1) v_1, S_2 = λ_2 S_1 + (1 - λ_2) v_2, o_t = scale · q_t S_t.
    lam = torch.tensor([0.5, 0.25], dtype=F64)
    q = torch.tensor([2.0, -1.0], dtype=F64).view(1, 2, 1, 1)
    v = torch.tensor([4.0, 8.0], dtype=F64).view(1, 2, 1, 1)
    o, state = hgrn2_recurrence_naive(q, v, lam.log().view(1, 2, 1, 1), scale=0.5, output_final_state=True)
    s1 = 0.5 * 4.0
    s2 = 0.25 * s1 + 0.75 * 8.0
    assert o.flatten().tolist() == pytest.approx([0.5 * 2.0 * s1, 0.5 * -1.0 * s2])
    assert state.item() == pytest.approx(s2)


@pytest.mark.parametrize("chunk_size", [4, 16])
@pytest.mark.parametrize("offset", [-1, 0, 1])
@pytest.mark.parametrize("n_chunks", [1, 3])
def test_chunked_equals_naive_in_float64_around_chunk_boundaries(chunk_size, offset, n_chunks):
    seq_len = max(1, n_chunks * chunk_size + offset)
    q, v, log_forget = hgrn2_inputs(2, seq_len, 3, 5, 7)
    initial_state = torch.randn(2, 3, 5, 7, dtype=F64)
    kwargs = dict(scale=0.7, initial_state=initial_state, output_final_state=True)
    o_ref, s_ref = hgrn2_recurrence_naive(q, v, log_forget, **kwargs)
    o, s = hgrn2_recurrence_chunked(q, v, log_forget, chunk_size=chunk_size, **kwargs)
    assert_rel_close(o, o_ref, 1e-10, "o")
    assert_rel_close(s, s_ref, 1e-10, "final_state")


def test_chunked_equals_naive_for_a_single_step():
    q, v, log_forget = hgrn2_inputs(1, 1, 2, 3, 4)
    o_ref, s_ref = hgrn2_recurrence_naive(q, v, log_forget, output_final_state=True)
    o, s = hgrn2_recurrence_chunked(q, v, log_forget, output_final_state=True)
    assert_rel_close(o, o_ref, 1e-12, "o")
    assert_rel_close(s, s_ref, 1e-12, "final_state")


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_two_calls_with_carried_state_equal_one_call_on_the_concatenation(backend):
    q, v, log_forget = hgrn2_inputs(2, 37, 2, 4, 6)
    o_full, s_full = hgrn2_recurrence(q, v, log_forget, output_final_state=True, backend=backend)
    o1, s1 = hgrn2_recurrence(q[:, :20], v[:, :20], log_forget[:, :20], output_final_state=True, backend=backend)
    o2, s2 = hgrn2_recurrence(
        q[:, 20:], v[:, 20:], log_forget[:, 20:], initial_state=s1, output_final_state=True, backend=backend
    )
    assert_rel_close(torch.cat([o1, o2], dim=1), o_full, 1e-10, "o")
    assert_rel_close(s2, s_full, 1e-10, "final_state")


def test_decoding_step_by_step_equals_the_parallel_form():
    q, v, log_forget = hgrn2_inputs(3, 19, 2, 4, 5)
    o_par, s_par = hgrn2_recurrence(q, v, log_forget, scale=1.3, output_final_state=True, backend="torch")
    state = torch.zeros(3, 2, 4, 5, dtype=F64)
    outputs = []
    for t in range(19):
        o_t, state = hgrn2_step(q[:, t], v[:, t], log_forget[:, t], state, scale=1.3)
        outputs.append(o_t)
    assert_rel_close(torch.stack(outputs, dim=1), o_par, 1e-10, "o")
    assert_rel_close(state, s_par, 1e-10, "state")


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_packed_sequences_equal_running_each_sequence_alone(backend):
    lengths = [5, 1, 23, 16]
    q, v, log_forget = hgrn2_inputs(1, sum(lengths), 2, 3, 4)
    initial_state = torch.randn(len(lengths), 2, 3, 4, dtype=F64)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    o, s = hgrn2_recurrence(
        q, v, log_forget, initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend
    )
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        o_n, s_n = hgrn2_recurrence_naive(
            q[:, start:end],
            v[:, start:end],
            log_forget[:, start:end],
            initial_state=initial_state[n : n + 1],
            output_final_state=True,
        )
        assert_rel_close(o[:, start:end], o_n, 1e-10, f"o of sequence {n}")
        assert_rel_close(s[n : n + 1], s_n, 1e-10, f"final state of sequence {n}")


def test_chunked_gradients_pass_gradcheck_including_initial_state():
    q, v, log_forget = hgrn2_inputs(1, 6, 2, 2, 3)
    initial_state = torch.randn(1, 2, 2, 3, dtype=F64)
    inputs = [t.requires_grad_() for t in (q, v, log_forget, initial_state)]

    def fn(q, v, log_forget, h0):
        o, s = hgrn2_recurrence_chunked(q, v, log_forget, initial_state=h0, output_final_state=True, chunk_size=4)
        return o, s

    assert torch.autograd.gradcheck(fn, inputs)


def test_chunked_gradients_equal_naive_gradients():
    q, v, log_forget = hgrn2_inputs(2, 21, 2, 3, 4)
    initial_state = torch.randn(2, 2, 3, 4, dtype=F64)
    grads = []
    for fn in (hgrn2_recurrence_naive, hgrn2_recurrence_chunked):
        leaves = [t.clone().requires_grad_() for t in (q, v, log_forget, initial_state)]
        o, s = fn(*leaves[:3], initial_state=leaves[3], output_final_state=True)
        (o.square().sum() + s.sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, g_chunk, g_naive in zip(("q", "v", "log_forget", "initial_state"), grads[1], grads[0]):
        assert_rel_close(g_chunk, g_naive, 1e-10, f"d{name}")


@pytest.mark.parametrize("log_forget_value", [-30.0, -1e-6])
def test_extreme_gates_stay_finite_and_exact_in_float32(log_forget_value):
    q, v, _ = hgrn2_inputs(1, 300, 2, 8, 8, dtype=torch.float32)
    log_forget = torch.full_like(q, log_forget_value)
    log_forget[:, ::7] = -30.0  # mix near-zero and near-one forget gates
    o, s = hgrn2_recurrence_chunked(q, v, log_forget, output_final_state=True, chunk_size=64)
    o_ref, s_ref = hgrn2_recurrence_naive(q.double(), v.double(), log_forget.double(), output_final_state=True)
    assert_rel_close(o, o_ref.float(), 1e-5, "o")
    assert_rel_close(s, s_ref, 1e-5, "final_state")


def test_low_precision_inputs_return_input_dtype_and_fp32_state():
    q, v, log_forget = (t.bfloat16() for t in hgrn2_inputs(1, 10, 2, 4, 4))
    o, s = hgrn2_recurrence(q, v, log_forget, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


# --------------------------------------------------------------------------------------------- HGRN1


@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 50])
def test_hgrn1_chunked_equals_naive_in_float64(seq_len):
    x = torch.randn(2, seq_len, 9, dtype=F64)
    log_forget = -30 * torch.rand(2, seq_len, 9, dtype=F64)
    initial_state = torch.randn(2, 9, dtype=F64)
    kwargs = dict(initial_state=initial_state, output_final_state=True)
    h_ref, s_ref = hgrn1_recurrence_naive(x, log_forget, **kwargs)
    h, s = hgrn1_recurrence_chunked(x, log_forget, **kwargs)
    assert_rel_close(h, h_ref, 1e-10, "h")
    assert_rel_close(s, s_ref, 1e-10, "final_state")


def test_hgrn1_matches_a_hand_computed_example():
    x = torch.tensor([[[1.0], [3.0]]], dtype=F64)
    lam = torch.tensor([[[0.9], [0.5]]], dtype=F64)
    h, state = hgrn1_recurrence(x, lam.log(), initial_state=torch.tensor([[2.0]], dtype=F64), output_final_state=True)
    h1 = 0.9 * 2.0 + 0.1 * 1.0
    h2 = 0.5 * h1 + 0.5 * 3.0
    assert h.flatten().tolist() == pytest.approx([h1, h2])
    assert state.item() == pytest.approx(h2)


def test_hgrn2_with_unit_heads_and_unit_query_is_hgrn1():
    x = torch.randn(2, 33, 6, dtype=F64)
    log_forget = F.logsigmoid(torch.randn(2, 33, 6, dtype=F64))
    h, s = hgrn1_recurrence(x, log_forget, output_final_state=True)
    # D channels as D heads of K = V = 1 with q = 1.
    o, state = hgrn2_recurrence(
        torch.ones(2, 33, 6, 1, dtype=F64), x[..., None], log_forget[..., None], output_final_state=True
    )
    assert_rel_close(o[..., 0], h, 1e-10, "h")
    assert_rel_close(state[..., 0, 0], s, 1e-10, "final_state")


def test_hgrn1_packed_sequences_and_gradcheck():
    x = torch.randn(1, 13, 4, dtype=F64)
    log_forget = F.logsigmoid(torch.randn(1, 13, 4, dtype=F64))
    h0 = torch.randn(3, 4, dtype=F64)
    cu_seqlens = torch.tensor([0, 3, 11, 13])
    h, s = hgrn1_recurrence(x, log_forget, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    for n, (start, end) in enumerate(zip([0, 3, 11], [3, 11, 13])):
        h_n, s_n = hgrn1_recurrence_naive(
            x[:, start:end], log_forget[:, start:end], initial_state=h0[n : n + 1], output_final_state=True
        )
        assert_rel_close(h[:, start:end], h_n, 1e-10, f"h of sequence {n}")
        assert_rel_close(s[n : n + 1], s_n, 1e-10, f"state of sequence {n}")
    leaves = [t.clone().requires_grad_() for t in (x[:, :7], log_forget[:, :7], h0[:1])]
    assert torch.autograd.gradcheck(
        lambda x, g, h0: hgrn1_recurrence_chunked(x, g, initial_state=h0, output_final_state=True, chunk_size=4),
        leaves,
    )

"""The step-by-step small-state Triton kernels against the float64 step-by-step reference, forward and every
gradient; and the ``"recurrent"`` backend that runs them.

On the CPU the kernels run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hgrn2.ops import hgrn1_recurrence, hgrn2_gated_recurrence, hgrn2_recurrence
from hgrn2.ops.gates import activation, lower_bounded_log_forget
from hgrn2.ops.reference import hgrn1_recurrence_naive, hgrn2_recurrence_naive
from tests.helpers import (
    DEVICE,
    TOL,
    assert_rel_close,
    check_against_float64,
    check_hgrn2_kernel,
    gated_kernel_leaves,
    kernel_leaf,
    recurrence_leaves,
)

small_state = pytest.importorskip("hgrn2.ops.small_state")
recurrent = pytest.importorskip("hgrn2.ops.recurrent")


@pytest.mark.parametrize(
    "batch, seq_len, heads, key_dim, value_dim, with_state",
    [
        (2, 1, 3, 2, 2, True),  # a single step; expand ratio 2
        (2, 14, 96, 2, 2, True),  # an image row scan: many heads, several programs of heads per sequence
        (1, 23, 5, 4, 4, False),  # 5 heads in blocks of 4 or more: a partly masked head block
        (1, 9, 2, 3, 6, True),  # K != V, neither a power of two
        (1, 6, 2, 1, 1, True),  # expand ratio 1
        (1, 5, 2, 32, 32, True),  # the largest state the kernels take
    ],
)
def test_small_state_matches_naive_in_float32(batch, seq_len, heads, key_dim, value_dim, with_state):
    q = kernel_leaf(torch.randn(batch, seq_len, heads, key_dim), torch.float32)
    v = kernel_leaf(torch.randn(batch, seq_len, heads, value_dim), torch.float32)
    log_forget = kernel_leaf(F.logsigmoid(2 * torch.randn(batch, seq_len, heads, key_dim)), torch.float32)
    h0 = kernel_leaf(torch.randn(batch, heads, key_dim, value_dim), torch.float32) if with_state else None
    check_hgrn2_kernel(
        small_state.small_state_hgrn2, q, v, log_forget, scale=0.7, initial_state=h0, tol=TOL[torch.float32]
    )


@pytest.mark.parametrize(
    "steps_per_load, prefetch", [(1, 0), (16, 0), (1, 1), (1, 2)]
)  # 16: blocks of steps walked from registers, partly masked; prefetch: each step's inputs loaded 1 or 2 steps ahead
def test_small_state_matches_naive_with_packed_sequences(steps_per_load, prefetch, monkeypatch):
    monkeypatch.setattr(small_state, "STEPS_PER_LOAD", steps_per_load)
    monkeypatch.setattr(small_state, "PREFETCH", prefetch)
    bounds = [0, 1, 15, 40, 44]
    seq_len, heads, key_dim, value_dim = bounds[-1], 3, 4, 4
    cu_seqlens = torch.tensor(bounds, dtype=torch.int64, device=DEVICE)
    q = kernel_leaf(torch.randn(1, seq_len, heads, key_dim), torch.float32)
    v = kernel_leaf(torch.randn(1, seq_len, heads, value_dim), torch.float32)
    log_forget = kernel_leaf(F.logsigmoid(torch.randn(1, seq_len, heads, key_dim)), torch.float32)
    h0 = kernel_leaf(torch.randn(len(bounds) - 1, heads, key_dim, value_dim), torch.float32)
    check_hgrn2_kernel(
        small_state.small_state_hgrn2, q, v, log_forget, initial_state=h0, cu_seqlens=cu_seqlens, tol=TOL[torch.float32]
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_state_matches_naive_in_half_precision(dtype):
    q = kernel_leaf(torch.randn(2, 30, 8, 4), dtype)
    v = kernel_leaf(torch.randn(2, 30, 8, 4), dtype)
    log_forget = kernel_leaf(F.logsigmoid(2 * torch.randn(2, 30, 8, 4)), dtype)
    h0 = kernel_leaf(torch.randn(2, 8, 4, 4), torch.float32)
    check_hgrn2_kernel(small_state.small_state_hgrn2, q, v, log_forget, initial_state=h0, tol=TOL[dtype])


@pytest.mark.parametrize("kind", ["uniform_log", "near_one", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_state_stays_finite_and_exact_with_extreme_gates(kind, dtype):
    shape = (1, 40, 4, 4)
    if kind == "uniform_log":  # log λ anywhere in [-30, 0]
        gates = -30 * torch.rand(shape)
    elif kind == "near_one":  # λ = 1 - 1e-6
        gates = torch.full(shape, math.log1p(-1e-6))
    else:  # half the channels forget almost everything, half almost nothing
        gates = torch.where(torch.arange(4) % 2 == 0, -30.0, math.log1p(-1e-6)).expand(shape).clone()
    q, v = kernel_leaf(torch.randn(shape), dtype), kernel_leaf(torch.randn(shape), dtype)
    h0 = kernel_leaf(torch.randn(1, 4, 4, 4), torch.float32)
    check_hgrn2_kernel(small_state.small_state_hgrn2, q, v, kernel_leaf(gates, dtype), initial_state=h0, tol=TOL[dtype])


def test_step_kernels_keep_a_state_near_one_to_float32_precision_over_hundreds_of_steps():
    """1 - λ around 1e-7, where float32 rounds λ to within 30% of that distance: a state updated as λ S + (1 - λ) v
    repeats the bias at every step (measured here: 4.5e-6 and 4.9e-6 of a channel's final state, 6.0e-6 of its
    initial state's gradient), S + (1 - λ)(v - S) does not (5.6e-7, 1.7e-6)."""
    gen = torch.Generator().manual_seed(1)
    shape = (1, 256, 4, 4)
    log_forget = torch.log1p(-1e-7 * (0.5 + torch.rand(shape, dtype=torch.float64, generator=gen))).float()
    q, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    h0, weights = torch.randn(2, 1, 4, 4, 4, generator=gen)
    h0_ref = h0.double().requires_grad_()
    _, final_ref = hgrn2_recurrence_naive(
        q.double(), v.double(), log_forget.double(), initial_state=h0_ref, output_final_state=True
    )
    (final_ref * weights.double()).sum().backward()

    def worst_channel(actual, expected):  # over the value dimension, relative to each channel's own norm
        return ((actual.detach().cpu().double() - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()

    q, v, log_forget, weights = (t.to(DEVICE) for t in (q, v, log_forget, weights))
    h0 = h0.to(DEVICE).requires_grad_()
    _, final = hgrn2_recurrence(q, v, log_forget, initial_state=h0, output_final_state=True, backend="recurrent")
    (final * weights).sum().backward()
    _, decoded = recurrent.fused_recurrent_hgrn2(q, v, log_forget, initial_state=h0.detach(), output_final_state=True)
    assert worst_channel(final, final_ref.detach()) < 3e-6
    assert worst_channel(h0.grad, h0_ref.grad) < 3e-6
    assert worst_channel(decoded, final_ref.detach()) < 3e-6


@pytest.mark.parametrize(
    "output_gate, bound, dtype, packed, steps_per_load, prefetch",
    [
        ("silu", "mixed", torch.float32, False, 1, 0),  # β = 0 exactly, β in (0, 1) and β = 0.999 in one call
        ("sigmoid", None, torch.float32, True, 1, 0),  # packed sequences
        ("identity", "zeros", torch.float32, False, 1, 0),  # the first layer: β = 0 everywhere
        ("silu", "mixed", torch.bfloat16, True, 16, 0),  # blocks of 16 steps per load
        ("gelu", "mixed", torch.float32, False, 1, 0),  # not fused: the activation runs in torch first
        ("silu", "mixed", torch.float32, True, 1, 2),  # each step's inputs loaded two steps ahead
        ("sigmoid", "mixed", torch.bfloat16, False, 1, 1),  # one step ahead, half precision
    ],
)
def test_gated_step_kernels_match_torch_gates_and_the_float64_loop(
    output_gate, bound, dtype, packed, steps_per_load, prefetch, monkeypatch
):
    """Both gates inside the step kernels, forward and backward, against the gates in float64 PyTorch followed by
    the float64 loop: the output, the final state and the gradients of all five inputs (the lower bound's summed
    over every step of every sequence inside the kernel)."""
    monkeypatch.setattr(small_state, "STEPS_PER_LOAD", steps_per_load)
    monkeypatch.setattr(small_state, "PREFETCH", prefetch)
    bounds = [0, 1, 19, 37, 40] if packed else None
    batch, seq_len, heads, key_dim, value_dim = (1, 40, 6, 4, 4) if packed else (2, 37, 6, 2, 4)
    q_proj, v, forget_proj, lower_bound = gated_kernel_leaves(
        batch, seq_len, heads, key_dim, value_dim, dtype, forget_scale=3
    )
    if bound == "mixed":
        with torch.no_grad():
            lower_bound[1, :1] = 0.999
    elif bound == "zeros":
        lower_bound = kernel_leaf(torch.zeros(heads, key_dim), torch.float32)
    else:
        lower_bound = None
    n_states = batch if bounds is None else len(bounds) - 1
    h0 = kernel_leaf(torch.randn(n_states, heads, key_dim, value_dim), torch.float32)
    cu_seqlens = None if bounds is None else torch.tensor(bounds, device=DEVICE)
    kwargs = dict(output_gate=output_gate, scale=0.5, output_final_state=True)

    def run(q_proj, v, forget_proj, lower_bound, h0):
        return small_state.small_state_hgrn2_gated(
            q_proj, v, forget_proj, lower_bound, initial_state=h0, cu_seqlens=cu_seqlens, **kwargs
        )

    def reference(q_proj, v, forget_proj, lower_bound, h0):
        q, log_forget = activation(q_proj, output_gate), lower_bounded_log_forget(forget_proj, lower_bound)
        cu_cpu = None if cu_seqlens is None else cu_seqlens.cpu()
        return hgrn2_recurrence_naive(
            q, v, log_forget, scale=0.5, initial_state=h0, output_final_state=True, cu_seqlens=cu_cpu
        )

    names = ("dq_proj", "dv", "dforget_proj", "dlower_bound", "dinitial_state")
    check_against_float64(run, reference, [q_proj, v, forget_proj, lower_bound, h0], names, TOL[dtype])


def test_recurrent_backend_fuses_the_gates_and_broadcasts_a_per_channel_lower_bound(monkeypatch):
    """``hgrn2_gated_recurrence(backend="recurrent")`` runs the gated step kernels (no PyTorch gate in between),
    and a lower bound of shape [K], shared by the heads, gets its gradient summed over them."""
    monkeypatch.setattr("hgrn2.ops.activation", None)  # the unfused path would call it
    monkeypatch.setattr("hgrn2.ops.lower_bounded_log_forget", None)
    q_proj, v, forget_proj = (kernel_leaf(torch.randn(2, 9, 3, 2), torch.float32) for _ in range(3))
    beta = kernel_leaf(torch.rand(2), torch.float32)

    def run(q_proj, v, forget_proj, beta):
        o, final = hgrn2_gated_recurrence(
            q_proj, v, forget_proj, beta, output_gate="silu", output_final_state=True, backend="recurrent"
        )
        return o, final

    def reference(q_proj, v, forget_proj, beta):
        q, log_forget = F.silu(q_proj), lower_bounded_log_forget(forget_proj, beta)
        return hgrn2_recurrence_naive(q, v, log_forget, output_final_state=True)

    names = ("dq_proj", "dv", "dforget_proj", "dbeta")
    check_against_float64(run, reference, [q_proj, v, forget_proj, beta], names, TOL[torch.float32])


def test_recurrent_backend_equals_the_chunked_kernels_and_covers_hgrn1():
    q, v = torch.randn(2, 20, 4, 4, device=DEVICE), torch.randn(2, 20, 4, 4, device=DEVICE)
    log_forget = F.logsigmoid(torch.randn(2, 20, 4, 4, device=DEVICE))
    o_steps, s_steps = hgrn2_recurrence(q, v, log_forget, output_final_state=True, backend="recurrent")
    o_chunks, s_chunks = hgrn2_recurrence(q, v, log_forget, output_final_state=True, backend="triton")
    assert_rel_close(o_steps, o_chunks.double(), 1e-5, "o")
    assert_rel_close(s_steps, s_chunks.double(), 1e-5, "final_state")
    x, g = torch.randn(2, 20, 8, device=DEVICE), F.logsigmoid(torch.randn(2, 20, 8, device=DEVICE))
    h, _ = hgrn1_recurrence(x, g, backend="recurrent")
    assert_rel_close(h, hgrn1_recurrence_naive(x.double().cpu(), g.double().cpu())[0], 1e-5, "h")


def test_too_large_a_state_is_refused_with_the_backend_to_use():
    x = torch.randn(1, 4, 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="at most 1024 state elements per head.*backend='triton'"):
        small_state.small_state_hgrn2(x, x, -x.abs())
    with pytest.raises(ValueError, match="float64"):
        small_state.small_state_hgrn2(x.double(), x.double(), -x.abs().double())


def test_auto_picks_the_step_kernels_for_states_of_at_most_four_elements_on_a_gpu():
    from hgrn2.ops import SMALL_STATE, auto_backend

    assert auto_backend(True, seq_len=14, state_elements=2 * 2) == "recurrent"
    assert auto_backend(True, seq_len=14, state_elements=1) == "recurrent"
    assert auto_backend(True, seq_len=2000, state_elements=4 * 4) == "triton"
    assert auto_backend(True, seq_len=14, state_elements=SMALL_STATE + 1) == "triton"
    assert auto_backend(True, seq_len=8, state_elements=None) == "triton"  # HGRN1's scan: no state size
    assert auto_backend(False, seq_len=14, state_elements=4) == "naive"  # the CPU never runs kernels
    assert auto_backend(False, seq_len=100, state_elements=4) == "torch"


def _grid_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """[B, h·W, ...] -> [B·W, h, ...]: each grid's columns as sequences (what columns=W scans in place)."""
    return x.unflatten(1, (x.shape[1] // width, width)).transpose(1, 2).flatten(0, 1)


def _grid_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of :func:`_grid_columns`."""
    return x.unflatten(0, (batch, x.shape[0] // batch)).transpose(1, 2).flatten(1, 2)


@pytest.mark.parametrize(
    "reverse, width, height, steps_per_load, prefetch",
    [
        (True, None, 37, 16, 0),  # reversed, three blocks of 16 steps, the last one partly past the end
        (True, None, 37, 1, 0),
        (False, 5, 19, 16, 0),  # the 5 columns of 19-row grids: sequences with a stride of 5 rows
        (True, 3, 18, 1, 0),  # columns bottom to top
        (True, 1, 7, 1, 0),  # one column: the whole sequence, reversed
        (True, 3, 18, 1, 2),  # columns bottom to top, each step's inputs loaded two steps ahead
        (False, None, 2, 1, 2),  # two steps: the look-ahead runs past both ends
    ],
)
def test_reversed_and_column_scans_read_in_place_what_reordered_copies_give(
    reverse, width, height, steps_per_load, prefetch, monkeypatch
):
    """reverse= and columns= against the float64 loop on explicitly flipped / transposed copies, outputs put back
    where they belong: outputs, final states and every gradient, with an initial state per scanned sequence."""
    monkeypatch.setattr(small_state, "STEPS_PER_LOAD", steps_per_load)
    monkeypatch.setattr(small_state, "PREFETCH", prefetch)
    batch, heads, dim = 2, 3, 4
    seq_len = height * (width or 1)
    n_seqs = batch * (width or 1)
    q, v, log_forget, h0 = recurrence_leaves(batch, seq_len, heads, dim, n_seqs)

    def run(q, v, log_forget, h0):
        return small_state.small_state_hgrn2(
            q, v, log_forget, scale=0.6, initial_state=h0, output_final_state=True, reverse=reverse, columns=width
        )

    def reference(q, v, log_forget, h0):
        def order(x):
            x = _grid_columns(x, width) if width else x
            return x.flip(1) if reverse else x

        o, final = hgrn2_recurrence_naive(
            *(order(x) for x in (q, v, log_forget)), scale=0.6, initial_state=h0, output_final_state=True
        )
        o = o.flip(1) if reverse else o
        return (_grid_rows(o, batch) if width else o), final

    check_against_float64(
        run, reference, [q, v, log_forget, h0], ["dq", "dv", "dlog_forget", "dh0"], TOL[torch.float32]
    )


def test_column_scans_refuse_packed_sequences_and_grids_that_do_not_divide():
    x = torch.randn(1, 12, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="columns=5 must be a positive divisor of the sequence length T = 12"):
        small_state.small_state_hgrn2(x, x, -x.abs(), columns=5)
    cu_seqlens = torch.tensor([0, 6, 12], device=DEVICE)
    with pytest.raises(ValueError, match="takes no cu_seqlens"):
        small_state.small_state_hgrn2(x, x, -x.abs(), columns=3, cu_seqlens=cu_seqlens)

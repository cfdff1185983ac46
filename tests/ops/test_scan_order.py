"""``reverse`` and ``columns`` of the public HGRN2 ops on every backend, against the float64 loop run on explicitly
reordered copies (flipped along T; a grid's columns as sequences), the outputs put back in place.

The step-by-step kernels read these orders where the data lie, the chunked kernels a reversed one; the other
backends scan reordered copies.
On the CPU the kernels run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

from hgrn2.ops import hgrn2_gated_recurrence, hgrn2_recurrence, triton_available
from hgrn2.ops.gates import activation, lower_bounded_log_forget
from hgrn2.ops.reference import hgrn2_recurrence_naive
from tests.helpers import DEVICE, TOL, check_against_float64, kernel_leaf, recurrence_leaves, reversed_within

BACKENDS = ["naive", "torch", "triton", "recurrent"]
ORDERS = [(True, None), (False, 4), (True, 4)]  # reversed; down the columns; up the columns


def _backend_or_skip(backend: str) -> str:
    if backend in ("triton", "recurrent") and not triton_available(torch.device(DEVICE)):
        pytest.skip("needs triton (TRITON_INTERPRET=1 runs its kernels on the CPU)")
    return backend


def _reordered(x: torch.Tensor, reverse: bool, columns: int | None) -> torch.Tensor:
    if columns is not None:  # [B, h·W, ...] -> [B·W, h, ...]
        x = x.unflatten(1, (x.shape[1] // columns, columns)).transpose(1, 2).flatten(0, 1)
    return x.flip(1) if reverse else x


def _in_place(o: torch.Tensor, batch: int, reverse: bool, columns: int | None) -> torch.Tensor:
    o = o.flip(1) if reverse else o
    if columns is not None:
        o = o.unflatten(0, (batch, columns)).transpose(1, 2).flatten(1, 2)
    return o


@pytest.mark.parametrize("reverse, columns", ORDERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_recurrence_scans_reversed_and_by_columns_on_every_backend(backend, reverse, columns):
    backend = _backend_or_skip(backend)
    batch, height, heads, dim = 2, 5, 2, 2  # a 5 × 4 grid per sequence, or 20 steps reversed
    seq_len = height * 4
    n_states = batch * (columns or 1)
    q, v, log_forget, h0 = recurrence_leaves(batch, seq_len, heads, dim, n_states)

    def run(q, v, log_forget, h0):
        o, final = hgrn2_recurrence(
            q, v, log_forget, scale=0.7, initial_state=h0, output_final_state=True, backend=backend,
            reverse=reverse, columns=columns,
        )  # fmt: skip
        return o, final.float()

    def reference(q, v, log_forget, h0):
        o, final = hgrn2_recurrence_naive(
            *(_reordered(x, reverse, columns) for x in (q, v, log_forget)), scale=0.7, initial_state=h0,
            output_final_state=True,
        )  # fmt: skip
        return _in_place(o, batch, reverse, columns), final

    check_against_float64(
        run, reference, [q, v, log_forget, h0], ["dq", "dv", "dlog_forget", "dh0"], TOL[torch.float32]
    )


@pytest.mark.parametrize("reverse, columns", ORDERS)
@pytest.mark.parametrize("backend", ["torch", "triton", "recurrent"])
def test_gated_recurrence_scans_reversed_and_by_columns(backend, reverse, columns):
    """The gated entry: gates inside the chunked kernels (on copies), computed outside for the others."""
    backend = _backend_or_skip(backend)
    batch, seq_len, heads, dim = 1, 12, 2, 2
    q_proj = kernel_leaf(torch.randn(batch, seq_len, heads, dim), torch.float32)
    v = kernel_leaf(torch.randn(batch, seq_len, heads, dim), torch.float32)
    forget_proj = kernel_leaf(2 * torch.randn(batch, seq_len, heads, dim), torch.float32)
    beta = kernel_leaf(0.9 * torch.rand(heads, dim), torch.float32)

    def run(q_proj, v, forget_proj, beta):
        o, final = hgrn2_gated_recurrence(
            q_proj, v, forget_proj, beta, output_gate="silu", output_final_state=True, backend=backend,
            reverse=reverse, columns=columns,
        )  # fmt: skip
        return o, final.float()

    def reference(q_proj, v, forget_proj, beta):
        q, log_forget = activation(q_proj, "silu"), lower_bounded_log_forget(forget_proj, beta)
        o, final = hgrn2_recurrence_naive(
            *(_reordered(x, reverse, columns) for x in (q, v, log_forget)), output_final_state=True
        )
        return _in_place(o, batch, reverse, columns), final

    check_against_float64(
        run, reference, [q_proj, v, forget_proj, beta], ["dq_proj", "dv", "dforget_proj", "dbeta"], TOL[torch.float32]
    )


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reversed_packed_sequences_are_each_reversed_within_their_own_span(backend, gated):
    """``reverse`` with ``cu_seqlens``: each packed sequence runs from its own last step to its first, from its own
    initial state, as the float64 loop does on each sequence flipped alone. (Flipping the whole packed row instead
    would run sequences into one another wherever their lengths differ.)"""
    backend = _backend_or_skip(backend)
    bounds = [0, 3, 10, 17]
    cu_seqlens = torch.tensor(bounds, device=DEVICE)
    q, v, log_forget, h0 = recurrence_leaves(1, bounds[-1], 2, 3, len(bounds) - 1)

    def run(q, v, log_forget, h0):
        kwargs = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend, reverse=True)
        if gated:
            o, final = hgrn2_gated_recurrence(q, v, log_forget, output_gate="identity", **kwargs)
        else:
            o, final = hgrn2_recurrence(q, v, log_forget, scale=0.7, **kwargs)
        return o, final.float()

    def reference(q, v, log_forget, h0):
        if gated:  # log_forget holds the raw forget projection
            log_forget = lower_bounded_log_forget(log_forget, None)
        o, final = hgrn2_recurrence_naive(
            *(reversed_within(x, bounds) for x in (q, v, log_forget)), scale=1.0 if gated else 0.7,
            initial_state=h0, output_final_state=True, cu_seqlens=torch.tensor(bounds),
        )  # fmt: skip
        return reversed_within(o, bounds), final

    check_against_float64(
        run, reference, [q, v, log_forget, h0], ["dq", "dv", "dlog_forget", "dh0"], TOL[torch.float32]
    )


def test_scan_orders_name_what_is_wrong():
    x = torch.randn(2, 12, 2, 2, device=DEVICE)
    g = -x.abs()
    with pytest.raises(ValueError, match=r"columns=5 must be a positive divisor of the sequence length T = 12"):
        hgrn2_recurrence(x, x, g, columns=5)
    with pytest.raises(ValueError, match=r"columns=0 must be a positive divisor"):
        hgrn2_gated_recurrence(x, x, x, columns=0)
    with pytest.raises(ValueError, match="takes no cu_seqlens"):
        hgrn2_recurrence(x[:1], x[:1], g[:1], columns=3, cu_seqlens=torch.tensor([0, 6, 12], device=DEVICE))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B·W, H, K, V\] .*\[6, 2, 2, 2\]"):
        hgrn2_recurrence(x, x, g, columns=3, initial_state=torch.zeros(2, 2, 2, 2, device=DEVICE))


def test_an_empty_column_scan_ends_in_its_initial_states():
    x = torch.randn(2, 0, 2, 2, device=DEVICE)
    h0 = torch.randn(6, 2, 2, 2, device=DEVICE)
    o, final = hgrn2_recurrence(x, x, x, columns=3, initial_state=h0, output_final_state=True)
    assert o.shape == x.shape and torch.equal(final.float(), h0)


@pytest.mark.parametrize("gated", [False, True])
def test_auto_picks_the_backend_by_the_length_of_each_column_not_of_the_grid(gated, monkeypatch):
    """A 2-D mixer's column scan of a 16 x 16 grid is 256 sequences of 16 steps: on the CPU ``auto`` takes the
    loop for scans that short, as for the rows, and the chunked form only for longer columns."""
    from hgrn2.ops import SHORT_SCAN, reference

    ran = []
    for name in ("hgrn2_recurrence_naive", "hgrn2_recurrence_chunked"):
        original = getattr(reference, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            ran.append((_name, args[0].shape[1]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(reference, name, recording)
    for height in (SHORT_SCAN, 2 * SHORT_SCAN):
        # on the CPU, where auto chooses between the loop and the chunked PyTorch form
        q, v, g = (torch.randn(2, height * SHORT_SCAN, 1, 2) for _ in range(3))
        if gated:
            hgrn2_gated_recurrence(q, v, g, columns=SHORT_SCAN)
        else:
            hgrn2_recurrence(q, v, torch.nn.functional.logsigmoid(g), columns=SHORT_SCAN)
    assert ran == [("hgrn2_recurrence_naive", SHORT_SCAN), ("hgrn2_recurrence_chunked", 2 * SHORT_SCAN)]

"""The HGRN1 Triton scan against the float64 step-by-step reference, forward and every gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hgrn2.ops.reference import hgrn1_recurrence_naive
from tests.helpers import (
    DEVICE,
    TOL,
    assert_rel_close,
    check_against_float64,
    kernel_leaf,
)

scan = pytest.importorskip("hgrn2.ops.scan")


def _check_hgrn1(x, log_forget, *, initial_state=None, cu_seqlens=None, tol):
    cu_cpu = None if cu_seqlens is None else cu_seqlens.cpu()

    def run(x, g, h0):
        return scan.scan_hgrn1(x, g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)

    def reference(x, g, h0):
        return hgrn1_recurrence_naive(x, g, initial_state=h0, output_final_state=True, cu_seqlens=cu_cpu)

    names = ("dx", "dlog_forget", "dinitial_state")
    check_against_float64(run, reference, [x, log_forget, initial_state], names, tol, ("h", "final_state"))


@pytest.mark.parametrize(
    "batch, seq_len, dim, with_state",
    [(2, 1, 16, True), (1, 70, 20, True), (1, 140, 24, False)],  # one step; ragged; several tiles
)
def test_scan_matches_naive_in_float32(batch, seq_len, dim, with_state):
    x = kernel_leaf(torch.randn(batch, seq_len, dim), torch.float32)
    log_forget = kernel_leaf(F.logsigmoid(2 * torch.randn(batch, seq_len, dim)), torch.float32)
    h0 = kernel_leaf(torch.randn(batch, dim), torch.float32) if with_state else None
    _check_hgrn1(x, log_forget, initial_state=h0, tol=TOL[torch.float32])


def test_scan_matches_naive_with_packed_sequences():
    bounds = [0, 1, 65, 150, 160]
    cu_seqlens = torch.tensor(bounds, device=DEVICE)
    x = kernel_leaf(torch.randn(1, bounds[-1], 24), torch.float32)
    log_forget = kernel_leaf(F.logsigmoid(torch.randn(1, bounds[-1], 24)), torch.float32)
    h0 = kernel_leaf(torch.randn(len(bounds) - 1, 24), torch.float32)
    _check_hgrn1(x, log_forget, initial_state=h0, cu_seqlens=cu_seqlens, tol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_matches_naive_in_half_precision(dtype):
    x = kernel_leaf(torch.randn(2, 100, 32), dtype)
    log_forget = kernel_leaf(F.logsigmoid(2 * torch.randn(2, 100, 32)), dtype)
    _check_hgrn1(x, log_forget, initial_state=kernel_leaf(torch.randn(2, 32), torch.float32), tol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_stays_finite_and_exact_with_extreme_gates(dtype):
    # half the channels forget almost everything (log λ = -30), a quarter almost nothing (λ = 1 - 1e-6),
    # the rest anywhere in [-30, 0]
    shape = (1, 150, 32)
    channel = torch.arange(32)
    log_forget = torch.where(channel % 2 == 0, -30.0, math.log1p(-1e-6)).expand(shape).clone()
    log_forget[..., channel % 4 == 3] = -30 * torch.rand(1, 150, 8)
    x = kernel_leaf(torch.randn(shape), dtype)
    _check_hgrn1(
        x, kernel_leaf(log_forget, dtype), initial_state=kernel_leaf(torch.randn(1, 32), torch.float32), tol=TOL[dtype]
    )


def test_hgrn1_recurrence_dispatches_to_the_scan_under_the_triton_backend(monkeypatch):
    from hgrn2.ops import hgrn1_recurrence

    calls = []
    original = scan.scan_hgrn1
    monkeypatch.setattr(scan, "scan_hgrn1", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 40, 16)
    log_forget = F.logsigmoid(torch.randn(2, 40, 16))
    expected, _ = hgrn1_recurrence_naive(x.double(), log_forget.double())
    h, _ = hgrn1_recurrence(x.to(DEVICE), log_forget.to(DEVICE), backend="triton")
    assert calls == [1]
    assert_rel_close(h, expected, 1e-4, "h (triton)")
    h_auto, _ = hgrn1_recurrence(x, log_forget, backend="auto")
    assert calls == [1], "auto must not pick the kernels for CPU tensors"
    assert_rel_close(h_auto, expected, 1e-4, "h (auto)")


def test_scan_rejects_float64():
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        scan.scan_hgrn1(x, -x.abs())

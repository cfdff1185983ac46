"""Device functions of ``hgrn2.ops.kernel_utils`` on their own, against float64.

On the CPU the kernels run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DEVICE

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
kernel_utils = pytest.importorskip("hgrn2.ops.kernel_utils")


@triton.jit
def _running_sums_kernel(x_ptr, out_ptr, C: tl.constexpr, N: tl.constexpr, INTERPRET: tl.constexpr):
    o_t = tl.arange(0, C)
    offs = o_t[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, kernel_utils.running_sum(x, True, INTERPRET))
    tl.store(out_ptr + C * N + offs, kernel_utils.log_decay_to_end(x, True, INTERPRET))


def test_sums_by_matmul_keep_float32_precision():
    """``ones_matmul`` sums along a chunk with bfloat16 matmuls, x split into three bfloat16 parts (here through
    ``running_sum`` and ``log_decay_to_end`` with BY_MATMUL, as the kernels call it): log gates
    spanning eight orders of magnitude (-30 to -1e-6) give running and suffix sums as close to the float64 sums as
    float32 scans of the same values are (within 2x, or 2^-21 of the sums' magnitude), where one bfloat16 part would
    be off by ~2^-9."""
    torch.manual_seed(0)
    chunk, width = 64, 16
    x = -torch.exp(torch.empty(chunk, width).uniform_(-14.0, 3.4))
    out = torch.empty(2, chunk, width)
    x_dev, out_dev = x.to(DEVICE), out.to(DEVICE)
    _running_sums_kernel[(1,)](x_dev, out_dev, chunk, width, kernel_utils.interpreting())
    got = out_dev.cpu().double()
    exact = x.double()
    scale = exact.abs().sum(0)  # every partial sum is at most this in magnitude

    def error(sums, want):
        return ((sums.double() - want).abs() / scale).max().item()

    inclusive, suffix = exact.cumsum(0), exact.flip(0).cumsum(0).flip(0) - exact
    scanned = x.cumsum(0), x.flip(0).cumsum(0).flip(0) - x  # float32 scans
    for ours, scan, want in ((got[0], scanned[0], inclusive), (got[1], scanned[1], suffix)):
        assert error(ours, want) <= max(2 * error(scan, want), 2.0**-21), (error(ours, want), error(scan, want))
    one_part = x.to(torch.bfloat16).double().cumsum(0)  # what one bfloat16 pass would give
    assert error(one_part, inclusive) > 2.0**-12

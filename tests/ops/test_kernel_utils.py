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
def _running_sums_kernel(
    x_ptr, out_ptr, C: tl.constexpr, N: tl.constexpr, INTERPRET: tl.constexpr, PARTS: tl.constexpr = 3
):  # fmt: skip
    o_t = tl.arange(0, C)
    offs = o_t[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + offs).to(tl.float32)
    tl.store(out_ptr + offs, kernel_utils.running_sum(x, True, INTERPRET, PARTS))
    tl.store(out_ptr + C * N + offs, kernel_utils.log_decay_to_end(x, True, INTERPRET, PARTS))


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sums_by_matmul_of_half_precision_values_need_fewer_parts(dtype):
    """Values loaded from bfloat16 are one bfloat16 part, values loaded from float16 (11-bit mantissa) two: the
    running and suffix sums with ``sum_parts(dtype)`` parts equal the three-part sums of the same values bit for
    bit, and one part too few for float16 values moves them."""
    torch.manual_seed(1)
    chunk, width = 64, 16
    x = (-torch.exp(torch.empty(chunk, width).uniform_(-14.0, 3.4))).to(dtype)
    x_dev = x.to(DEVICE)
    sums = {}
    for parts in (1, 2, 3):
        out = torch.empty(2, chunk, width, device=DEVICE)
        _running_sums_kernel[(1,)](x_dev, out, chunk, width, kernel_utils.interpreting(), parts)
        sums[parts] = out.cpu()
    need = kernel_utils.sum_parts(dtype)
    assert need == (1 if dtype == torch.bfloat16 else 2)
    assert torch.equal(sums[need], sums[3])
    if dtype == torch.float16:
        assert not torch.equal(sums[1], sums[3])


@pytest.mark.parametrize(
    "shape, dtype", [((3, 5), torch.float32), ((5,), torch.float32), ((3, 1), torch.float32), ((5,), torch.bfloat16)]
)
def test_bound_constants_match_float64_for_lower_bounds_from_zero_to_near_one(shape, dtype):
    """``bound_constants`` forms log β (β clamped to the smallest normal float), log(1 - β) and 1/β (0 where β
    was clamped) of every (head, channel) in one kernel, from a β broadcast to [H, K] = [3, 5] through its strides:
    against float64, each within float32's rounding, also where log(1 - β) is tiny (β = 1e-30, 1e-9), near the
    end of its range (β = 1 - 2^-20), and at β = 0 and a subnormal β, which clamp (log(1 - β) of a subnormal β may
    come out 0)."""
    values = [0.0, 1e-40, 1e-30, 1e-9, 0.1, 0.5, 0.75, 0.999, 1 - 2.0**-20, 0.3, 0.6, 1e-4, 0.2, 0.9, 0.05]
    values = torch.tensor(values)
    beta = values[: torch.Size(shape).numel()].reshape(shape).to(dtype)
    got = [t.cpu().double() for t in kernel_utils.bound_constants(beta.to(DEVICE), 3, 5, torch.device(DEVICE))]
    exact = beta.double().expand(3, 5)
    tiny = torch.finfo(torch.float32).tiny
    clamped = exact.clamp_min(tiny)
    expected = [clamped.log(), torch.log1p(-exact), torch.where(exact >= tiny, 1 / clamped, torch.zeros_like(exact))]
    for name, g, e in zip(("log β", "log(1 - β)", "1/β"), got, expected):
        assert g.shape == (3, 5), name
        torch.testing.assert_close(g, e, rtol=4e-7, atol=tiny, msg=name)  # a subnormal may flush to 0
    empty = kernel_utils.bound_constants(None, 3, 5, torch.device(DEVICE))
    assert all(t.numel() == 0 for t in empty)


@triton.jit
def _fast_log_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    tl.store(out_ptr + offs, kernel_utils.fast_log(tl.load(x_ptr + offs)))


@pytest.mark.gpu
def test_fast_log_is_within_a_few_1e7_of_float64_log_on_a_gpu():
    """``fast_log`` (the hardware ``lg2.approx.f32`` times ln 2) against float64 log, for x from the smallest
    subnormal float32 to 1, the range of λ: every value within 4e-7 absolute of the float64 log of the same float32
    x, and within 1e-5 relative over (0, 15/16], the values ``gate_log_forget`` takes it for. log 0 is -inf, as
    ``tl.log`` gives."""
    n = 1 << 20
    torch.manual_seed(0)
    x = torch.cat(
        [
            torch.exp2(torch.empty(n - 3).uniform_(-149.0, 0.0)),  # subnormal to 1, every binade alike
            torch.tensor([2.0**-149, 15.0 / 16.0, 1.0]),
        ]
    ).float()
    out = torch.empty_like(x, device="cuda")
    _fast_log_kernel[(x.numel() // 1024,)](x.cuda(), out, 1024)
    got, want = out.cpu().double(), x.double().log()
    assert (got - want).abs().max().item() <= 4e-7
    below = x <= 15.0 / 16.0
    assert ((got - want)[below] / want[below]).abs().max().item() <= 1e-5
    zero = torch.zeros(1024, device="cuda")
    _fast_log_kernel[(1,)](zero, zero, 1024)
    assert torch.isneginf(zero).all()

"""The chunked Triton kernels against the float64 step-by-step reference, forward and every gradient.

On the CPU the kernels run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hgrn2.ops.gates import activation, lower_bounded_log_forget
from hgrn2.ops.reference import hgrn2_recurrence_naive
from tests.helpers import (
    DEVICE,
    TOL,
    assert_rel_close,
    check_against_float64,
    check_hgrn2_kernel,
    chunk_state_path,
    gated_kernel_leaves,
    kernel_leaf,
    relative_error,
    reversed_within,
)

chunk = pytest.importorskip("hgrn2.ops.chunk")


pytestmark = pytest.mark.usefixtures("no_tf32", "state_path")


@pytest.fixture(params=["walk", "deltas"], autouse=False)
def state_path(request):
    """Every test here runs each way of forming the chunk states (``tests.helpers.chunk_state_path``)."""
    with chunk_state_path(request.param):
        yield request.param


@pytest.mark.parametrize(
    "batch, seq_len, heads, key_dim, value_dim, with_state",
    [
        (2, 1, 1, 16, 16, True),  # a single step
        (1, 70, 2, 20, 36, True),  # ragged: one full chunk and 6 steps; K != V, neither a power of two
        (1, 130, 1, 32, 16, False),  # three chunks
    ],
)
def test_chunk_matches_naive_in_float32(batch, seq_len, heads, key_dim, value_dim, with_state):
    q = kernel_leaf(torch.randn(batch, seq_len, heads, key_dim), torch.float32)
    v = kernel_leaf(torch.randn(batch, seq_len, heads, value_dim), torch.float32)
    log_forget = kernel_leaf(F.logsigmoid(2 * torch.randn(batch, seq_len, heads, key_dim)), torch.float32)
    h0 = kernel_leaf(torch.randn(batch, heads, key_dim, value_dim), torch.float32) if with_state else None
    check_hgrn2_kernel(chunk.chunk_hgrn2, q, v, log_forget, scale=0.7, initial_state=h0, tol=TOL[torch.float32])


def test_chunk_matches_naive_with_packed_sequences():
    bounds = [0, 1, 17, 90, 100]  # lengths 1, 16, 73 (two chunks), 10
    seq_len, heads, key_dim, value_dim = bounds[-1], 1, 16, 24
    cu_seqlens = torch.tensor(bounds, dtype=torch.int64, device=DEVICE)
    q = kernel_leaf(torch.randn(1, seq_len, heads, key_dim), torch.float32)
    v = kernel_leaf(torch.randn(1, seq_len, heads, value_dim), torch.float32)
    log_forget = kernel_leaf(F.logsigmoid(torch.randn(1, seq_len, heads, key_dim)), torch.float32)
    h0 = kernel_leaf(torch.randn(len(bounds) - 1, heads, key_dim, value_dim), torch.float32)
    check_hgrn2_kernel(
        chunk.chunk_hgrn2, q, v, log_forget, initial_state=h0, cu_seqlens=cu_seqlens, tol=TOL[torch.float32]
    )


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("key_dim, value_dim", [(20, 36), (4, 4)])  # chunks of 64; a small head's chunks of 16
def test_chunk_reads_a_reversed_order_in_place(key_dim, value_dim, gated):
    """``reverse``: the kernels read each packed sequence from its last step to its first where it lies; against
    the float64 loop on each sequence flipped alone, outputs, final states and every gradient."""
    torch.manual_seed(7)
    bounds = [0, 5, 75, 150]  # lengths 5, 70 (a chunk and 6 steps) and 75
    cu_seqlens = torch.tensor(bounds, device=DEVICE)
    q = kernel_leaf(torch.randn(1, bounds[-1], 2, key_dim), torch.float32)
    v = kernel_leaf(torch.randn(1, bounds[-1], 2, value_dim), torch.float32)
    forget = kernel_leaf(2 * torch.randn(1, bounds[-1], 2, key_dim), torch.float32)
    beta = kernel_leaf(0.9 * torch.rand(2, key_dim), torch.float32) if gated else None
    h0 = kernel_leaf(torch.randn(len(bounds) - 1, 2, key_dim, value_dim), torch.float32)

    def run(q, v, forget, beta, h0):
        kwargs = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, reverse=True)
        if gated:
            return chunk.chunk_hgrn2_gated(q, v, forget, beta, output_gate="silu", scale=0.5, **kwargs)
        return chunk.chunk_hgrn2(q, v, F.logsigmoid(forget), scale=0.5, **kwargs)

    def reference(q, v, forget, beta, h0):
        q = F.silu(q) if gated else q
        log_forget = lower_bounded_log_forget(forget, beta)
        o, final = hgrn2_recurrence_naive(
            *(reversed_within(x, bounds) for x in (q, v, log_forget)), scale=0.5, initial_state=h0,
            output_final_state=True, cu_seqlens=torch.tensor(bounds),
        )  # fmt: skip
        return reversed_within(o, bounds), final

    names = ("dq", "dv", "dforget", "dlower_bound", "dinitial_state")
    check_against_float64(run, reference, [q, v, forget, beta, h0], names, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_matches_naive_in_half_precision(dtype):
    q = kernel_leaf(torch.randn(1, 100, 2, 32), dtype)
    v = kernel_leaf(torch.randn(1, 100, 2, 32), dtype)
    log_forget = kernel_leaf(F.logsigmoid(2 * torch.randn(1, 100, 2, 32)), dtype)
    h0 = kernel_leaf(torch.randn(1, 2, 32, 32), torch.float32)
    check_hgrn2_kernel(chunk.chunk_hgrn2, q, v, log_forget, initial_state=h0, tol=TOL[dtype])


def test_bfloat16_output_and_dv_stay_near_their_own_rounding_where_gates_forget_within_a_chunk():
    """With λ ≈ 0.88 a step's memory fades within the chunk, so o and dv come mostly from the chunk's own scores.
    Their float32 operands keep both within 5x the error of rounding the exact result to bfloat16 (3.8x measured
    through the interpreter); bfloat16 operands for the scores made it 7.1x for o and dv alike."""
    torch.manual_seed(0)
    q = kernel_leaf(torch.randn(1, 130, 2, 32), torch.bfloat16)
    v = kernel_leaf(torch.randn(1, 130, 2, 32), torch.bfloat16)
    log_forget = kernel_leaf(F.logsigmoid(torch.randn(1, 130, 2, 32) + 2), torch.bfloat16)
    d_out = torch.randn(1, 130, 2, 32, device=DEVICE)
    out = chunk.chunk_hgrn2(q, v, log_forget)[0]
    (out.float() * d_out).sum().backward()
    exact_leaves = [x.detach().double().cpu().requires_grad_() for x in (q, v, log_forget)]
    exact = hgrn2_recurrence_naive(*exact_leaves)[0]
    (exact * d_out.double().cpu()).sum().backward()
    for name, got, want in (("o", out, exact), ("dv", v.grad, exact_leaves[1].grad)):
        rounding = relative_error(want.to(torch.bfloat16), want)
        error = relative_error(got, want)
        assert error <= 5 * rounding, f"{name}: relative error {error:.2e}, {error / rounding:.1f}x its rounding"


def test_bfloat16_deltas_keep_the_final_state_near_the_float32_deltas_error(monkeypatch):
    """``LAUNCH["half_deltas"]`` stores the chunk-parallel deltas in bfloat16 (the walk still sums them in float32).
    Against the float64 loop, the final state's error grew 1.7-1.9x over float32 deltas through the interpreter
    (long and short memories, 512 steps); o's barely moved."""
    torch.manual_seed(4)
    q = kernel_leaf(torch.randn(1, 512, 1, 32), torch.bfloat16)
    v = kernel_leaf(torch.randn(1, 512, 1, 32), torch.bfloat16)
    log_forget = kernel_leaf(F.logsigmoid(torch.randn(1, 512, 1, 32) + 4), torch.bfloat16)
    exact = hgrn2_recurrence_naive(*(x.detach().double().cpu() for x in (q, v, log_forget)), output_final_state=True)
    errors = {}
    with chunk_state_path("deltas"):
        for half in (False, True):
            monkeypatch.setitem(chunk.LAUNCH, "half_deltas", half)
            out, state = chunk.chunk_hgrn2(q, v, log_forget, output_final_state=True)
            errors[half] = relative_error(out, exact[0]), relative_error(state, exact[1])
    assert errors[True][0] <= 1.5 * errors[False][0], errors
    assert errors[False][1] <= errors[True][1] <= 2.5 * errors[False][1], errors
    assert errors[True][1] <= TOL[torch.bfloat16] / 2, errors


def test_gated_backward_with_the_kept_log_forget_gives_the_same_gradients(monkeypatch):
    """``LAUNCH["keep_log_forget"]`` keeps the forward's float32 log λ for the backward instead of forming it again
    from the raw projection: the same function of the same inputs, so every gradient is the same."""
    torch.manual_seed(5)
    leaves = gated_kernel_leaves(1, 100, 2, 16, 16, torch.bfloat16, forget_scale=2)
    d_out = torch.randn(1, 100, 2, 16, device=DEVICE)
    grads, passes = {}, _spy(monkeypatch, chunk, "log_forget")
    for keep in (False, True):
        monkeypatch.setitem(chunk.LAUNCH, "keep_log_forget", keep)
        passes.clear()
        o, _ = chunk.chunk_hgrn2_gated(*leaves, output_gate="silu")
        grads[keep] = torch.autograd.grad((o.float() * d_out).sum(), leaves)
        assert len(passes) == (1 if keep else 2)  # the log λ pass: forward, and backward unless kept
    for name, kept, formed in zip(("dq_proj", "dv", "dforget_proj", "dlower_bound"), grads[True], grads[False]):
        assert torch.equal(kept, formed), name


def _extreme_gates(kind: str, shape) -> torch.Tensor:
    if kind == "uniform_log":  # log λ anywhere in [-30, 0]: forget gates from e^-30 to 1
        return -30 * torch.rand(shape)
    if kind == "near_one":  # λ = 1 - 1e-6: the key 1 - λ must not cancel to 0
        return torch.full(shape, math.log1p(-1e-6))
    # per channel: half the channels forget almost everything, half almost nothing
    mixed = torch.where(torch.arange(shape[-1]) % 2 == 0, -30.0, math.log1p(-1e-6))
    return mixed.expand(shape).clone()


@pytest.mark.parametrize("kind", ["uniform_log", "near_one", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_stays_finite_and_exact_with_extreme_gates(kind, dtype):
    shape = (1, 80, 1, 16)
    q = kernel_leaf(torch.randn(shape), dtype)
    v = kernel_leaf(torch.randn(1, 80, 1, 16), dtype)
    log_forget = kernel_leaf(_extreme_gates(kind, shape), dtype)
    h0 = kernel_leaf(torch.randn(1, 1, 16, 16), torch.float32)
    check_hgrn2_kernel(chunk.chunk_hgrn2, q, v, log_forget, initial_state=h0, tol=TOL[dtype])


def test_chunk_keeps_float32_precision_after_strong_gates():
    """40 steps of gates near e^-30 take the running sum of log λ past -1,000, then 24 gates near one follow. The
    decays between the later steps are near one, and a difference of two running sums of -1,000 is off by ~1e-4
    in float32 (the errors here were 4e-4 on the final state and 8e-5 on the output): the kernels form them from
    the gates between the two steps instead."""
    torch.manual_seed(0)
    seq_len, dim = 64, 32  # one chunk of 64 steps (heads of 16 channels or fewer run in chunks of 16)
    log_forget = torch.empty(1, seq_len, 1, dim)
    log_forget[:, :40] = -29.0 - torch.rand(1, 40, 1, dim)
    log_forget[:, 40:] = -1e-3 * (1 + torch.rand(1, seq_len - 40, 1, dim))
    q, v = (kernel_leaf(torch.randn(1, seq_len, 1, dim), torch.float32) for _ in range(2))
    check_hgrn2_kernel(chunk.chunk_hgrn2, q, v, kernel_leaf(log_forget, torch.float32), tol=1e-5)


@pytest.mark.parametrize(
    "output_gate, bound, dtype",
    [
        ("silu", "mixed", torch.float32),  # β = 0 exactly, β in (0, 1) and β = 0.999 in one head set
        ("sigmoid", None, torch.float32),
        ("identity", "zeros", torch.float32),  # the first layer: β = 0 everywhere
        ("silu", "mixed", torch.bfloat16),
        ("gelu", "mixed", torch.float32),  # not fused: the activation runs in torch first
    ],
)
def test_gated_chunk_matches_torch_gates_and_naive(output_gate, bound, dtype):
    batch, seq_len, heads, key_dim, value_dim = 1, 40, 2, 16, 24
    q_proj = kernel_leaf(torch.randn(batch, seq_len, heads, key_dim), dtype)
    v = kernel_leaf(torch.randn(batch, seq_len, heads, value_dim), dtype)
    forget_proj = kernel_leaf(3 * torch.randn(batch, seq_len, heads, key_dim), dtype)
    lower_bound = None
    if bound == "mixed":
        beta = torch.rand(heads, key_dim)
        beta[0, :4], beta[1, :3] = 0.0, 0.999
        lower_bound = kernel_leaf(beta, torch.float32)
    elif bound == "zeros":
        lower_bound = kernel_leaf(torch.zeros(heads, key_dim), torch.float32)
    h0 = kernel_leaf(torch.randn(batch, heads, key_dim, value_dim), torch.float32)

    def run(q_proj, v, forget_proj, lower_bound, h0):
        return chunk.chunk_hgrn2_gated(
            q_proj, v, forget_proj, lower_bound, output_gate=output_gate, scale=0.5, initial_state=h0,
            output_final_state=True,
        )  # fmt: skip

    def reference(q_proj, v, forget_proj, lower_bound, h0):
        q, log_forget = activation(q_proj, output_gate), lower_bounded_log_forget(forget_proj, lower_bound)
        return hgrn2_recurrence_naive(q, v, log_forget, scale=0.5, initial_state=h0, output_final_state=True)

    names = ("dq_proj", "dv", "dforget_proj", "dlower_bound", "dinitial_state")
    check_against_float64(run, reference, [q_proj, v, forget_proj, lower_bound, h0], names, TOL[dtype])


@pytest.mark.parametrize("precise", [None, False])
def test_bfloat16_lower_bound_gradient_over_many_chunks(precise):
    """The lower bound's gradient sums d log λ over 16 chunks, whose terms cancel. Summed over the pairs of steps
    that span each gate (``hgrn2.ops.chunk_bwd``), d log λ keeps its relative error near 1.5e-3 here with
    bfloat16 states and matmul operands (2.5e-2, above the bfloat16 tolerance, when it was summed over whole
    steps) and 1e-3 on the float32 path."""
    from hgrn2.ops.reference import hgrn2_recurrence_chunked

    torch.manual_seed(1)
    q_proj, v, forget_proj, beta = gated_kernel_leaves(1, 1024, 2, 32, 32, torch.bfloat16, forget_scale=2)
    o, _ = chunk.chunk_hgrn2_gated(q_proj, v, forget_proj, beta, output_gate="silu", precise_bound_grad=precise)
    do = torch.randn_like(o)
    (o.float() * do.float()).sum().backward()
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q_proj, v, forget_proj, beta)]
    log_forget = lower_bounded_log_forget(leaves[2], leaves[3])
    o_ref, _ = hgrn2_recurrence_chunked(F.silu(leaves[0]), leaves[1], log_forget)
    (o_ref * do.double().cpu()).sum().backward()
    assert_rel_close(forget_proj.grad, leaves[2].grad, TOL[torch.bfloat16], "dforget_proj")
    error = relative_error(beta.grad, leaves[3].grad)
    assert error <= TOL[torch.bfloat16] / 8, f"dlower_bound: relative error {error:.3e}"


@pytest.mark.parametrize("storage, growth", [("float16", 1.1), ("inputs", 1.7)])
def test_half_precision_log_forget_keeps_the_gated_errors_near_the_float32_ones(monkeypatch, storage, growth):
    """``LAUNCH["log_forget_dtype"]`` stores the gated entry's log λ in float16 (the default) or in the inputs'
    bfloat16 instead of float32. Against the float64 loop over 16 chunks (these inputs: errors of 2.2-6.4e-3 with
    float32 log λ), float16 moved no error by more than 4% (d β 2.24e-3 to 2.33e-3); bfloat16 moved o and the
    gradients of q_proj, v and f by up to 22% and the lower bound's by 50% (2.2e-3 to 3.4e-3)."""
    from hgrn2.ops.reference import hgrn2_recurrence_chunked

    torch.manual_seed(1)
    leaves = gated_kernel_leaves(1, 1024, 2, 32, 32, torch.bfloat16, forget_scale=2)
    exact = [x.detach().double().cpu().requires_grad_() for x in leaves]
    o_ref, _ = hgrn2_recurrence_chunked(F.silu(exact[0]), exact[1], lower_bounded_log_forget(exact[2], exact[3]))
    do = torch.randn(o_ref.shape, dtype=torch.float64)
    want = [o_ref, *torch.autograd.grad((o_ref * do).sum(), exact)]
    errors = {}
    for name in ("float32", storage):
        monkeypatch.setitem(chunk.LAUNCH, "log_forget_dtype", name)
        o, _ = chunk.chunk_hgrn2_gated(*leaves, output_gate="silu")
        got = [o, *torch.autograd.grad((o.float() * do.to(o.device, torch.float32)).sum(), leaves)]
        errors[name] = [relative_error(g, w) for g, w in zip(got, want)]
    names = ("o", "dq_proj", "dv", "dforget_proj", "dlower_bound")
    bounds = (1.3, 1.3, 1.3, 1.3, growth) if storage == "inputs" else (growth,) * 5
    for name, full, half, bound in zip(names, errors["float32"], errors[storage], bounds):
        assert half <= bound * full, f"{name}: {half:.3e} with {storage} log λ, {full:.3e} with float32"


def test_log_forget_dtype_names_its_choices(monkeypatch):
    """An unknown ``LAUNCH["log_forget_dtype"]`` is an error naming the three choices, raised before any kernel."""
    q_proj, v, forget_proj, beta = gated_kernel_leaves(1, 8, 1, 16, 16, torch.bfloat16, forget_scale=1)
    monkeypatch.setitem(chunk.LAUNCH, "log_forget_dtype", "bfloat8")
    with pytest.raises(ValueError, match=r"'bfloat8'.*'float16', 'float32', 'inputs'"):
        chunk.chunk_hgrn2_gated(q_proj, v, forget_proj, beta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_chunk_matches_naive_with_packed_sequences_and_gates_below_the_floor(dtype):
    """The gated entry's log λ comes from its own pass (hgrn2.ops.gate_pass): across packed sequences, with a β of
    0.999 and gates far below the kernels' floor of log λ = -30, some beyond float16's range (there the float64
    loop's state is reset to ~0, which the floor's e^-30 matches), outputs, states and every gradient against the
    float64 loop."""
    torch.manual_seed(3)
    q_proj, v, forget_proj, beta = gated_kernel_leaves(1, 150, 2, 20, 24, dtype, forget_scale=3)
    with torch.no_grad():
        beta[1, :3] = 0.999
        forget_proj[0, 60:64, 0, :5] = -200.0  # β = 0 in head 0: log λ ≈ -200
        forget_proj[0, 64:66, 0, 5:8] = -1e5  # past float16's range: log λ stored as -inf for bfloat16 inputs
    h0 = kernel_leaf(torch.randn(2, 2, 20, 24), torch.float32)
    cu_seqlens = torch.tensor([0, 70, 150], device=DEVICE)

    def run(q_proj, v, forget_proj, lower_bound, h0):
        return chunk.chunk_hgrn2_gated(
            q_proj, v, forget_proj, lower_bound, output_gate="silu", scale=0.5, initial_state=h0,
            output_final_state=True, cu_seqlens=cu_seqlens,
        )  # fmt: skip

    def reference(q_proj, v, forget_proj, lower_bound, h0):
        q, log_forget = activation(q_proj, "silu"), lower_bounded_log_forget(forget_proj, lower_bound)
        return hgrn2_recurrence_naive(
            q, v, log_forget, scale=0.5, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens.cpu()
        )

    names = ("dq_proj", "dv", "dforget_proj", "dlower_bound", "dinitial_state")
    check_against_float64(run, reference, [q_proj, v, forget_proj, beta, h0], names, TOL[dtype])


def test_gated_chunk_broadcasts_a_per_channel_lower_bound():
    q_proj, v, forget_proj = (torch.randn(1, 20, 2, 16, device=DEVICE) for _ in range(3))
    beta = torch.rand(16, device=DEVICE, requires_grad=True)  # [K], shared by both heads
    o, _ = chunk.chunk_hgrn2_gated(q_proj, v, forget_proj, beta, output_gate="silu")
    o.sum().backward()
    o_ref, _ = hgrn2_recurrence_naive(
        F.silu(q_proj).double().cpu(), v.double().cpu(), lower_bounded_log_forget(forget_proj, beta).double().cpu()
    )
    assert_rel_close(o, o_ref, 1e-4, "o")
    assert beta.grad.shape == beta.shape and torch.isfinite(beta.grad).all()


def test_chunk_rejects_float64_and_a_misshapen_lower_bound():
    x = torch.randn(1, 4, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        chunk.chunk_hgrn2(x, x, -x.abs())
    y = x.float()
    with pytest.raises(ValueError, match="lower_bound must broadcast"):
        chunk.chunk_hgrn2_gated(y, y, y, torch.rand(3, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunk_matches_chunked_torch_reference_at_full_size_on_gpu(dtype):
    from hgrn2.ops.reference import hgrn2_recurrence_chunked

    q = kernel_leaf(torch.randn(2, 2048, 4, 128), dtype)
    v = kernel_leaf(torch.randn(2, 2048, 4, 128), dtype)
    log_forget = kernel_leaf(F.logsigmoid(torch.randn(2, 2048, 4, 128) + 2), dtype)
    o, final = chunk.chunk_hgrn2(q, v, log_forget, output_final_state=True)
    ref, ref_final = hgrn2_recurrence_chunked(
        q.detach().double(), v.detach().double(), log_forget.detach().double(), output_final_state=True
    )
    assert_rel_close(o.float(), ref, TOL[dtype], "o")
    assert_rel_close(final, ref_final, TOL[dtype], "final_state")


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_triton_backend_runs_the_chunk_kernels_and_auto_keeps_cpu_tensors_on_torch(monkeypatch):
    from hgrn2.ops import hgrn2_recurrence

    calls = _spy(monkeypatch, chunk, "chunk_hgrn2")
    q, v = torch.randn(1, 30, 2, 16), torch.randn(1, 30, 2, 16)
    log_forget = F.logsigmoid(torch.randn(1, 30, 2, 16))
    expected, _ = hgrn2_recurrence_naive(q.double(), v.double(), log_forget.double())
    o_triton, _ = hgrn2_recurrence(q.to(DEVICE), v.to(DEVICE), log_forget.to(DEVICE), backend="triton")
    assert calls == ["chunk_hgrn2"]
    assert_rel_close(o_triton, expected, 1e-4, "o (triton)")
    o_auto, _ = hgrn2_recurrence(q, v, log_forget, backend="auto")
    assert calls == ["chunk_hgrn2"], "auto must not pick the kernels for CPU tensors"
    assert_rel_close(o_auto, expected, 1e-4, "o (auto)")


@pytest.mark.parametrize("gated", [False, True])
def test_the_public_ops_reverse_on_the_chunk_kernels_without_copies(monkeypatch, gated):
    """A reversed scan (the bidirectional mixers' second one) reaches the chunked kernels with the tensors as they
    lie: no flipped copy in, none out."""
    import hgrn2.ops as ops

    def no_copies(*args, **kwargs):
        raise AssertionError("reordered copies made for the chunked kernels")

    monkeypatch.setattr(ops._ScanOrder, "copies", no_copies)
    monkeypatch.setattr(ops._ScanOrder, "put_back", no_copies)
    q, v, forget = (torch.randn(1, 40, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    if gated:
        o, _ = ops.hgrn2_gated_recurrence(q, v, forget, output_gate="silu", backend="triton", reverse=True)
        q_ref, log_forget = F.silu(q), F.logsigmoid(forget)
    else:
        o, _ = ops.hgrn2_recurrence(q, v, F.logsigmoid(forget), backend="triton", reverse=True)
        q_ref, log_forget = q, F.logsigmoid(forget)
    expected, _ = hgrn2_recurrence_naive(*(x.detach().double().cpu().flip(1) for x in (q_ref, v, log_forget)))
    assert_rel_close(o, expected.flip(1), 1e-4, "o")


def test_gated_recurrence_uses_the_fused_gated_kernel_under_the_triton_backend(monkeypatch):
    from hgrn2.ops import hgrn2_gated_recurrence

    calls = _spy(monkeypatch, chunk, "chunk_hgrn2_gated")
    q_proj, v, forget_proj = (torch.randn(1, 24, 2, 16, device=DEVICE) for _ in range(3))
    beta = torch.rand(2, 16, device=DEVICE)
    o, _ = hgrn2_gated_recurrence(q_proj, v, forget_proj, beta, output_gate="silu", backend="triton")
    assert calls == ["chunk_hgrn2_gated"]
    expected, _ = hgrn2_recurrence_naive(
        F.silu(q_proj).double().cpu(), v.double().cpu(), lower_bounded_log_forget(forget_proj, beta).double().cpu()
    )
    assert_rel_close(o, expected, 1e-4, "o")


@pytest.mark.parametrize("gated", [False, True])
def test_short_scans_without_gradients_run_on_the_step_kernel_in_one_launch(monkeypatch, gated):
    from hgrn2.ops import hgrn2_gated_recurrence, hgrn2_recurrence, recurrent

    steps = _spy(monkeypatch, recurrent, "fused_recurrent_hgrn2")
    chunked = _spy(monkeypatch, chunk, "chunk_hgrn2_gated" if gated else "chunk_hgrn2")
    q_proj, v, forget_proj = (torch.randn(2, 1, 2, 16, device=DEVICE) for _ in range(3))
    h0 = torch.randn(2, 2, 16, 16, device=DEVICE)
    beta = torch.rand(2, 16, device=DEVICE)
    log_forget = lower_bounded_log_forget(forget_proj, beta if gated else None)
    expected, expected_state = hgrn2_recurrence_naive(
        F.silu(q_proj).double().cpu(), v.double().cpu(), log_forget.double().cpu(), scale=0.5,
        initial_state=h0.double().cpu(), output_final_state=True,
    )  # fmt: skip

    def run():
        if gated:
            return hgrn2_gated_recurrence(
                q_proj, v, forget_proj, beta, scale=0.5, initial_state=h0, output_final_state=True, backend="triton"
            )
        return hgrn2_recurrence(
            F.silu(q_proj), v, log_forget, scale=0.5, initial_state=h0, output_final_state=True, backend="triton"
        )

    with torch.no_grad():
        o, state = run()
    assert steps == ["fused_recurrent_hgrn2"] and chunked == []
    assert_rel_close(o, expected, 1e-5, "o")
    assert_rel_close(state, expected_state, 1e-5, "final state")
    q_proj.requires_grad_()  # a gradient is wanted: the chunked kernels, which have a backward
    run()
    assert steps == ["fused_recurrent_hgrn2"] and len(chunked) == 1


def test_launch_settings_parse_in_their_defaults_types_and_name_what_is_wrong():
    from hgrn2.ops.chunk import launch_setting

    assert launch_setting("dqk_bk=32") == ("dqk_bk", 32)
    assert launch_setting("walk_programs_per_sm=0.5") == ("walk_programs_per_sm", 0.5)
    assert launch_setting("intra_precision=tf32x3") == ("intra_precision", "tf32x3")
    assert launch_setting("half_deltas=True") == ("half_deltas", True)
    assert launch_setting("half_deltas=false") == ("half_deltas", False)  # not bool("false"), which is True
    for text, words in (
        ("half_deltas=0", "takes true or false"),
        ("dqk_bk=wide", "takes values of type int"),
        ("no_such_setting=1", "expected KEY=VALUE"),
        ("dqk_bk", "expected KEY=VALUE"),
    ):
        with pytest.raises(ValueError, match=words):
            launch_setting(text)


def test_launch_options_carry_the_stages_and_register_cap_only_when_set(monkeypatch):
    """``LAUNCH["<kernel>_stages"]`` and ``["<kernel>_maxnreg"]`` reach the kernel's launch as ``num_stages`` and
    ``maxnreg`` for half-precision inputs with heads over 16 channels; left at 0 they are not passed, so Triton's
    defaults hold, and float32 inputs and small heads never take them."""
    for key in ("output", "dqk", "dv"):
        monkeypatch.setitem(chunk.LAUNCH, f"{key}_stages", 0)
        monkeypatch.setitem(chunk.LAUNCH, f"{key}_maxnreg", 0)
    q = torch.zeros(1, 64, 2, 128, dtype=torch.bfloat16)
    launch = chunk._Launch(q, q, None, gated=False, act=None, lower_bound=None, precise=False)
    assert launch.options("output") == {"num_warps": chunk.LAUNCH["output_warps"]}
    monkeypatch.setitem(chunk.LAUNCH, "output_stages", 1)
    monkeypatch.setitem(chunk.LAUNCH, "output_maxnreg", 128)
    monkeypatch.setitem(chunk.LAUNCH, "dqk_stages", 2)
    assert launch.options("output") == {"num_warps": chunk.LAUNCH["output_warps"], "num_stages": 1, "maxnreg": 128}
    assert launch.options("dqk") == {"num_warps": chunk.LAUNCH["dqk_warps"], "num_stages": 2}
    assert launch.options("dv") == {"num_warps": chunk.LAUNCH["dv_warps"]}
    for q in (torch.zeros(1, 64, 2, 128), torch.zeros(1, 64, 2, 16, dtype=torch.bfloat16)):  # float32; small heads
        launch = chunk._Launch(q, q, None, gated=False, act=None, lower_bound=None, precise=False)
        assert launch.options("output") == {"num_warps": launch.warps("output")}

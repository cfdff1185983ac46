"""The Triton kernels at full size on a CUDA GPU, forward and backward, against the float64 PyTorch references.

Run on a GPU machine with the real kernels (not the interpreter)::

    HGRN2_TEST_GPU=1 python -m pytest -m gpu -rP tests/ops/test_gpu_full_size.py

Every case draws fresh random inputs, runs the kernel forward and backward, and compares the output, the final
state and every gradient with ``hgrn2.ops.reference`` evaluated in float64 on the same inputs: relative error
‖kernel − reference‖ / ‖reference‖ against 1e-4 (float32, TF32 off) or 2e-2 (bfloat16). Each case prints every
error it measured (``-rP`` shows them for passing cases), so a run doubles as the log of the check.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from hgrn2.ops.gates import lower_bounded_log_forget
from hgrn2.ops.reference import hgrn1_recurrence_chunked, hgrn2_recurrence_chunked, hgrn2_recurrence_naive

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        os.environ.get("HGRN2_TEST_GPU") != "1",
        reason="full-size kernel checks need the compiled kernels: set HGRN2_TEST_GPU=1 (no Triton interpreter)",
    ),
    pytest.mark.usefixtures("no_tf32"),  # the float32 cases compare against 1e-4
]

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
BF16, FP32 = torch.bfloat16, torch.float32


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; inf when ``actual`` holds a NaN or an infinity."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def check(name: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], tol: float, seconds: float) -> None:
    """Print every relative error of ``pairs`` (kernel, reference) on one line, then fail on any above ``tol``."""
    errors = {key: rel(actual, expected) for key, (actual, expected) in pairs.items()}
    print(f"{name} (tol {tol:.0e}, {seconds:.1f}s): " + " ".join(f"{k}={e:.2e}" for k, e in errors.items()))
    failed = {key: err for key, err in errors.items() if not err <= tol}
    assert not failed, f"{name}: relative errors above {tol:.0e}: {failed}"


def leaf(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).requires_grad_()


def reference_grads(fn, inputs, cotangents):
    """``fn`` on float64 copies of ``inputs``: its outputs and the gradients of Σ out · cotangent."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    outputs = fn(*leaves)
    sum((out * g.double()).sum() for out, g in zip(outputs, cotangents)).backward()
    return [out.detach() for out in outputs], [x.grad for x in leaves]


def log_gates(kind: str, shape) -> torch.Tensor:
    """log λ of one of the gate regimes the kernels must handle."""
    if kind == "log-uniform[-30,0]":
        return -30 * torch.rand(shape, device="cuda")
    if kind == "1-1e-6":  # almost no decay over 65K steps
        return torch.full(shape, math.log1p(-1e-6), device="cuda")
    if kind == "wide":  # some 16-step blocks decay past e^-60 (pairwise path), most do not (one matmul)
        return F.logsigmoid(4 * torch.randn(shape, device="cuda") - 2)
    return F.logsigmoid(torch.randn(shape, device="cuda") + 1.0)


def packed_offsets(n_packed: int, seq_len: int) -> torch.Tensor:
    """``cu_seqlens`` of ``n_packed`` sequences of random lengths filling ``seq_len`` tokens."""
    cuts = torch.randperm(seq_len - 1, device="cuda")[: n_packed - 1].sort().values + 1
    return torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), seq_len)])


def run_hgrn2_case(op, batch, seq_len, heads, dim, dtype, gate="logsigmoid", n_packed=0) -> None:
    """``op`` (chunked or step-by-step kernels) with an initial and a final state, forward and backward."""
    torch.manual_seed(seq_len + heads)
    cu_seqlens = packed_offsets(n_packed, seq_len) if n_packed else None
    n_states = n_packed or batch
    q = leaf(torch.randn(batch, seq_len, heads, dim, device="cuda"), dtype)  # [B, T, H, K]
    v = leaf(torch.randn(batch, seq_len, heads, dim, device="cuda"), dtype)  # [B, T, H, V]
    log_forget = leaf(log_gates(gate, (batch, seq_len, heads, dim)), dtype)
    h0 = leaf(torch.randn(n_states, heads, dim, dim, device="cuda"), torch.float32)  # [N, H, K, V]
    start = time.time()
    o, final = op(q, v, log_forget, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    do, d_final = torch.randn_like(o), torch.randn_like(final)
    ((o.float() * do.float()).sum() + (final * d_final).sum()).backward()
    torch.cuda.synchronize()
    seconds = time.time() - start
    (o_ref, final_ref), grads = reference_grads(
        lambda q, v, g, h0: hgrn2_recurrence_chunked(
            q, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens
        ),
        [q, v, log_forget, h0],
        [do, d_final],
    )
    pairs = {"o": (o, o_ref), "state": (final, final_ref), "dq": (q.grad, grads[0]), "dv": (v.grad, grads[1])}
    pairs |= {"dlog_forget": (log_forget.grad, grads[2]), "dh0": (h0.grad, grads[3])}
    packed = f", {n_packed} packed" if n_packed else ""
    check(
        f"{op.__name__} {dtype} B={batch} T={seq_len} H={heads} K=V={dim} gates={gate}{packed}",
        pairs,
        TOL[dtype],
        seconds,
    )


CHUNK_CASES = [
    (8, 2048, 8, 128, BF16, "logsigmoid", 0),  # 16K tokens
    (8, 2048, 8, 128, BF16, "wide", 0),
    (1, 65536, 4, 128, BF16, "logsigmoid", 0),  # 64K tokens, one sequence
    (1, 32768, 8, 128, BF16, "logsigmoid", 37),
    (1, 8192, 8, 128, FP32, "logsigmoid", 11),
    (1, 65536, 2, 128, BF16, "log-uniform[-30,0]", 0),
    (1, 65536, 2, 128, BF16, "1-1e-6", 0),
]


@pytest.mark.parametrize("batch, seq_len, heads, dim, dtype, gate, n_packed", CHUNK_CASES)
def test_chunk_kernels_match_float64_at_full_size(batch, seq_len, heads, dim, dtype, gate, n_packed):
    from hgrn2.ops.chunk import chunk_hgrn2

    run_hgrn2_case(chunk_hgrn2, batch, seq_len, heads, dim, dtype, gate, n_packed)


SMALL_STATE_CASES = [
    (1792, 14, 96, 2, BF16, "logsigmoid"),  # hgrn2_vit_tiny's row scans at B = 128
    (32, 2000, 16, 4, BF16, "log-uniform[-30,0]"),  # ListOps
    (4096, 32, 64, 2, BF16, "logsigmoid"),  # Pathfinder's row scans at B = 128
    (16, 197, 24, 8, FP32, "logsigmoid"),
]


@pytest.mark.parametrize("batch, seq_len, heads, dim, dtype, gate", SMALL_STATE_CASES)
def test_step_by_step_small_state_kernels_match_float64_at_model_shapes(batch, seq_len, heads, dim, dtype, gate):
    from hgrn2.ops.small_state import small_state_hgrn2

    run_hgrn2_case(small_state_hgrn2, batch, seq_len, heads, dim, dtype, gate)


GATED_CASES = [
    ("chunk", 4, 4096, 8, 128, BF16),
    ("chunk", 2, 1000, 4, 96, FP32),
    ("steps", 32, 2000, 16, 4, BF16),  # ListOps
    ("steps", 512, 1024, 64, 2, FP32),  # Pathfinder-32's sequences
]


@pytest.mark.parametrize("kernels, batch, seq_len, heads, dim, dtype", GATED_CASES)
def test_gated_entry_matches_float64_including_the_lower_bound_gradient(kernels, batch, seq_len, heads, dim, dtype):
    """The fused gates (SiLU output gate, lower-bounded forget gate) and every gradient, β's included: β's
    gradient sums d log λ over every position, the sum whose terms cancel. ``kernels``: the chunked ones or the
    step-by-step ones of small states."""
    from hgrn2.ops.chunk import chunk_hgrn2_gated
    from hgrn2.ops.small_state import small_state_hgrn2_gated

    entry = chunk_hgrn2_gated if kernels == "chunk" else small_state_hgrn2_gated
    torch.manual_seed(1)
    q_proj = leaf(torch.randn(batch, seq_len, heads, dim, device="cuda"), dtype)
    v = leaf(torch.randn(batch, seq_len, heads, dim, device="cuda"), dtype)
    forget_proj = leaf(2 * torch.randn(batch, seq_len, heads, dim, device="cuda"), dtype)
    beta = torch.rand(heads, dim, device="cuda")
    beta[0] = 0.0  # the first layer's bound: exactly 0
    beta = leaf(beta, torch.float32)
    start = time.time()
    o, _ = entry(q_proj, v, forget_proj, beta, output_gate="silu")
    do = torch.randn_like(o)
    (o.float() * do.float()).sum().backward()
    torch.cuda.synchronize()
    seconds = time.time() - start
    (o_ref,), grads = reference_grads(
        lambda p, v, f, b: hgrn2_recurrence_chunked(F.silu(p), v, lower_bounded_log_forget(f, b))[:1],
        [q_proj, v, forget_proj, beta],
        [do],
    )
    pairs = {"o": (o, o_ref), "dq_proj": (q_proj.grad, grads[0]), "dv": (v.grad, grads[1])}
    pairs |= {"dforget_proj": (forget_proj.grad, grads[2]), "dlower_bound": (beta.grad, grads[3])}
    check(f"{entry.__name__} silu {dtype} B={batch} T={seq_len} H={heads} K=V={dim}", pairs, TOL[dtype], seconds)


HGRN1_CASES = [
    (1, 65536, 1024, BF16, "log-uniform[-30,0]"),
    (1, 65536, 1024, BF16, "1-1e-6"),
    (8, 2048, 1024, BF16, "logsigmoid"),
    (2, 8192, 1024, FP32, "logsigmoid"),
]


@pytest.mark.parametrize("batch, seq_len, dim, dtype, gate", HGRN1_CASES)
def test_hgrn1_scan_matches_float64_at_full_size(batch, seq_len, dim, dtype, gate):
    from hgrn2.ops.scan import scan_hgrn1

    torch.manual_seed(2)
    x = leaf(torch.randn(batch, seq_len, dim, device="cuda"), dtype)  # [B, T, D]
    log_forget = leaf(log_gates(gate, (batch, seq_len, dim)), dtype)
    h0 = leaf(torch.randn(batch, dim, device="cuda"), torch.float32)
    start = time.time()
    h, final = scan_hgrn1(x, log_forget, initial_state=h0, output_final_state=True)
    dh, d_final = torch.randn_like(h), torch.randn_like(final)
    ((h.float() * dh.float()).sum() + (final * d_final).sum()).backward()
    torch.cuda.synchronize()
    seconds = time.time() - start
    (h_ref, final_ref), grads = reference_grads(
        lambda x, g, h0: hgrn1_recurrence_chunked(x, g, initial_state=h0, output_final_state=True),
        [x, log_forget, h0],
        [dh, d_final],
    )
    pairs = {"h": (h, h_ref), "state": (final, final_ref), "dx": (x.grad, grads[0])}
    pairs |= {"dlog_forget": (log_forget.grad, grads[1]), "dh0": (h0.grad, grads[2])}
    check(f"scan_hgrn1 {dtype} B={batch} T={seq_len} D={dim} gates={gate}", pairs, TOL[dtype], seconds)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_decoding_steps_and_the_recurrent_kernel_match_the_float64_loop(dtype, steps=4):
    from hgrn2.ops.recurrent import fused_recurrent_hgrn2, fused_recurrent_hgrn2_step

    batch, heads, dim = 64, 8, 128
    torch.manual_seed(3)
    q = torch.randn(batch, steps, heads, dim, device="cuda").to(dtype)
    v = torch.randn(batch, steps, heads, dim, device="cuda").to(dtype)
    log_forget = log_gates("logsigmoid", q.shape).to(dtype)
    h0 = torch.randn(batch, heads, dim, dim, device="cuda")
    state = h0.clone()
    start = time.time()
    outputs = [fused_recurrent_hgrn2_step(q[:, t], v[:, t], log_forget[:, t], state)[0] for t in range(steps)]
    o_seq, _ = fused_recurrent_hgrn2(q, v, log_forget, initial_state=h0)
    torch.cuda.synchronize()
    seconds = time.time() - start
    o_ref, final_ref = hgrn2_recurrence_naive(
        q.double(), v.double(), log_forget.double(), initial_state=h0.double(), output_final_state=True
    )
    pairs = {"o_step": (torch.stack(outputs, 1), o_ref), "state": (state, final_ref), "o_seq": (o_seq, o_ref)}
    check(f"recurrent step {dtype} B={batch} H={heads} K=V={dim} x{steps}", pairs, TOL[dtype], seconds)

"""No kernel launch passes one tensor in two pointer arguments that ``torch.compile`` may both take as written.

Inside a compiled graph torch runs a user Triton kernel on copies of every argument its analysis of the kernel's
Triton IR marks as written, then takes each copy in turn as its argument's new value. The analysis is
conservative: it marks arguments that a kernel only reads, or never touches under the launch's flags, as written
too. So a tensor passed in two positions that are both marked comes back as whichever copy is taken last (one
marked position is safe: the decoding step reads the state through one argument and writes it through another).
The step-by-step kernels once passed their output as the placeholder of absent arguments (the initial state,
``cu_seqlens``): compiled, the output came back as an unwritten copy, and ``hgrn2_vit_tiny_patch16_224`` trained
on uninitialised memory (NaN from the first block on an H100, with Inductor and with ``aot_eager`` alike), while
eager runs were right.

Every launch of each op is captured on CPU tensors (nothing runs; ``experiments/kernel_resources.capture``), torch's
own analysis is run on each kernel lowered for sm90, and no two arguments of a launch that it marks written may
share memory, except the placeholders of ``hgrn2.ops.kernel_utils.unused``, which nothing reads.
Lowering needs Triton's compiler, not the interpreter that tests/conftest.py turns on, so it runs in a child process.
"""

from __future__ import annotations

import json

import pytest
import torch

from hgrn2.ops import hgrn2_gated_recurrence
from tests.helpers import run_compiler_probe

PROBE = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
sys.path.insert(0, "experiments")
from kernel_resources import capture  # launches recorded, not run


class _Sm90:  # torch lowers a kernel for the current target: an H100's, on a machine without a GPU
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(_Sm90())
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
from hgrn2.ops import chunk, fused_cross_entropy, fused_norm, kernel_utils, recurrent, scan, small_state

def ops():
    B, T, H, D = 2, 128, 2, 32
    q, v, g = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    beta = torch.rand(H, D, requires_grad=True)
    x, y, f = (torch.randn(B, T, H, 2, requires_grad=True) for _ in range(3))
    h0, s0 = torch.randn(B, H, D, D, requires_grad=True), torch.randn(B, H, 2, 2, requires_grad=True)

    def grads(out, *leaves):
        out = sum(o.float().sum() for o in out if o is not None)
        torch.autograd.grad(out, leaves, allow_unused=True)

    for states in (False, True):
        kw = dict(initial_state=h0 if states else None, output_final_state=states)
        small = dict(initial_state=s0 if states else None, output_final_state=states)
        grads(chunk.chunk_hgrn2(q, v, g, scale=0.5, **kw), q, v, g, h0)
        grads(chunk.chunk_hgrn2_gated(q, v, g, beta, **kw), q, v, g, beta, h0)
        saved = chunk.LAUNCH["walk_programs_per_sm"]
        chunk.LAUNCH["walk_programs_per_sm"] = float("inf")  # the other path: every delta at once, then the walk
        grads(chunk.chunk_hgrn2(q, v, g, **kw), q, v, g, h0)
        chunk.LAUNCH["walk_programs_per_sm"] = saved
        grads(small_state.small_state_hgrn2(x, y, f, **small), x, y, f, s0)
        grads(small_state.small_state_hgrn2_gated(x, y, f, None, **small), x, y, f, s0)
        grads(small_state.small_state_hgrn2_gated(x, y, f, beta[:, :2], columns=8, reverse=True), x, y, f, beta)
        recurrent.fused_recurrent_hgrn2(q.detach(), v.detach(), g.detach(), **{**kw, "initial_state": None})
        xs = torch.randn(B, T, D, requires_grad=True)
        grads(scan.scan_hgrn1(xs, g[:, :, 0], initial_state=h0[:, 0, 0] if states else None,
                              output_final_state=states), xs)
    recurrent.fused_recurrent_hgrn2_step(q[:, 0].detach(), v[:, 0].detach(), g[:, 0].detach(),
                                         torch.zeros(B, H, D, D))
    w, branch = torch.randn(2 * D, requires_grad=True), torch.randn(4, 2 * D, requires_grad=True)
    for args in ((None, w), (branch, w), (branch, None), (None, None)):
        z = torch.randn(4, 2 * D, requires_grad=True)
        out = fused_norm._AddRMSNorm.apply(z, args[0], args[1], 1, 1e-6, None)
        grads(out if isinstance(out, tuple) else (out,), z)
    for scale in (None, torch.ones(1)):
        fused_cross_entropy.cross_entropy_rows(torch.randn(6, 40), torch.randint(0, 40, (6,)), scale, -100)


placeholders = set()


def recording(make):  # kernel_utils.unused, noting the placeholders it makes
    def unused(*args, **kwargs):
        tensor = make(*args, **kwargs)
        placeholders.add(tensor.untyped_storage().data_ptr())
        return tensor

    return unused


for module in (chunk, fused_cross_entropy, fused_norm, recurrent, scan, small_state):
    module.unused = recording(kernel_utils.unused)
launches = capture(ops)  # keeps every launch's tensors alive, so that no two of them share an address by reuse

report, seen = [], set()
for kernel, *_, arguments in launches:
    tensors = {name: value for name, value in arguments.items() if torch.is_tensor(value)}
    accesses = identify_accessed_tensors(kernel, arguments, {})
    written = {access.name for access in accesses.read_writes.writes}
    shared = {}
    for name, tensor in tensors.items():
        shared.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    for pointer, names in shared.items():
        if pointer not in placeholders and len(written & set(names)) > 1:
            report.append({"kernel": kernel.__name__, "shared": names, "written": sorted(written & set(names))})
    seen.add(kernel.__name__)
print(json.dumps({"kernels": sorted(seen), "hazards": report}))
"""


def test_no_launch_shares_a_tensor_that_torch_compile_may_take_as_written():
    result = run_compiler_probe(PROBE)
    expected = {
        "chunk_delta_kernel", "state_scan_kernel", "state_walk_kernel", "output_fwd_kernel", "dqk_bwd_kernel",
        "dv_bwd_kernel", "log_forget_kernel", "gate_grad_kernel", "small_state_fwd_kernel", "small_state_bwd_kernel",
        "recurrent_fwd_kernel", "scan_fwd_kernel", "scan_bwd_kernel", "add_rmsnorm_fwd_kernel",
        "add_rmsnorm_bwd_kernel", "ce_rows_kernel",
    }  # fmt: skip
    assert expected <= set(result["kernels"]), sorted(expected - set(result["kernels"]))
    assert not result["hazards"], json.dumps(result["hazards"], indent=1)


@pytest.mark.gpu
@pytest.mark.parametrize("states", [False, True], ids=["no-states", "states"])
@pytest.mark.parametrize("backend, dim, order", [("triton", 32, {"reverse": True}), ("recurrent", 2, {"columns": 6})])
def test_compiled_scans_give_what_eager_ones_give_on_a_gpu(backend, dim, order, states):
    """The gated op traced by torch.compile (``aot_eager``: torch's handling of the kernels, no code generation)
    against the same call run eagerly: outputs, final states and every gradient. The inputs are computed inside the
    compiled function, as a layer's projections are: torch's analysis takes some arguments that the kernels only
    read as written, and a leaf that requires grad may not be written in place (torch raises)."""
    torch.manual_seed(0)
    B, T, H = 2, 36, 3
    n = B * order.get("columns", 1)
    inputs = [torch.randn(B, T, H, dim, device="cuda", requires_grad=True) for _ in range(3)]
    beta = torch.rand(H, dim, device="cuda", requires_grad=True)
    h0 = torch.randn(n, H, dim, dim, device="cuda", requires_grad=True) if states else None

    def scan(q_proj, v, forget, beta, h0):
        q_proj, v, forget, h0 = (t * 1.0 if t is not None else None for t in (q_proj, v, forget, h0))
        o, final = hgrn2_gated_recurrence(
            q_proj, v, forget, beta * 1.0, initial_state=h0, output_final_state=states, backend=backend, **order
        )
        return o, final

    results = []
    for run in (scan, torch.compile(scan, backend="aot_eager", fullgraph=True)):
        o, final = run(*inputs, beta, h0)
        loss = (o.float() * torch.linspace(-1, 1, o.shape[-1], device="cuda")).sum()
        if final is not None:
            loss = loss + final.square().sum()
        leaves = [*inputs, beta] + ([h0] if states else [])
        results.append([o, *([final] if states else []), *torch.autograd.grad(loss, leaves)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)

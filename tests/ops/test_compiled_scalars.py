"""The Triton kernels keep float32 arithmetic when ``torch.compile`` launches them.

Triton types a Python float argument as float32; Inductor, which launches user kernels inside a compiled graph,
types it as float64. A kernel that multiplies by such a scalar then computes in float64 from there on, and one
whose loop carries a float32 value touched by it does not compile at all ("Loop-carried variable ... fp32 but is
re-assigned to fp64"): the small-state models' step-by-step backward failed so under ``torch.compile`` on an H100.

The kernels take such scalars (the output scale, the norm's epsilon) as compile-time constants. Every kernel
launch of each op is captured on CPU tensors (nothing runs), and each kernel is lowered to Triton IR for sm90 with
any Python float argument typed float64, as Inductor types it: the IR must hold no float64 value. Lowering needs
Triton's compiler, not its interpreter (which tests/conftest.py turns on), so it runs in a child process.

The public ops' dispatch around the kernels (backend resolution, the lookup of the kernel modules) is traced by
``torch.compile`` into one graph, with no break and no warning.
"""

from __future__ import annotations

import json
import warnings

import torch
import torch.nn.functional as F

from hgrn2.ops import fuses_gates, hgrn2_gated_recurrence, hgrn2_recurrence
from tests.helpers import run_compiler_probe

PROBE = r"""
import json, sys, torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton._C.libtriton import ir
sys.path.insert(0, "experiments")
from kernel_resources import capture  # launches recorded, not run
from hgrn2.ops import chunk, fused_norm, recurrent, small_state

def ops():
    B, T, H, D = 2, 128, 2, 32
    q, v, g = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    beta = torch.rand(H, D, requires_grad=True)
    x, y, f = (torch.randn(B, T, H, 2, requires_grad=True) for _ in range(3))

    def grads(out, *leaves):
        torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)

    grads(chunk.chunk_hgrn2(q, v, g, scale=0.5)[0], q, v, g)
    grads(chunk.chunk_hgrn2_gated(q, v, g, beta, scale=0.5, precise_bound_grad=True)[0], q, v, g, beta)
    saved = chunk.LAUNCH["walk_programs_per_sm"]
    chunk.LAUNCH["walk_programs_per_sm"] = float("inf")  # the other path: every delta at once, then the walk
    grads(chunk.chunk_hgrn2(q, v, g, scale=0.5)[0], q, v, g)
    chunk.LAUNCH["walk_programs_per_sm"] = saved
    grads(small_state.small_state_hgrn2(x, y, f, scale=0.5)[0], x, y, f)
    grads(small_state.small_state_hgrn2_gated(x, y, f, beta[:, :2], scale=0.5)[0], x, y, f)
    recurrent.fused_recurrent_hgrn2(q.detach(), v.detach(), g.detach(), scale=0.5)
    w = torch.randn(2 * D, requires_grad=True)
    grads(fused_norm._AddRMSNorm.apply(torch.randn(4, 2 * D, requires_grad=True), None, w, 1, 1e-6, None)[0], w)


# capture types a Python float argument as Triton does (fp32); Inductor types it fp64
launches = [
    (kernel, {name: "fp64" if kind == "fp32" else kind for name, kind in signature.items()}, constants)
    for kernel, signature, constants, *_ in capture(ops)
]

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
options = backend.parse_options({})
report = {}
for kernel, signature, constants in launches:
    if kernel.__name__ in report:
        continue
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    try:
        module = source.make_ir(target, options, backend.get_codegen_implementation(options),
                                backend.get_module_map(), context)
    except Exception as error:
        report[kernel.__name__] = {"error": str(error).splitlines()[-1][:300]}
        continue
    report[kernel.__name__] = {"float64_ops": [line.strip() for line in str(module).splitlines() if "f64" in line][:5]}
print(json.dumps(report))
"""


def test_kernels_keep_float32_arithmetic_when_inductor_passes_float_scalars_as_float64():
    report = run_compiler_probe(PROBE)
    expected = {
        "chunk_delta_kernel", "state_walk_kernel", "output_fwd_kernel", "dqk_bwd_kernel", "dv_bwd_kernel",
        "small_state_fwd_kernel", "small_state_bwd_kernel", "recurrent_fwd_kernel", "add_rmsnorm_fwd_kernel",
    }  # fmt: skip
    assert expected <= set(report), sorted(report)
    failures = {name: entry for name, entry in report.items() if entry.get("error") or entry["float64_ops"]}
    assert not failures, json.dumps(failures, indent=1)


def test_the_public_ops_trace_into_one_graph_without_warnings():
    torch.manual_seed(0)
    q, v, forget = (torch.randn(2, 24, 2, 8) for _ in range(3))
    beta = torch.rand(2, 8)

    def layer(q, v, forget):
        # as the directional layer asks, with the kernels' backend: triton_available and the kernel modules' lookup
        scale = 2.0 if fuses_gates("triton", q, v) else 1.0
        o, _ = hgrn2_gated_recurrence(q, v, forget, beta)
        o2, _ = hgrn2_recurrence(q, v, F.logsigmoid(forget), check_values=False)  # the check reads values back
        return scale * (o + o2)

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = torch._dynamo.explain(layer)(q, v, forget)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    dynamo_warnings = [str(w.message) for w in caught if "Dynamo" in str(w.message)]
    assert not dynamo_warnings, dynamo_warnings


SYMBOLIC_SIZES_PROBE = r"""
import json, torch
import torch.utils._triton
from hgrn2.ops import small_state

# the step-by-step kernels traced as torch.compile traces them for a GPU, on CPU tensors that nothing runs on: Dynamo
# wraps a Triton launch into its graph only where it believes Triton usable, and the launch's SM count is a GPU's
torch.utils._triton.has_triton = lambda: True
small_state.sm_count = lambda device: 132


class Traced(Exception):
    pass


def capture(graph, inputs):
    raise Traced  # the whole call traced into one graph, launches included; nothing is run


def scan(q_proj, v, forget, beta):
    o, _ = small_state.small_state_hgrn2_gated(q_proj * 1.0, v * 1.0, forget * 1.0, beta * 1.0, columns=6)
    return o


compiled = torch.compile(scan, backend=capture, fullgraph=True)
report = {}
for dim in (32, 2, 3):  # the second call makes the head size symbolic; the third shares the second's power of two
    try:
        compiled(*(torch.randn(2, 36, 3, dim) for _ in range(3)), torch.rand(3, dim))
        report[dim] = "ran"
    except Exception as error:
        root = error  # Dynamo wraps the backend's exception
        while not isinstance(root, Traced) and (root.__cause__ or getattr(root, "inner_exception", None)):
            root = root.__cause__ or root.inner_exception
        report[dim] = "traced" if isinstance(root, Traced) else f"{type(error).__name__}: {str(root)[:300]}"
print(json.dumps(report))
"""


def test_step_kernel_launches_stay_constant_when_torch_compile_makes_the_head_size_symbolic():
    """A function compiled once and called with another head size: torch.compile makes that size symbolic, and the
    step-by-step kernels' launch settings made from it (num_warps, the tile sizes) must still come out as constants
    (on an H100 such a call failed inside Dynamo: "'SymNodeVariable' object has no attribute 'value'")."""
    report = run_compiler_probe(SYMBOLIC_SIZES_PROBE)
    assert report == {"32": "traced", "2": "traced", "3": "traced"}, report

"""experiments/kernel_resources.py: kernel launches captured without running them, and compiled for sm90.

The script needs Triton's compiler, not its interpreter (which tests/conftest.py turns on), so it runs in a child
process without TRITON_INTERPRET.
"""

from __future__ import annotations

from tests.helpers import run_compiler_probe

PROBE = """
import json, sys, torch
sys.path.insert(0, "experiments")
import kernel_resources as kr
from hgrn2.ops import small_state

q, v, g = (torch.randn(2, 20, 3, 4, requires_grad=True) for _ in range(3))
def step():
    o = small_state.SmallStateHGRN2Function.apply(q, v, g, None, 1.0, False, None)[0]
    torch.autograd.grad(o, (q, v, g), torch.ones_like(o))
launches = kr.capture(step)
kernel, signature, constants, options, attributes, _ = launches[0]
print(json.dumps({
    "kernels": [launch[0].__name__ for launch in launches], "steps_per_load": small_state.STEPS_PER_LOAD,
    "signature": signature, "constants": {k: str(v) for k, v in constants.items()}, "options": options,
    "attributes": {kernel.arg_names[k[0]]: v for k, v in attributes.items()},
    "resources": kr.resources(kernel, signature, constants, options, 90, attributes),
}))
"""


def test_a_call_is_captured_launch_by_launch_and_compiled_for_hopper():
    report = run_compiler_probe(PROBE, timeout=300)
    # the forward's one launch, then the backward's; nothing ran (outputs are empty tensors)
    assert report["kernels"] == ["small_state_fwd_kernel", "small_state_bwd_kernel"]
    assert report["signature"]["q_ptr"] == "*fp32" and report["signature"]["T"] == "i32"
    assert report["constants"]["K"] == "4" and report["constants"]["BT"] == str(report["steps_per_load"])
    assert report["constants"]["HAS_H0"] == "False" and report["signature"]["HAS_H0"] == "constexpr"
    # as Triton's JIT specialises them: allocations are 16-byte aligned, T = 20 is not a multiple of 16
    assert report["attributes"]["q_ptr"] == [["tt.divisibility", 16]] and "T" not in report["attributes"]
    resources = report["resources"]
    assert 0 < resources["registers"] <= 255 and resources["stack_bytes"] >= 0
    assert resources["num_warps"] == report["options"]["num_warps"]
    # the static SASS, opcode by opcode: every kernel ends in EXIT, and the step's λ = exp(log λ) is a MUFU.EX2
    opcodes = resources["opcodes"]
    assert resources["instructions"] == sum(opcodes.values()) > 0
    assert opcodes.get("EXIT", 0) >= 1 and opcodes.get("MUFU", 0) >= 1 and all(name.isupper() for name in opcodes)

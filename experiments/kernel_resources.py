"""Registers, spills and shared memory of every Triton kernel that one call of an op launches, compiled for a
GPU architecture on any machine (no GPU needed: launches are captured, not run, and compiled ahead of time).

Each kernel launch of the call is recorded with its compile-time constants, compiled for ``--arch`` (90: Hopper)
by Triton's own toolchain, and its resource use and static SASS instruction counts (in total and per opcode) read
from the cubin with ``cuobjdump``. Register pressure and
spills explain much of a kernel's speed before any timing: a kernel that spills or needs over 128 registers per
thread at 8 warps runs one CTA per SM.

    PYTHONPATH=$PWD python experiments/kernel_resources.py --op plain gated --dtype bf16
    PYTHONPATH=$PWD python experiments/kernel_resources.py --op steps steps-gated --dim 4 --steps-shape 128 2000 16

``steps`` and ``steps-gated`` are the step-by-step kernels of small states (``hgrn2.ops.small_state``), whose
launch settings depend on the shape and the GPU's SM count (``--sms``, 132 on an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from hgrn2.ops import chunk, small_state

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
              torch.int64: "i64", torch.float64: "fp64"}  # fmt: skip


def capture(run_op) -> list[tuple[JITFunction, dict, dict, dict, dict, dict]]:
    """(kernel, signature, constants, options, attributes, arguments) of every launch ``run_op`` makes, with no
    kernel run; ``arguments`` holds every parameter's value as launched (defaults filled in), its tensors kept.

    The attributes are the specialisation Triton's JIT gives a launch: a pointer whose address, or an integer whose
    value, is a multiple of 16 is marked divisible by 16. Without them the compiler cannot vectorise loads or
    pipeline loops with asynchronous copies, and the compile would not be the one the GPU runs."""
    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        bound = dict(zip([p.name for p in self.params], args)) | kwargs
        arguments = {param.name: bound.get(param.name, param.default) for param in self.params}
        signature, constants, attributes = {}, {}, {}
        for index, param in enumerate(self.params):
            value = arguments[param.name]
            if param.is_constexpr or value is None:
                signature[param.name] = "constexpr"
                constants[param.name] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + TYPE_NAMES[value.dtype]
                if value.data_ptr() % 16 == 0:
                    attributes[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
                if value % 16 == 0 and not getattr(param, "do_not_specialize", False):
                    attributes[(index,)] = [["tt.divisibility", 16]]
            else:
                signature[param.name] = "fp32"
        options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "maxnreg")}
        launches.append((self, signature, constants, options, attributes, arguments))
        return None

    JITFunction.run = record
    try:
        run_op()
    finally:
        JITFunction.run = original
    return launches


def resources(
    kernel: JITFunction,
    signature: dict,
    constants: dict,
    options: dict,
    arch: int,
    attributes: dict | None = None,
    dump: Path | None = None,
) -> dict:
    """Registers per thread, spill bytes and static shared memory of one compiled launch (``attributes``: the
    JIT's specialisation, as ``capture`` records it). ``dump``: a path stem under which its Triton GPU IR
    (``.ttgir``), PTX and SASS (``.sass``) are written."""
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes),
        target=GPUTarget("cuda", arch, 32), options=options,
    )  # fmt: skip
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True)
        sass = subprocess.run([str(tool), "--dump-sass", cubin.name], capture_output=True, text=True).stdout
    if dump is not None:
        for suffix, text in ((".ttgir", compiled.asm["ttgir"]), (".ptx", compiled.asm["ptx"]), (".sass", sass)):
            dump.with_suffix(suffix).write_text(text)
        dump.with_suffix(".cubin").write_bytes(compiled.asm["cubin"])  # nvdisasm --print-line-info reads it
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout))
    # one instruction per line "/*0a30*/  @!P0 FFMA.FTZ R3, ..." : its opcode, without modifiers or predicate
    opcodes = Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    return {
        "registers": int(found.get("REG", -1)),
        "stack_bytes": int(found.get("STACK", 0)),  # per thread: spilled registers and local arrays
        "shared_bytes": compiled.metadata.shared,
        "num_warps": options.get("num_warps", 4),
        "num_stages": options.get("num_stages", 3),
        "instructions": sum(opcodes.values()),
        "opcodes": dict(opcodes.most_common()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--op",
        nargs="+",
        default=["plain", "gated"],
        choices=["plain", "gated", "gated-precise", "steps", "steps-gated"],
    )
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--dim", type=int, default=128, help="K = V")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--steps-shape", type=int, nargs=3, default=[128, 2000, 16], metavar=("B", "T", "H"))
    parser.add_argument("--sms", type=int, default=132, help="SMs the step kernels' launch settings assume")
    parser.add_argument(
        "--launch", nargs="*", default=[], metavar="KEY=VALUE", help="chunk.LAUNCH overrides, e.g. output_bv=64"
    )
    parser.add_argument("--reverse", action="store_true", help="the chunked ops' reversed scans (reverse=True)")
    parser.add_argument("--opcodes", type=int, default=0, help="print each kernel's N most frequent SASS opcodes")
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    parser.add_argument(
        "--dump", type=Path, default=None, help="folder for each kernel's Triton GPU IR, PTX, SASS and cubin"
    )
    args = parser.parse_args()
    for item in args.launch:
        try:
            key, value = chunk.launch_setting(item)
        except ValueError as error:
            parser.error(f"--launch {error}")
        chunk.LAUNCH[key] = value
    dtype = DTYPES[args.dtype]
    shape = (2, 256, 4, args.dim)
    q, v, g = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    beta = torch.rand(4, args.dim, requires_grad=True)

    small_state.sm_count = lambda device: args.sms
    steps_shape = (*args.steps_shape, args.dim)
    x, y, f = (torch.randn(steps_shape, dtype=dtype, requires_grad=True) for _ in range(3))
    beta_steps = torch.rand(steps_shape[2], args.dim, requires_grad=True)

    def call(op):
        def run():
            if op.startswith("steps"):
                gated = op == "steps-gated"
                out = small_state.SmallStateHGRN2Function.apply(
                    x, y, f, None, 1.0, False, None, False, None, beta_steps if gated else None, 1 if gated else None
                )[0]
                leaves = (x, y, f, beta_steps) if gated else (x, y, f)
            elif op == "plain":
                out = chunk.chunk_hgrn2(q, v, g, reverse=args.reverse)[0]
                leaves = (q, v, g)
            else:
                out = chunk.chunk_hgrn2_gated(
                    q, v, g, beta, output_gate="silu", precise_bound_grad=op == "gated-precise", reverse=args.reverse
                )[0]
                leaves = (q, v, g, beta)
            torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)

        return run

    if args.dump is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
    report = {}
    for op in args.op:
        rows = []
        for index, (kernel, signature, constants, options, attributes, _) in enumerate(capture(call(op))):
            dump = None if args.dump is None else args.dump / f"{op}-{index}-{kernel.__name__}"
            resource = resources(kernel, signature, constants, options, args.arch, attributes, dump)
            row = {"kernel": kernel.__name__} | resource
            rows.append(row)
            print(f"{op:14s} {row['kernel']:22s} regs {row['registers']:4d}  spilled {row['stack_bytes']:5d} B  "
                  f"shared {row['shared_bytes']:6d} B  warps {row['num_warps']}  "
                  f"SASS {row['instructions']:5d}")  # fmt: skip
            if args.opcodes:
                top = list(row["opcodes"].items())[: args.opcodes]
                print("    " + "  ".join(f"{name} {count}" for name, count in top))
        report[op] = rows
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

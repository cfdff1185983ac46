"""Two versions of the chunked HGRN2 kernels side by side on one CUDA GPU: accuracy against a float64 reference
and time of each kernel version (bf16, H = 8, K = V = 128), optionally fla's chunk_gla in the same process.

    python experiments/kernel_versions.py --old-root DIR [--fla] [--out report.json]
    python experiments/kernel_versions.py --profile          # one forward+backward per version, for ncu
    python experiments/kernel_versions.py --profile --profile-op plain --profile-shape 16 4096

DIR holds a copy of an earlier ``hgrn2.ops`` chunk package, importable as ``hgrn2_v2.ops.chunk``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hgrn2.ops import chunk as new  # noqa: E402
from hgrn2.ops.reference import hgrn2_recurrence_chunked  # noqa: E402

HEADS, DIM = 8, 128
SHAPES = ((16384, 1024), (16384, 4096), (16384, 16384), (65536, 4096))
# --variants: launch settings (hgrn2.ops.chunk.LAUNCH overrides) timed against each other
VARIANTS = {
    "deltas": dict(walk_programs_per_sm=float("inf")),  # v3: every chunk's delta at once, then the walk
    "walk": dict(walk_programs_per_sm=0.0),  # every shape through the walk that forms the deltas itself
    "walk-w8": dict(walk_programs_per_sm=0.0, walk_warps=8),
    "walk-t32": dict(walk_programs_per_sm=0.0, walk_tile=32, walk_warps=2),
    # settings under which the sm90 compile spills less (experiments/kernel_resources.py): the forward walk with
    # 8 warps or 32-wide tiles at 4 warps spills nothing; dq/d log λ over 32 values at a time spills 344 bytes
    # a thread instead of 544 (gated: 712 instead of 872)
    "walk-t32-w4": dict(walk_tile=32, walk_warps=4),
    "dqk-bv32": dict(dqk_bv=32),
    "dv-bv64": dict(dv_bv=64),
    # the walk from about one program per SM: 16K tokens at T = 2K and 4K, 64K at T = 8K and 16K, which the default
    # sends to the deltas path; v4 measured the walk 3-4% faster at T = 4K (16K tokens) when the chunk kernels
    # still formed the gates themselves, and slower for the gated entry
    "walk-from-1": dict(walk_programs_per_sm=0.9),
    # at most 128 registers a thread, so that two 8-warp programs fit an SM where shared memory allows (ncu with
    # Triton 3.6: dv 106 KB and dq/d log λ 90 KB a program, the output kernel 131 KB); the sm90 compile with
    # Triton 3.6 then spills 304 / 1,264 / 488 bytes a thread (dv / dq/d log λ / output, plain op)
    "dv-cap128": dict(dv_maxnreg=128),
    "dqk-cap128": dict(dqk_maxnreg=128),
    "cap128": dict(output_maxnreg=128, dqk_maxnreg=128, dv_maxnreg=128),
    # the score gradients' float32 operands in three TF32 passes instead of one: d β nearer the interpreter's
    # float32 result (3.0e-3 on an H100 against 1.5e-3 in the CPU test); the sm90 compile (Triton 3.8) of
    # dq/d log λ grows from 6,072 to 7,232 instructions, 600 to 840 spilled bytes a thread, 32 to 64 KB of shared
    # memory
    "tf32x3": dict(intra_precision="tf32x3"),
    # chunks of 32 steps: half the work between a chunk's own steps (T·C per head), twice the chunk states' bytes
    # and a walk twice as long; in the sm90 compile (Triton 3.6) dv needs no spill at 128 registers, the output
    # kernel 120 bytes a thread and dq/d log λ 672, so two programs of each can share an SM
    "c32": dict(chunk=32),
    # the walks' running sums of log λ in three bfloat16 parts whatever its dtype, as before the parts followed it
    # (bfloat16 log gates: one part; the gated entry's float16 log λ: two)
    "walk-three-parts": dict(walk_sum_parts=3),
    "c32-cap128": dict(chunk=32, output_maxnreg=128, dv_maxnreg=128),
    "c32-cap128-all": dict(chunk=32, output_maxnreg=128, dqk_maxnreg=128, dv_maxnreg=128),
    # K tiles of 32 in the chunk-parallel kernels: half of each [C, BK] tile live at once, the score tiles [C, C]
    # formed from twice as many tiles; in the sm90 compile (Triton 3.6), plain / gated precise: dq/d log λ
    # spills 152 / 160 bytes a thread (512 / 568 at 64), nothing with 32 values a step as well; the output kernel
    # needs 232 / 240 registers and no spill, and half the shared memory on the precise path (64 KB, was 128)
    "bk32": dict(output_bk=32, dqk_bk=32, dv_bk=32),
    "bk32-dqk-bv32": dict(output_bk=32, dqk_bk=32, dv_bk=32, dqk_bv=32),
    "dqk-bk32-bv32": dict(dqk_bk=32, dqk_bv=32),
    "out-bk32": dict(output_bk=32),
    "out-bk32-bv64": dict(output_bk=32, output_bv=64),
    # the chunk-parallel deltas in bfloat16 (half their bytes written and read) where few programs take that path
    "half-deltas": dict(half_deltas=True),
    "half-deltas-walk-from-1": dict(half_deltas=True, walk_programs_per_sm=0.9),
    # the gated entry's backward reads the forward's float32 log λ instead of forming it again
    "keep-log-forget": dict(keep_log_forget=True),
    # the gated entry's log λ for half-precision inputs stored in bfloat16 (the inputs' dtype) or in float32
    # instead of float16, the default since v15 (whose `half-log-forget` was the bfloat16 one)
    "half-log-forget": dict(log_forget_dtype="inputs"),
    "log-forget-f32": dict(log_forget_dtype="float32"),
    # 16 warps for the chunk-parallel kernels that run one 8-warp program per SM (registers or shared memory):
    # twice the warps to hide latency with. sm90 compile (Triton 3.6), plain op: output 128 registers, no spills
    # (249 at 8 warps); dq/d log λ 128 registers, 160 spilled bytes a thread (255 and 136 at 8 warps), gated 280
    # (312); dv 106 registers (128)
    "w16": dict(dqk_warps=16, output_warps=16, dv_warps=16),
    "dqk-w16": dict(dqk_warps=16),
    "out-w16": dict(output_warps=16),
    # the deltas path at every shape: every chunk's delta at once, then the elementwise walk; at 64K tokens
    # (T = 4K, 128 sequence-heads) its scan has 2M state elements to spread, where at 16K tokens and T = 16K it has
    # 131K
    "deltas-all": dict(walk_programs_per_sm=1e9),
    "half-deltas-all": dict(half_deltas=True, walk_programs_per_sm=1e9),
    "w16-half-deltas-all": dict(dqk_warps=16, output_warps=16, dv_warps=16, half_deltas=True, walk_programs_per_sm=1e9),
    # the walk, now that its running sums are matmuls (walk-from-1 above sends 16K tokens at T = 4K to it with 128
    # programs): twice the warps for its matmuls, three stages of loads, or state tiles of 32 (four times the
    # programs, each chunk's sums formed by each of four V tiles)
    "walk-warps8": dict(walk_warps=8),
    "walk-stages3": dict(walk_stages=3),
    "walk-tile32": dict(walk_tile=32),
    # software-pipeline stages of the chunk-parallel kernels (Triton's default is 3, for loops of 2 K tiles):
    # sm90 compile (Triton 3.6), plain op, registers / spilled bytes / shared memory: output 249 / 0 / 112 KB with
    # K tiles of 64 in three stages (`out-bk64`, the default until v15), 243 / 0 / 32 KB with one stage, 128 / 0 /
    # 24 KB with one stage, K tiles of 32 and a cap of 128 (two 8-warp programs an SM instead of one), 128 / 40 B /
    # 40 KB with two stages (`out-s2-bk32-cap128`, the default since v15); dq / d log λ 255 / 216 B / 88 KB by
    # default, 255 / 216 B / 32 KB with one stage
    "out-bk64": dict(output_stages=0, output_bk=64, output_maxnreg=0),
    "out-s1": dict(output_stages=1, output_bk=64, output_maxnreg=0),
    "out-s1-bk32-cap128": dict(output_stages=1, output_bk=32, output_maxnreg=128),
    "out-s2-bk32-cap128": dict(output_stages=2, output_bk=32, output_maxnreg=128),
    "out-s1-bk16-cap128": dict(output_stages=1, output_bk=16, output_maxnreg=128),
    "dqk-s1": dict(dqk_stages=1),
    "dv-s1-bk32": dict(dv_stages=1, dv_bk=32),
    "default": {},
}
VARIANT_SHAPES = SHAPES


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def inputs(batch, seq_len, gate_shift=2.0, dtype=torch.bfloat16):
    shape = (batch, seq_len, HEADS, DIM)
    q = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    g = F.logsigmoid(torch.randn(shape, device="cuda") + gate_shift).to(dtype).requires_grad_()
    return q, v, g


def fwd_bwd(fn, leaves):
    def run():
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def accuracy(op, dtype, gate_shift, batch=2, seq_len=2048, precise=None) -> dict:
    """Relative errors of o and every gradient against the float64 chunked reference."""
    torch.manual_seed(1)
    q, v, g = inputs(batch, seq_len, gate_shift, dtype)
    beta = torch.rand(HEADS, DIM, device="cuda", dtype=torch.float32, requires_grad=True)
    do = torch.randn_like(v)
    kwargs = {} if precise is None else {"precise_bound_grad": precise}
    o = op.chunk_hgrn2_gated(q, v, g, beta, output_gate="silu", **kwargs)[0]
    grads = torch.autograd.grad(o, [q, v, g, beta], do)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, v, g, beta)]
    from hgrn2.ops.gates import lower_bounded_log_forget

    qd, vd, fd, bd = ref_leaves
    ref = hgrn2_recurrence_chunked(F.silu(qd), vd, lower_bounded_log_forget(fd, bd), chunk_size=64)[0]
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    out = {"o": rel(o, ref)}
    for name, a, b in zip(("dq", "dv", "df", "dbeta"), grads, ref_grads):
        out[name] = rel(a, b)
    return out


def timing(op, tokens, seq_len) -> dict:
    q, v, g = inputs(tokens // seq_len, seq_len)
    beta = torch.rand(HEADS, DIM, device="cuda", requires_grad=True)
    plain = lambda: op.chunk_hgrn2(q, v, g)[0]  # noqa: E731
    gated = lambda: op.chunk_hgrn2_gated(q, v, g, beta, output_gate="silu")[0]  # noqa: E731
    times = {
        "fwd": ms(plain),
        "fwdbwd": ms(fwd_bwd(plain, [q, v, g])),
        "gated_fwdbwd": ms(fwd_bwd(gated, [q, v, g, beta])),
    }
    if op is new:  # the gated entry with the float32 path for the lower bound's gradient
        precise = lambda: op.chunk_hgrn2_gated(q, v, g, beta, output_gate="silu", precise_bound_grad=True)[0]  # noqa: E731
        times["gated_fwdbwd_precise"] = ms(fwd_bwd(precise, [q, v, g, beta]))
    return times


def fla_timing(tokens, seq_len) -> dict:
    from fla.ops.gla import chunk_gla

    q, v, g = inputs(tokens // seq_len, seq_len)
    k = (-torch.expm1(g.float())).to(torch.bfloat16).detach().requires_grad_()
    run = lambda: chunk_gla(q, k, v, g, scale=1.0)[0]  # noqa: E731
    return {"fwd": ms(run), "fwdbwd": ms(fwd_bwd(run, [q, k, v, g]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-root", help="folder holding the package hgrn2_v2 (an earlier version)")
    parser.add_argument("--fla", action="store_true", help="time fla's chunk_gla too")
    parser.add_argument("--profile", action="store_true", help="one forward+backward per version and exit")
    parser.add_argument("--profile-op", choices=("gated", "plain"), default="gated", help="the op --profile runs")
    parser.add_argument(
        "--profile-shape", type=int, nargs=2, default=(4, 4096), metavar=("B", "T"), help="--profile's batch and length"
    )
    parser.add_argument("--variants", action="store_true", help="time the launch settings of VARIANTS and exit")
    parser.add_argument("--only", help="comma-separated names of VARIANTS to time (default: all)")
    parser.add_argument("--out", help="JSON report")
    parser.add_argument(
        "--shapes", help="comma-separated TOKENSxT shapes that --variants times (default: all four), e.g. 65536x4096"
    )
    args = parser.parse_args()
    shapes = VARIANT_SHAPES
    if args.shapes:
        try:
            shapes = tuple(tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(","))
        except ValueError:
            parser.error(f"--shapes {args.shapes!r}: expected TOKENSxT[,TOKENSxT...], e.g. 65536x4096,16384x1024")
    if args.variants:
        time_variants(args.out, args.fla, args.only.split(",") if args.only else list(VARIANTS), shapes)
        return
    versions = {"new": new}
    if args.old_root:
        sys.path.insert(0, args.old_root)
        versions["old"] = importlib.import_module("hgrn2_v2.ops.chunk")
    if args.profile:
        q, v, g = inputs(*args.profile_shape)
        beta = torch.rand(HEADS, DIM, device="cuda", requires_grad=True)
        for op in versions.values():
            if args.profile_op == "plain":
                fwd_bwd(lambda op=op: op.chunk_hgrn2(q, v, g)[0], [q, v, g])()
            else:
                fwd_bwd(lambda op=op: op.chunk_hgrn2_gated(q, v, g, beta)[0], [q, v, g, beta])()
            torch.cuda.synchronize()
        return
    report = {"device": torch.cuda.get_device_name(0), "accuracy": {}, "timing": []}
    for name, op in versions.items():
        for dtype, shift in ((torch.bfloat16, 2.0), (torch.bfloat16, -1.0), (torch.float32, 2.0)):
            key = f"{name} {str(dtype)[6:]} shift {shift}"
            report["accuracy"][key] = accuracy(op, dtype, shift)
            print(key, {k: f"{e:.2e}" for k, e in report["accuracy"][key].items()}, flush=True)
    for tokens, seq_len in SHAPES:
        row = {"tokens": tokens, "T": seq_len}
        for name, op in versions.items():
            row[name] = timing(op, tokens, seq_len)
        if args.fla:
            row["fla"] = fla_timing(tokens, seq_len)
        report["timing"].append(row)
        print(json.dumps(row), flush=True)
    header = " | ".join(f"{n} fwd  f+b  gated f+b" for n in versions) + (" | fla fwd f+b" if args.fla else "")
    print("\ntokens     T | " + header)
    for row in report["timing"]:
        cells = [f"{row[n]['fwd']:6.3f} {row[n]['fwdbwd']:6.3f} {row[n]['gated_fwdbwd']:6.3f}" for n in versions]
        if args.fla:
            cells.append(f"{row['fla']['fwd']:6.3f} {row['fla']['fwdbwd']:6.3f}")
        print(f"{row['tokens']:6d} {row['T']:5d} | " + " | ".join(cells))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


def time_variants(out: str | None, with_fla: bool, names: list[str], shapes=VARIANT_SHAPES) -> None:
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    defaults = dict(new.LAUNCH)
    report = {"device": torch.cuda.get_device_name(0), "defaults": defaults, "variants": {}}
    for name in names:
        overrides = VARIANTS[name]
        new.LAUNCH.clear()
        new.LAUNCH.update(defaults | overrides)
        rows = []
        for tokens, seq_len in shapes:
            row = {"tokens": tokens, "T": seq_len, **timing(new, tokens, seq_len)}
            rows.append(row)
            print(name, json.dumps(row), flush=True)
        errors = accuracy(new, torch.bfloat16, 2.0, batch=4, seq_len=4096)
        print(name, {k: f"{e:.2e}" for k, e in errors.items()}, flush=True)
        report["variants"][name] = {"launch": dict(new.LAUNCH), "rows": rows, "accuracy": errors}
        if out:
            Path(out).write_text(json.dumps(report, indent=1))
    new.LAUNCH.clear()
    new.LAUNCH.update(defaults)
    if with_fla:  # fla last: its first call autotunes for minutes
        report["fla"] = [{"tokens": t, "T": s, **fla_timing(t, s)} for t, s in shapes]
        print("fla", json.dumps(report["fla"]), flush=True)
    for precise in (True, False):  # the lower bound's gradient with and without the float32 path, B = 4, T = 4096
        errors = accuracy(new, torch.bfloat16, 2.0, batch=4, seq_len=4096, precise=precise)
        report[f"accuracy precise={precise}"] = errors
        print(f"precise={precise}", {k: f"{e:.2e}" for k, e in errors.items()}, flush=True)
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    print("\nvariant      | " + " | ".join(f"{t // 1024}K T={s:5d} fwd  f+b gated precise" for t, s in shapes))
    for name, entry in report["variants"].items():
        cells = [
            f"{r['fwd']:6.3f} {r['fwdbwd']:6.3f} {r['gated_fwdbwd']:6.3f} {r['gated_fwdbwd_precise']:6.3f}"
            for r in entry["rows"]
        ]
        print(f"{name:12s} | " + " | ".join(cells))
    if with_fla:
        print(f"{'fla':12s} | " + " | ".join(f"{r['fwd']:6.3f} {r['fwdbwd']:6.3f}       " for r in report["fla"]))
        for name, entry in report["variants"].items():
            ratios = [
                f"{r['fwd'] / f['fwd']:.2f} {r['fwdbwd'] / f['fwdbwd']:.2f}"
                for r, f in zip(entry["rows"], report["fla"])
            ]
            print(f"{name:12s} / fla | " + " | ".join(ratios))


if __name__ == "__main__":
    main()

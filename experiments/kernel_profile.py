"""Per-kernel CUDA time of one forward+backward of the chunked kernels (bf16, H = 8, K = V = 128): the plain op,
the gated entry on its float32 path and on its half-precision path, from torch.profiler, as JSON.

    PYTHONPATH=$PWD python experiments/kernel_profile.py --tokens 16384 --seq-len 1024 --out profile.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from hgrn2.ops import chunk

HEADS, DIM = 8, 128


def kernels(fn, leaves, repeats: int) -> dict[str, float]:
    """Microseconds per call of each CUDA kernel that ``fn``'s forward+backward launches."""

    def step():
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0:
            times[event.key[:80]] += event.self_device_time_total / repeats
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--launch", nargs="*", default=[], metavar="KEY=VALUE", help="chunk.LAUNCH overrides, e.g. dqk_warps=16"
    )
    args = parser.parse_args()
    try:  # as experiments/kernel_resources.py: a bad setting is an error that names the keys and types
        args.launch = dict(chunk.launch_setting(item) for item in args.launch)
    except ValueError as error:
        parser.error(f"--launch {error}")
    chunk.LAUNCH.update(args.launch)
    shape = (args.tokens // args.seq_len, args.seq_len, HEADS, DIM)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = F.logsigmoid(torch.randn(shape, device="cuda") + 2).to(torch.bfloat16).requires_grad_()
    beta = torch.rand(HEADS, DIM, device="cuda", requires_grad=True)
    runs = {
        "plain": (lambda: chunk.chunk_hgrn2(q, v, g)[0], [q, v, g]),
        "gated_precise": (
            lambda: chunk.chunk_hgrn2_gated(q, v, g, beta, output_gate="silu", precise_bound_grad=True)[0],
            [q, v, g, beta],
        ),
        "gated_half": (
            lambda: chunk.chunk_hgrn2_gated(q, v, g, beta, output_gate="silu", precise_bound_grad=False)[0],
            [q, v, g, beta],
        ),
        "gated_no_bound": (lambda: chunk.chunk_hgrn2_gated(q, v, g, None, output_gate="silu")[0], [q, v, g]),
    }
    report = {
        "shape": list(shape), "device": torch.cuda.get_device_name(), "launch": args.launch, "us_per_call": {}
    }  # fmt: skip
    for name, (fn, leaves) in runs.items():
        report["us_per_call"][name] = kernels(fn, leaves, args.repeats)
        total = sum(report["us_per_call"][name].values())
        print(f"{name}: {total:.0f} us")
        for key, us in report["us_per_call"][name].items():
            print(f"  {us:8.1f}  {key}")
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()

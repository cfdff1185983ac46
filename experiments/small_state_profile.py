"""The step-by-step kernels at the 2-D LRA shapes: each scan of one four-direction layer timed alone, and the four
launched in turn, as JSON; with ``--ncu-once`` a single forward + backward for Nsight Compute to profile.

At Pathfinder-32's training shape (``--shape pathfinder``: batch 128, a 32 x 32 grid, 64 heads of 2 x 2, bf16, the
gated entry with a lower bound, as ``configs/lra/pathfinder.yaml``'s layers call it) one layer runs four scans: the
rows left to right and right to left (4,096 sequences of 32 steps), and the columns down and up (``columns=32``).
Each is timed with ``triton.testing.do_bench``, forward and forward + backward, and the bytes each moves are set
against the time, so that a kernel far from the bandwidth says so::

    PYTHONPATH=$PWD python experiments/small_state_profile.py --out small-state-kernels.json
    ncu --kernel-name regex:small_state --launch-count 8 --section SpeedOfLight --section WarpStateStats \\
        python experiments/small_state_profile.py --ncu-once
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hgrn2.ops import hgrn2_gated_recurrence

# (batch, grid height, grid width, heads, K = V): Pathfinder-32's layers, HGRN2-Tiny's 14 x 14 patches
SHAPES = {"pathfinder": (128, 32, 32, 64, 2), "vision": (128, 14, 14, 96, 2)}
ORDERS = ("rows", "rows reversed", "columns", "columns reversed")


def order_for(name: str, width: int) -> dict:
    """The ops' ``reverse`` and ``columns`` arguments of one of ``ORDERS`` on a grid ``width`` wide."""
    return {"reverse": name.endswith("reversed")} | ({"columns": width} if name.startswith("columns") else {})


def leaves(batch: int, height: int, width: int, heads: int, dim: int) -> list[torch.Tensor]:
    """q_proj, v, forget_proj [B, h·w, H, K] in bf16 and a float32 lower bound [H, K], all requiring grad."""
    torch.manual_seed(0)
    shape = (batch, height * width, heads, dim)
    tensors = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    tensors.append(torch.rand(heads, dim, device="cuda"))
    return [t.requires_grad_() for t in tensors]


def scan(inputs: list[torch.Tensor], order: dict, width: int) -> torch.Tensor:
    """One scan as ``HGRU2d`` runs it: the rows as B·h sequences of w steps (a view), the columns with
    ``columns=w``."""
    q_proj, v, forget_proj, beta = inputs
    batch, length = q_proj.shape[:2]
    if "columns" not in order:
        q_proj, v, forget_proj = (t.reshape(batch * length // width, width, *t.shape[2:]) for t in inputs[:3])
    o, _ = hgrn2_gated_recurrence(q_proj, v, forget_proj, beta, backend="recurrent", **order)
    return o.reshape(batch, length, *o.shape[2:])


def four_scans(inputs: list[torch.Tensor], width: int) -> torch.Tensor:
    """The sum of the four scans, launched one after another as ``HGRU2d`` launches them."""
    return sum(scan(inputs, order_for(name, width), width) for name in ORDERS)


def time_orders(shape_name: str) -> dict:
    import triton.testing

    batch, height, width, heads, dim = SHAPES[shape_name]
    inputs = leaves(batch, height, width, heads, dim)
    grad = torch.randn(batch, height * width, heads, dim, device="cuda", dtype=torch.bfloat16)
    element_bytes = inputs[0].numel() * inputs[0].element_size()
    rows = {}
    for name in ORDERS:
        order = order_for(name, width)
        forward = triton.testing.do_bench(lambda order=order: scan(inputs, order, width))
        both = triton.testing.do_bench(
            lambda order=order: torch.autograd.grad(scan(inputs, order, width), inputs, grad)
        )
        # forward: q_proj, v, f read, o written; backward: those three and do read, dq, dv, df written
        rows[name] = {
            "fwd_us": round(1e3 * forward, 1),
            "fwdbwd_us": round(1e3 * both, 1),
            "fwd_GBps": round(4 * element_bytes / forward / 1e6, 1),
            "bwd_GBps": round(7 * element_bytes / max(both - forward, 1e-6) / 1e6, 1),
        }

    both = triton.testing.do_bench(lambda: torch.autograd.grad(four_scans(inputs, width), inputs, grad))
    rows["all four, one after another"] = {
        "fwd_us": round(1e3 * triton.testing.do_bench(lambda: four_scans(inputs, width)), 1),
        "fwdbwd_us": round(1e3 * both, 1),
    }
    return {"shape": dict(zip(("batch", "height", "width", "heads", "dim"), SHAPES[shape_name])), "scans": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), nargs="+", default=list(SHAPES))
    parser.add_argument("--ncu-once", action="store_true", help="one forward + backward of the four scans, then exit")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: print only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("small_state_profile.py needs a CUDA device")
    if args.ncu_once:
        batch, height, width, heads, dim = SHAPES[args.shape[0]]
        inputs = leaves(batch, height, width, heads, dim)
        out = four_scans(inputs, width)
        torch.autograd.grad(out, inputs, torch.ones_like(out))
        torch.cuda.synchronize()
        return
    report = {"device": torch.cuda.get_device_name(0), "shapes": {name: time_orders(name) for name in args.shape}}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

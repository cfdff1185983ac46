"""Training throughput (images/s) of HGRN2-Tiny next to timm's DeiT-Tiny, measured in one run.

Each model trains on random 224-pixel images with bf16 autocast, AdamW and cross-entropy: a few warm-up steps
(the first is timed apart: it includes any kernel compilation), then ``--steps`` timed steps between CUDA
synchronisations. Results go to ``benchmarks/results/<gpu>-vision.json``.

    PYTHONPATH=$PWD python benchmarks/vision_throughput.py                       # on a GPU
    PYTHONPATH=$PWD python benchmarks/vision_throughput.py --device cpu --image-size 32 --batch-size 2 --steps 2 \
        --backend naive --out /tmp/vision.json                                  # a CPU smoke run
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import hgrn2  # noqa: F401  (registers the hgrn2 vision models with timm)
from datamodules.atomic import write_json_atomically
from hgrn2.ops import auto_backend, triton_available

HGRN2 = "hgrn2_vit_tiny_patch16_224"
BASELINE = "deit_tiny_patch16_224"
MEASURE_ARGS = ("device", "batch_size", "image_size", "steps", "warmup", "dtype", "compile_blocks", "compile_mode")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(
    name: str,
    device: torch.device,
    batch_size: int,
    image_size: int,
    dtype: torch.dtype | None,
    compile_blocks: bool = False,
    compile_mode: str | None = None,
    **model_kwargs,
) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """The model ``name`` and a function that trains it one step (bf16 autocast unless ``dtype`` is None, AdamW,
    cross-entropy) on one fixed batch of random images and returns the loss. ``compile_blocks``: each of the
    model's ``blocks`` through ``torch.compile`` (fewer, fused launches around the recurrence's kernels), in
    ``compile_mode`` (torch.compile's ``mode``, e.g. ``reduce-overhead`` for CUDA graphs; None: its default)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000, img_size=image_size, **model_kwargs).to(device).train()
    if compile_blocks:
        for block in model.blocks:
            block.compile(mode=compile_mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step() -> torch.Tensor:
        with autocast:
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def time_steps(step: Callable[[], torch.Tensor], device: torch.device, steps: int, warmup: int, name: str) -> dict:
    """Run ``step`` ``max(1, warmup)`` times, the first timed alone (it includes any kernel compilation), then
    ``steps`` times between synchronisations: ``first_step_s``, ``elapsed_s`` of the timed steps and the last
    ``loss``. A non-finite loss is an error naming ``name``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    loss = step()
    _sync(device)
    first_step_s = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"{name}: non-finite loss {loss.item()} during the benchmark")
    return {"first_step_s": first_step_s, "elapsed_s": elapsed, "loss": loss}


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated memory since :func:`time_steps` began (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def measure(
    name: str,
    device: torch.device,
    batch_size: int,
    image_size: int,
    steps: int,
    warmup: int,
    dtype: torch.dtype | None,
    compile_blocks: bool = False,
    compile_mode: str | None = None,
    **model_kwargs,
) -> dict:
    """Train ``name`` for ``warmup + steps`` steps on random data and return its throughput and memory."""
    model, step = training_step(
        name, device, batch_size, image_size, dtype, compile_blocks, compile_mode, **model_kwargs
    )
    timing = time_steps(step, device, steps, warmup, name)
    return {
        "model": name,
        "model_kwargs": model_kwargs,
        "compiled_blocks": compile_blocks,
        "compile_mode": compile_mode if compile_blocks else None,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "images_per_s": round(batch_size * steps / timing["elapsed_s"], 1),
        "step_ms": round(1e3 * timing["elapsed_s"] / steps, 2),
        "first_step_s": round(timing["first_step_s"], 2),
        "peak_memory_gib": peak_memory_gib(device),
    }


def measure_or_record(name: str, **kwargs) -> dict:
    """:func:`measure`, but an out-of-memory error is recorded in the result instead of ending the run."""
    try:
        return measure(name, **kwargs)
    except torch.cuda.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        model_kwargs = {k: v for k, v in kwargs.items() if k not in MEASURE_ARGS}
        return {"model": name, "model_kwargs": model_kwargs, "error": f"out of memory: {str(error).splitlines()[0]}"}


def device_slug(device: torch.device) -> str:
    """``nvidia-h100-80gb-hbm3`` style name for the result file (``cpu`` on the CPU)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument(
        "--expand-ratios", type=int, nargs="+", default=[2], help="HGRN2 expand ratios to time (2: the paper's)"
    )
    parser.add_argument("--backend", default="auto", help="recurrence backend: auto, triton, recurrent, torch or naive")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<gpu>-vision.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    common = dict(device=device, batch_size=args.batch_size, image_size=args.image_size, steps=args.steps)
    common.update(warmup=args.warmup, dtype=dtype)
    runs = [measure_or_record(HGRN2, expand_ratio=e, backend=args.backend, **common) for e in args.expand_ratios]
    runs.append(measure_or_record(BASELINE, **common))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        # what "auto" resolves to per expand ratio: the row and column scans are image_size / 16 patches long
        "recurrence_backend": args.backend
        if args.backend != "auto"
        else {str(e): auto_backend(triton_available(device), args.image_size // 16, e * e) for e in args.expand_ratios},
        "torch": torch.__version__,
        "timm": timm.__version__,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "timed_steps": args.steps,
        "runs": runs,
    }
    for run in runs:
        kwargs = ",".join(f"{k}={v}" for k, v in run["model_kwargs"].items())
        if "error" in run:
            print(f"{run['model']:28s} {kwargs:16s} {run['error']}")
        else:
            print(f"{run['model']:28s} {kwargs:16s} {run['images_per_s']:10.1f} img/s  {run['step_ms']:8.2f} ms/step")
    out = args.out or Path(__file__).parent / "results" / f"{device_slug(device)}-vision.json"
    write_json_atomically(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

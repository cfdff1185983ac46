"""Training throughput of the small-state models (ListOps, Pathfinder-32, HGRN2-Tiny) against their target rates.

The LRA and image models run HGRN2 with tiny per-head states (4 × 4 on ListOps, 2 × 2 on Pathfinder and the vision
model). Each job trains on one device with bf16 autocast on random inputs of the real shapes, already on the
device: a few warm-up steps (the first timed apart: it includes kernel compilation and autotuning), then
``--steps`` timed steps between synchronisations (each block of a model through ``torch.compile`` first where its
config's ``compile_blocks`` says so, ``configs/imagenet/hgrn2_tiny.yaml`` for the vision models, or for every
model with ``--compile``, for none with ``--no-compile``: the step then launches fewer, fused kernels). A step is
forward, backward and the optimizer step:

* ``listops`` and ``pathfinder`` build the LightningModule of ``configs/lra/{listops,pathfinder}.yaml`` from the
  file's ``model.init_args`` (batch size and ListOps length from its ``data.init_args``) and time the module's own
  ``training_step`` (loss and accuracy), the backward pass, and AdamW with the schedule ``configure_optimizers``
  builds. What the Trainer adds around them (moving batches, logging, the progress bar) is not timed.
* ``vision`` times ``hgrn2_vit_tiny_patch16_224`` and timm's ``deit_tiny_patch16_224`` in the same run, as
  ``vision_throughput.py`` does.

Each job records its rate against its target (ListOps 25 steps/s, Pathfinder 50 steps/s, HGRN2-Tiny
1,800 images/s, each at batch 128 in bf16; ``met`` is None when measured at other shapes) and the recurrence
backend that ran. ``--profile JOB`` then runs that job's step under torch.profiler and adds its kernels, by self
CUDA time (on the CPU: its operators, by self CPU time), to the job's entry. Results go to
``benchmarks/results/<gpu>-small-state.json``.

    PYTHONPATH=$PWD python benchmarks/small_state_throughput.py                       # on a GPU
    PYTHONPATH=$PWD python benchmarks/small_state_throughput.py --jobs listops --profile listops
    PYTHONPATH=$PWD python benchmarks/small_state_throughput.py --device cpu --dtype fp32 --batch-size 2 \\
        --seq-len 16 --grid-size 4 --image-size 32 --steps 2 --warmup 1 --out /tmp/small-state.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import importlib
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning
import timm
import torch
import yaml
from gpu_info import triton_cache_state
from torch.autograd import DeviceType
from vision_throughput import (
    BASELINE,
    HGRN2,
    _sync,
    device_slug,
    measure_or_record,
    peak_memory_gib,
    time_steps,
    training_step,
)

from datamodules.atomic import write_json_atomically
from hgrn2.models.lra import LRAConfig
from hgrn2.ops import auto_backend, triton_available
from lightning_modules.optim import OptimizerConfig, build_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lra"
LRA_CONFIGS = {"listops": CONFIGS / "listops.yaml", "pathfinder": CONFIGS / "pathfinder.yaml"}
JOBS = ("listops", "pathfinder", "vision")
# job -> (rate, target, shape the target is set at)
TARGETS = {
    "listops": ("steps_per_s", 25.0, {"batch_size": 128, "seq_len": 2000}),
    "pathfinder": ("steps_per_s", 50.0, {"batch_size": 128, "grid_size": [32, 32]}),
    "vision": ("images_per_s", 1800.0, {"batch_size": 128, "image_size": 224}),
}
VISION_EXPAND_RATIO = 2  # hgrn2_vit_tiny_patch16_224's own
VISION_CONFIG = CONFIGS.parent / "imagenet" / "hgrn2_tiny.yaml"  # whose compile_blocks the vision job follows


def scan_backend(backend: str, device: torch.device, scan_length: int, expand_ratio: int) -> str:
    """The recurrence backend a mixer runs for ``backend`` (what ``auto`` resolves to for scans of ``scan_length``
    steps and ``expand_ratio``² state elements per head on ``device``)."""
    if backend != "auto":
        return backend
    on_gpu = device.type == "cuda" and triton_available(device)
    return auto_backend(on_gpu, scan_length, expand_ratio * expand_ratio)


def with_target(job: str, result: dict, shape: dict, dtype: str) -> dict:
    """``result`` plus ``target``: the rate aimed at and whether it was met (None at other shapes or dtypes)."""
    rate, value, target_shape = TARGETS[job]
    at_target = shape == target_shape and dtype == "bf16" and "error" not in result
    met = result[rate] >= value if at_target else None
    return {**result, "target": {"rate": rate, "value": value, "shape": target_shape, "dtype": "bf16", "met": met}}


def load_lra_config(path: Path) -> tuple[dict, dict]:
    """``(model, data)`` sections of a ``hgrn2 fit`` config: ``class_path`` and ``init_args`` of each."""
    config = yaml.safe_load(path.read_text())
    return config["model"], config["data"]


def build_lra_module(model_section: dict, overrides: dict) -> torch.nn.Module:
    """The config's LightningModule, as LightningCLI builds it, with ``overrides`` added to its encoder's."""
    module_name, class_name = model_section["class_path"].rsplit(".", 1)
    init_args = dict(model_section["init_args"])
    init_args["overrides"] = {**(init_args.get("overrides") or {}), **overrides}
    if isinstance(init_args.get("optim"), dict):
        init_args["optim"] = OptimizerConfig(**init_args["optim"])
    return getattr(importlib.import_module(module_name), class_name)(**init_args)


def compiles_blocks(args: argparse.Namespace, model_section: dict) -> bool:
    """Whether a job puts its blocks through torch.compile: as the config's ``compile_blocks`` says (as ``hgrn2
    fit`` applies it), unless --compile / --no-compile says otherwise."""
    return args.compile if args.compile is not None else bool(model_section["init_args"].get("compile_blocks"))


def is_two_d(model_section: dict) -> bool:
    """Whether the config's encoder scans a pixel grid (its preset and overrides, as the module reads them)."""
    init_args = model_section["init_args"]
    return LRAConfig.from_name(init_args["preset"], **(init_args.get("overrides") or {})).two_d


def random_lra_batch(config: LRAConfig, batch_size: int, length: int, device: torch.device) -> dict:
    """A batch as the LRA datamodules give it: token ids with a full mask, or uint8 pixel levels."""
    labels = torch.randint(0, config.num_classes, (batch_size,), device=device)
    if config.embedding == "token":
        ids = torch.randint(1, config.vocab_size, (batch_size, length), device=device)  # [B, T]; id 0 pads
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels}
    channels = (config.in_channels,) if config.in_channels > 1 else ()
    pixels = torch.randint(0, 256, (batch_size, length, *channels), dtype=torch.uint8, device=device)  # [B, T(, C)]
    return {"input_ids": pixels, "labels": labels}


def lra_training_step(module, batch: dict, dtype: torch.dtype | None, total_steps: int) -> Callable[[], torch.Tensor]:
    """One ``hgrn2 fit`` step of ``module`` on ``batch``: ``training_step`` under autocast, backward, then AdamW and
    its schedule as ``configure_optimizers`` builds them (``build_optimizer``; ``total_steps`` when the config
    leaves the schedule's length to the Trainer)."""
    optimizers = build_optimizer(module.model, module.optim, total_steps)
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    autocast = torch.autocast(batch["labels"].device.type, dtype=dtype, enabled=dtype is not None)

    def step() -> torch.Tensor:
        with autocast:
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def profile_steps(step: Callable[[], torch.Tensor], device: torch.device, steps: int, top: int) -> dict:
    """``steps`` more training steps under torch.profiler: the ``top`` CUDA kernels by self CUDA time per step (on
    the CPU: operators by self CPU time), the time and number of all of them per step (``busy_ms_per_step``,
    ``calls_per_step``: launches, on a GPU) and the wall time per step. Busy time well under the wall time means the
    step waits on the host (launch overhead)."""
    on_gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    _sync(device)
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - start
    # record_function ranges (Optimizer.step, ...) also appear on the GPU's timeline, spanning the kernels they launch
    events = [event for event in profiler.key_averages() if not getattr(event, "is_user_annotation", False)]
    if on_gpu:
        rows = [event for event in events if event.device_type == DeviceType.CUDA]
        self_us = lambda event: event.self_device_time_total
    else:
        rows = events
        self_us = lambda event: event.self_cpu_time_total
    busy = sum(self_us(event) for event in rows) or 1
    rows.sort(key=self_us, reverse=True)
    return {
        "steps": steps,
        "sorted_by": "self CUDA time" if on_gpu else "self CPU time",
        "wall_ms_per_step": round(1e3 * wall / steps, 3),  # under the profiler, which adds to it
        "busy_ms_per_step": round(busy / 1e3 / steps, 3),
        "calls_per_step": round(sum(event.count for event in rows) / steps, 1),
        "kernels": [
            {
                "name": event.key[:200],
                "calls_per_step": round(event.count / steps, 2),
                "ms_per_step": round(self_us(event) / 1e3 / steps, 4),
                "percent": round(100 * self_us(event) / busy, 2),
            }
            for event in rows[:top]
        ],
    }


def lra_input_shape(config: LRAConfig, data_args: dict, seq_len: int | None = None) -> tuple[int, int, dict]:
    """``(length, scan length, shape)`` of an LRA model's inputs: a 2-D model's grid (its own, else the data's
    resolution squared; its rows are the longest scans), or the 1-D sequence (``seq_len``, else the data's
    ``max_length``)."""
    if config.two_d:
        grid = list(config.grid_size or (data_args["resolution"],) * 2)
        return grid[0] * grid[1], grid[1], {"grid_size": grid}  # rows of grid[1] pixels
    length = seq_len or data_args["max_length"]
    return length, length, {"seq_len": length}


def lra_job(job: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None) -> dict:
    """Time ``configs/lra/<job>.yaml``'s training step; ``steps_per_s`` (and ``tokens_per_s`` for 1-D tasks)."""
    model_section, data_section = load_lra_config(LRA_CONFIGS[job])
    data_args = data_section["init_args"]
    overrides = {"backend": args.backend} if args.backend else {}
    if args.grid_size and is_two_d(model_section):
        overrides["grid_size"] = (args.grid_size, args.grid_size)
    torch.manual_seed(0)
    module = build_lra_module(model_section, overrides)
    config = module.config
    length, scan_length, shape = lra_input_shape(config, data_args, args.seq_len)
    batch_size = args.batch_size or data_args["batch_size"]
    shape = {"batch_size": batch_size, **shape}
    module = module.to(device).train()
    compiled = compiles_blocks(args, model_section)
    if compiled:
        for block in module.model.blocks:
            block.compile(mode=args.compile_mode)
    batch = random_lra_batch(config, batch_size, length, device)
    step = lra_training_step(module, batch, dtype, total_steps=args.warmup + args.steps)
    with warnings.catch_warnings():  # training_step's self.log is a no-op outside a Trainer, and says so
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
        timing = time_steps(step, device, args.steps, args.warmup, job)
        memory = peak_memory_gib(device)
        profile = profile_steps(step, device, args.profile_steps, args.profile_top) if args.profile == job else None
    elapsed = timing["elapsed_s"]
    result = {
        "job": job,
        "config": str(LRA_CONFIGS[job].relative_to(CONFIGS.parents[1])),
        "init_args": model_section["init_args"],
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        **shape,
        "expand_ratio": config.expand_ratio,
        "recurrence_backend": scan_backend(config.backend, device, scan_length, config.expand_ratio),
        "fused": config.fused,
        "compiled_blocks": compiled,
        "compile_mode": args.compile_mode if compiled else None,
        "params_m": round(sum(p.numel() for p in module.parameters()) / 1e6, 3),
        "steps_per_s": round(args.steps / elapsed, 2),
        "step_ms": round(1e3 * elapsed / args.steps, 2),
        "first_step_s": round(timing["first_step_s"], 2),
        "peak_memory_gib": memory,
    }
    if not config.two_d:
        result["tokens_per_s"] = round(batch_size * length * args.steps / elapsed, 1)
    if profile is not None:
        result["profile"] = profile
    return with_target(job, result, shape, args.dtype)


def vision_job(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None) -> dict:
    """HGRN2-Tiny and DeiT-Tiny in one run; ``images_per_s`` is HGRN2-Tiny's."""
    image_size, batch_size = args.image_size, args.batch_size or 128
    backend = args.backend or "auto"
    compiled = compiles_blocks(args, load_lra_config(VISION_CONFIG)[0])
    common = dict(device=device, batch_size=batch_size, image_size=image_size, dtype=dtype)
    common |= dict(compile_blocks=compiled, compile_mode=args.compile_mode)
    timing = dict(steps=args.steps, warmup=args.warmup)
    hgrn2_kwargs = dict(expand_ratio=VISION_EXPAND_RATIO, backend=backend)
    runs = [
        measure_or_record(HGRN2, **common, **timing, **hgrn2_kwargs),
        measure_or_record(BASELINE, **common, **timing),
    ]
    ours, baseline = runs
    result = {
        "job": "vision",
        "batch_size": batch_size,
        "image_size": image_size,
        "expand_ratio": VISION_EXPAND_RATIO,
        # the row and column scans are image_size / 16 patches long
        "recurrence_backend": scan_backend(backend, device, image_size // 16, VISION_EXPAND_RATIO),
        "images_per_s": ours.get("images_per_s"),
        "baseline": BASELINE,
        "baseline_images_per_s": baseline.get("images_per_s"),
        "runs": runs,
    }
    if "error" in ours:
        result["error"] = ours["error"]
    elif "error" not in baseline:
        result["speed_vs_baseline"] = round(ours["images_per_s"] / baseline["images_per_s"], 3)
    if args.profile == "vision":
        _, step = training_step(HGRN2, **common, **hgrn2_kwargs)  # the step vision_throughput.measure times
        time_steps(step, device, 0, args.warmup, HGRN2)
        result["profile"] = profile_steps(step, device, args.profile_steps, args.profile_top)
    return with_target("vision", result, {"batch_size": batch_size, "image_size": image_size}, args.dtype)


def run_job(job: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None) -> dict:
    """One job; running out of memory is recorded in its entry instead of ending the run."""
    try:
        return vision_job(args, device, dtype) if job == "vision" else lra_job(job, args, device, dtype)
    except torch.cuda.OutOfMemoryError as error:
        return {"job": job, "error": f"out of memory: {str(error).splitlines()[0]}"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def summary(result: dict) -> str:
    if "error" in result:
        return f"{result['job']:11s} {result['error']}"
    rate, value, _ = TARGETS[result["job"]]
    met = {True: "met", False: "missed", None: "not at the target's shape"}[result["target"]["met"]]
    line = f"{result['job']:11s} {result[rate]:10.2f} {rate.replace('_per_s', '/s'):9s} target {value:g} ({met})"
    return f"{line}  backend {result['recurrence_backend']}"


def parse_jobs(text: str) -> list[str]:
    jobs = [job.strip() for job in text.split(",") if job.strip()]
    unknown = [job for job in jobs if job not in JOBS]
    if unknown or not jobs:
        raise argparse.ArgumentTypeError(f"jobs must be a comma-separated subset of {','.join(JOBS)}, got {text!r}")
    return jobs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=parse_jobs, default=list(JOBS), help="comma-separated: " + ",".join(JOBS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="every job's (default: the configs', 128)")
    parser.add_argument("--seq-len", type=int, default=None, help="ListOps length (default: the config's, 2000)")
    parser.add_argument("--grid-size", type=int, default=None, help="Pathfinder side (default: the config's, 32)")
    parser.add_argument("--image-size", type=int, default=224, help="of the vision job")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile each block of every model (DeiT-Tiny's too), or with --no-compile none; default: as "
        "each config's compile_blocks says (configs/imagenet/hgrn2_tiny.yaml's for both vision models)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile's mode for the compiled blocks, e.g. reduce-overhead (CUDA graphs); default: its own",
    )
    parser.add_argument(
        "--backend", default=None, help="recurrence backend for every job (default: the configs' own, auto if unset)"
    )
    parser.add_argument("--profile", choices=JOBS, default=None, help="profile this job's step after timing it")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--profile-top", type=int, default=30, help="kernels kept in the profile")
    parser.add_argument(
        "--prefetch",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="steps ahead that the step-by-step kernels load each step's inputs (hgrn2.ops.small_state.PREFETCH; "
        "default: its value)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<gpu>-small-state.json")
    args = parser.parse_args(argv)
    for name in ("steps", "profile_steps", "profile_top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    device = torch.device(args.device)
    cache = triton_cache_state()  # first-step times include compilation only when it was empty
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:  # the step-by-step kernels, where Triton is installed
        step_kernels = importlib.import_module("hgrn2.ops.small_state")
    except ImportError:
        step_kernels = None
    if args.prefetch is not None and step_kernels is not None:
        step_kernels.PREFETCH = args.prefetch
    jobs = []
    for job in args.jobs:
        try:
            jobs.append(run_job(job, args, device, dtype))
        except Exception as error:  # recorded whole, and the other jobs still run; the exit status says so
            trace = traceback.format_exc()
            print(trace, file=sys.stderr, flush=True)
            jobs.append({"job": job, "error": f"failed: {type(error).__name__}: {error}", "traceback": trace})
        print(summary(jobs[-1]), flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "triton_cache": cache,
        "dtype": args.dtype,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "step_kernel_prefetch": step_kernels.PREFETCH if step_kernels is not None else None,
        "all_targets_met": all(job.get("target", {}).get("met") is True for job in jobs),
        "jobs": jobs,
    }
    out = args.out or Path(__file__).parent / "results" / f"{device_slug(device)}-small-state.json"
    write_json_atomically(out, result)
    print(f"wrote {out}")
    failed = [job["job"] for job in jobs if "traceback" in job]
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed (tracebacks above and in {out})")
    return result


if __name__ == "__main__":
    main()

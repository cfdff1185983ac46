"""Does the LRA model learn? ListOps and Pathfinder-32 drawn by the real generators, a few minutes of training each.

    PYTHONPATH=$PWD python experiments/lra_learning.py --out experiments/results --tasks listops     # ~5 minutes
    PYTHONPATH=$PWD python experiments/lra_learning.py --out experiments/results --tasks pathfinder  # ~7 minutes

1. generates ListOps with the LRA algorithm (20,000 train, 2,000 validation, 2,000 held-out test expressions of
   500-2,000 tokens) and Pathfinder-32 with the Linsley et al. algorithm (40,000 images, split 80/10/10);
2. trains the paper's model for each (the ``listops`` and ``pathfinder`` presets, paper batch sizes and peak learning
   rates, bf16) for ``--minutes`` of wall-clock time each: the step count of a time-boxed run is unknown in
   advance, so the learning rate warms up over the first 10 % of the time and then follows a cosine to 0 at the
   end of the budget (the paper: 5,000 / 50,000 warm-up steps in cosine schedules of 50,000 / 500,000 steps, of
   which its 50 / 100 epochs train 37,500 / 125,000);
3. scores the last model on the held-out test split and writes ``<out>/<gpu>-lra.json`` with the accuracies, the
   chance and majority-class baselines, the data sizes and the settings (a task run alone replaces only its own
   entry, so the two runs above fill one file; generated data under ``--data-dir`` are reused when present).

Training longer than one call allows: ``--checkpoint-dir D --total-minutes M`` lays the schedule over M minutes
of training and saves ``D/<task>.ckpt`` (model, optimiser, schedule position, elapsed time) at the end of every
call; the next call with the same arguments resumes from it and trains ``--minutes`` more, until M is reached::

    python experiments/lra_learning.py --tasks pathfinder --minutes 8 --total-minutes 24 --checkpoint-dir ckpt  # x3

Validation accuracy is printed after every epoch and kept (across calls) in the JSON's ``curve``. ``--batch-size``
and ``--lr`` change the paper's batch and peak learning rate (``--clip`` adds gradient-norm clipping,
``--precision 32-true`` trains in float32, ``--overrides`` changes the model); ``--tag T`` names such a
variant, so that two variants (one per GPU) keep their own checkpoint ``<task>-T.ckpt`` and JSON entry
``<task>-T`` in one file.
``--prepare-only`` draws the data and exits, so that two training processes can then share it.

A curriculum: ``--pathfinder-contour-length 6`` trains on the release's easiest difficulty (``curv_baseline``),
and ``--init-from <its checkpoint>`` starts a length-14 run from those weights with a fresh optimiser and schedule::

    python experiments/lra_learning.py --tasks pathfinder --pathfinder-contour-length 6 --tag c6 --checkpoint-dir ckpt
    python experiments/lra_learning.py --tasks pathfinder --tag from-c6 --init-from ckpt/pathfinder-c6.ckpt

Needs only torch, lightning, torchmetrics, numpy and PIL (no jsonargparse). ``--tiny`` checks the whole path on
the CPU in about a minute with small data and a small model.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from benchmarks.gpu_info import gpu_name
from datamodules.atomic import write_json_atomically
from datamodules.lra import ListOpsDataModule, PathfinderDataModule
from datamodules.lra.generate_listops import ListOpsSpec, write_listops
from datamodules.lra.generate_pathfinder import write_pathfinder
from datamodules.lra.pathfinder_snakes import difficulty_folder
from lightning_modules.init_from import load_model_weights
from lightning_modules.optim import OptimizerConfig
from lightning_modules.resume import LoopProgress, RNGStates
from lightning_modules.sequence_classifier import SequenceClassifier

PAPER_REFERENCE = {"listops": 60.52}  # HGRN2 paper, LRA ListOps test accuracy (%), official data, 50 epochs
PEAK_LR = {"listops": 5e-4, "pathfinder": 2e-3}  # run_lra.py
BATCH_SIZE = {"listops": 128, "pathfinder": 128}  # run_lra.py total batch


class WallClockCosine(pl.Callback):
    """Sets the learning rate before every step: linear warm-up over ``warmup_fraction`` of ``budget_s`` seconds
    of training, then a cosine to 0 at the end of the budget. The training time spent so far is saved in
    checkpoints, so that a resumed run continues the schedule where it stopped."""

    def __init__(self, peak_lr: float, budget_s: float, warmup_fraction: float = 0.1):
        self.peak_lr, self.budget_s, self.warmup_fraction = peak_lr, budget_s, warmup_fraction
        self.start: float | None = None
        self.elapsed_before = 0.0  # training seconds of earlier calls (from the checkpoint)

    def elapsed_s(self) -> float:
        return self.elapsed_before + (0.0 if self.start is None else time.monotonic() - self.start)

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed_s(), "budget_s": self.budget_s}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["budget_s"] != self.budget_s:
            raise ValueError(
                f"the checkpoint's schedule spans {state_dict['budget_s']:.0f} s of training, this run's "
                f"{self.budget_s:.0f} s: resume with the same --total-minutes"
            )
        self.elapsed_before = state_dict["elapsed_s"]

    def factor(self, elapsed_s: float) -> float:
        progress = min(1.0, elapsed_s / self.budget_s)
        if progress < self.warmup_fraction:
            return progress / self.warmup_fraction
        return 0.5 * (1.0 + math.cos(math.pi * (progress - self.warmup_fraction) / (1.0 - self.warmup_fraction)))

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.monotonic()

    def on_train_end(self, trainer, pl_module) -> None:  # stop the clock: evaluation is not training time
        self.elapsed_before, self.start = self.elapsed_s(), None

    def lr(self, elapsed_s: float) -> float:
        """The learning rate after ``elapsed_s`` seconds of training."""
        return self.peak_lr * self.factor(elapsed_s)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # set before every step: the module's own per-step scheduler (constant) resets it after each step
        lr = self.lr(self.elapsed_s())
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr


class LearningCurve(pl.Callback):
    """Prints and keeps, after every validation epoch, the step, the training time, the learning rate and the
    validation accuracy and loss. The points of earlier calls are saved in checkpoints and carried on."""

    def __init__(self, label: str, schedule: WallClockCosine, print_every: int = 200):
        self.label, self.schedule, self.print_every = label, schedule, print_every
        self.points: list[dict] = []
        self._loss_sum: torch.Tensor | None = None  # training loss summed on the device since the last print
        self._window = (0, 0.0)  # (step, training seconds) at the last print

    def state_dict(self) -> dict:
        return {"points": self.points}

    def load_state_dict(self, state_dict: dict) -> None:
        self.points = list(state_dict["points"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        step, elapsed = trainer.global_step, self.schedule.elapsed_s()
        if self.print_every <= 0 or step % self.print_every:
            return
        last_step, last_elapsed = self._window
        steps = step - last_step
        if 0 < steps <= step and elapsed > last_elapsed:  # the first window after a resume starts at the resume
            rate = steps / (elapsed - last_elapsed)
            lr = self.schedule.lr(elapsed)
            print(
                f"[{self.label}] step {step} trained_s {elapsed:.0f} steps/s {rate:.2f} lr {lr:.3g} "
                f"train_loss {float(self._loss_sum) / steps:.4f}",
                flush=True,
            )
        self._loss_sum, self._window = None, (step, elapsed)

    def on_train_start(self, trainer, pl_module) -> None:
        self._loss_sum, self._window = None, (trainer.global_step, self.schedule.elapsed_s())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        point = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "trained_s": round(self.schedule.elapsed_s(), 1),
            "lr": float(f"{self.schedule.lr(self.schedule.elapsed_s()):.3g}"),
            "val_acc": round(100 * float(metrics["val/acc"]), 2),
            "val_loss": round(float(metrics["val/loss"]), 4),
        }
        if "train/loss" in metrics:
            point["train_loss"] = round(float(metrics["train/loss"]), 4)
        self.points.append(point)
        print(f"[{self.label}] " + " ".join(f"{k} {v}" for k, v in point.items()), flush=True)


class ProfileSteps(pl.Callback):
    """Profiles ``count`` training steps from the ``offset``-th step of this call (counted from the step a
    resumed run starts at) with torch.profiler and prints the operators that took the most device time (CPU time
    without a GPU)."""

    def __init__(self, offset: int = 20, count: int = 10):
        self.offset, self.count = offset, count
        self.first = -1
        self.profiler = None

    def on_train_start(self, trainer, pl_module) -> None:  # after a checkpoint's global step is restored
        self.first = trainer.global_step + self.offset

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.profiler is None or trainer.global_step != self.first + self.count:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._started
        self.profiler.__exit__(None, None, None)
        sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60)
        print(f"profile of steps {self.first}..{self.first + self.count - 1}: {wall / self.count * 1e3:.1f} ms a step")
        print(table, flush=True)
        self.profiler = None
        self.first = -1  # once

    def on_train_end(self, trainer, pl_module) -> None:  # training stopped inside the window: print nothing
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None


def prepare_listops(root: Path, sizes: dict[str, int], spec: ListOpsSpec, workers: int, seed: int) -> dict:
    """Generate (or reuse) the ListOps splits; returns what was done."""
    data_dir = root / f"listops-{sizes['train']}-{spec.min_length}-{spec.max_length}-s{seed}"
    start = time.perf_counter()
    reused = all((data_dir / f"basic_{split}.tsv").exists() for split in ("train", "val", "test"))
    if not reused:
        write_listops(data_dir, sizes["train"], sizes["val"], sizes["test"], spec, seed=seed, workers=workers)
    return {
        "data_dir": str(data_dir),
        "sizes": sizes,
        "spec": dataclasses.asdict(spec),
        "reused": reused,
        "generation_s": round(time.perf_counter() - start, 1),
    }


def prepare_pathfinder(root: Path, images: int, workers: int, seed: int, contour_length: int = 14) -> dict:
    """Generate (or reuse) Pathfinder-32 images with target snakes of ``contour_length`` dashes (14: the LRA
    task; 6 and 9: the release's easier difficulties); returns what was done."""
    length_tag = "" if contour_length == 14 else f"c{contour_length}-"
    out_root = root / f"pathfinder-{length_tag}{images}-s{seed}"
    data_dir = out_root / "pathfinder32"
    start = time.perf_counter()
    difficulty = difficulty_folder(contour_length)
    metadata = data_dir / difficulty / "metadata"
    reused = metadata.is_dir() and sum(len(p.read_text().splitlines()) for p in metadata.glob("*.npy")) == images
    if not reused:
        write_pathfinder(
            out_root,
            resolution=32,
            images=images,
            images_per_batch=1000,
            seed=seed,
            workers=workers,
            contour_length=contour_length,
        )
    return {
        "data_dir": str(data_dir),
        "difficulty": difficulty,
        "contour_length": contour_length,
        "images": images,
        "reused": reused,
        "generation_s": round(time.perf_counter() - start, 1),
    }


def _trained_seconds(checkpoint: Path | None) -> float:
    """Training seconds a checkpoint holds (0 without one); raises a clear error on an unreadable file."""
    if checkpoint is None or not checkpoint.exists():
        return 0.0
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        return float(state["callbacks"]["WallClockCosine"]["elapsed_s"])
    except Exception as error:
        raise SystemExit(
            f"cannot resume from {checkpoint}: {type(error).__name__}: {error}. Delete it to start over."
        ) from None


def load_initial_weights(model: pl.LightningModule, checkpoint: Path) -> dict:
    """Load the model weights of another run's checkpoint into ``model`` (a fresh optimiser and schedule follow);
    returns where they came from. Refuses a checkpoint of a different architecture, naming the mismatch."""
    try:
        state = load_model_weights(model, checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--init-from: {error}") from None
    points = state.get("callbacks", {}).get("LearningCurve", {}).get("points", [])
    last = points[-1] if points else None
    return {"checkpoint": str(checkpoint), "steps": state.get("global_step"), "last_val": last}


def run_label(task: str, tag: str | None) -> str:
    """The name of a run: the task, or ``<task>-<tag>`` for a variant."""
    return task if not tag else f"{task}-{tag}"


def train_and_test(task: str, data: pl.LightningDataModule, overrides: dict, args) -> dict:
    """Train ``task``'s preset for ``args.minutes`` (resuming from ``args.checkpoint_dir`` when it holds a
    checkpoint of the run) and score it on the test split."""
    pl.seed_everything(args.seed, workers=True)
    budget_s = 60.0 * (args.total_minutes or args.minutes)
    label = run_label(task, args.tag)
    checkpoint = None if args.checkpoint_dir is None else args.checkpoint_dir / f"{label}.ckpt"
    trained_before_s = _trained_seconds(checkpoint)
    call_s = min(60.0 * args.minutes, budget_s - trained_before_s)
    if call_s <= 0:
        raise SystemExit(f"{checkpoint} has trained the whole {budget_s / 60:g} minutes: nothing left to train")
    model = SequenceClassifier(
        task,
        overrides=overrides,
        optim=OptimizerConfig(lr=args.peak_lrs[task], weight_decay=0.0, betas=(0.9, 0.999), schedule="constant"),
    )
    schedule = WallClockCosine(args.peak_lrs[task], budget_s)
    curve = LearningCurve(label, schedule, args.print_every)
    callbacks = [schedule, curve, RNGStates(), LoopProgress()]  # a resumed call goes on exactly, as `hgrn2 fit`'s
    if args.profile:
        callbacks.append(ProfileSteps(args.profile))
    initialised_from = None
    if args.init_from is not None:
        if trained_before_s == 0:
            initialised_from = load_initial_weights(model, args.init_from)
            print(f"[{label}] weights from {initialised_from}", flush=True)
        else:  # a resumed run carries on from its own weights
            initialised_from = {"checkpoint": str(args.init_from), "loaded_by_an_earlier_call": True}
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=100_000,
        max_time={"seconds": trained_before_s + call_s},  # Lightning's timer counts earlier calls too
        gradient_clip_val=args.clip,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=args.data_dir,
    )
    start = time.perf_counter()
    resume = checkpoint if trained_before_s > 0 else None
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    train_s = time.perf_counter() - start
    if checkpoint is not None:  # written beside, then renamed: a cut-off save never replaces a good checkpoint
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        partial = checkpoint.with_suffix(".ckpt.tmp")
        trainer.save_checkpoint(partial)
        os.replace(partial, checkpoint)
    val = trainer.validate(model, datamodule=data, verbose=False)[0]
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    labels = data.splits["test"].labels
    counts = np.bincount(labels, minlength=model.config.num_classes)
    return {
        "test_acc": round(100 * test["test/acc"], 2),
        "test_loss": round(test["test/loss"], 4),
        "val_acc": round(100 * val["val/acc"], 2),
        "chance_acc": round(100 / model.config.num_classes, 2),
        "majority_class_acc": round(100 * counts.max() / counts.sum(), 2),
        "paper_test_acc": PAPER_REFERENCE.get(task),
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "train_s": round(train_s, 1),
        "trained_s": round(schedule.elapsed_s(), 1),
        "budget_s": budget_s,
        "resumed_from_s": round(trained_before_s, 1),
        **({"initialised_from": initialised_from} if initialised_from else {}),
        "curve": curve.points,
        "batch_size": data.batch_size,
        "precision": args.precision,
        "split_sizes": {split: len(dataset) for split, dataset in data.splits.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": dataclasses.asdict(model.config),
        "seed": args.seed,
        "optimizer": {
            "name": "AdamW",
            "peak_lr": args.peak_lrs[task],
            "weight_decay": 0.0,
            "betas": [0.9, 0.999],
            "schedule": "linear warm-up over 10% of the time budget, then cosine to 0 at its end",
            "gradient_clip_norm": args.clip,
        },
    }


def apply_settings(args) -> tuple[ListOpsSpec, dict[str, dict]]:
    """The ListOps spec and each task's LRAConfig overrides for ``args``; sets ``args.batch_sizes`` and
    ``args.peak_lrs`` (the paper's, or ``--batch-size`` / ``--lr``) and, with ``--tiny``, the data sizes."""
    spec, overrides = ListOpsSpec(), {"listops": {}, "pathfinder": {}}
    args.batch_sizes, args.peak_lrs = dict(BATCH_SIZE), dict(PEAK_LR)
    if args.tiny:
        spec = ListOpsSpec(min_length=20, max_length=120)
        args.listops_train, args.listops_val, args.listops_test = 400, 50, 100
        args.pathfinder_images, args.minutes = 150, min(args.minutes, 0.3)
        args.batch_sizes.update(listops=32, pathfinder=32)
        overrides["listops"] = {"hidden_size": 32, "num_layers": 2, "glu_hidden_size": 32}
        overrides["pathfinder"] = {"hidden_size": 16, "num_layers": 2, "glu_hidden_size": 16}
    if args.batch_size is not None:
        args.batch_sizes = dict.fromkeys(args.batch_sizes, args.batch_size)
    if args.lr is not None:
        args.peak_lrs = dict.fromkeys(args.peak_lrs, args.lr)
    for task_overrides in overrides.values():
        task_overrides.update(args.overrides, backend=args.backend)
    return spec, overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results"), help="folder for <gpu>-lra.json")
    parser.add_argument("--data-dir", type=Path, default=Path("runs/lra_learning"), help="generated data go here")
    parser.add_argument("--tasks", nargs="+", default=["listops", "pathfinder"], choices=["listops", "pathfinder"])
    parser.add_argument("--minutes", type=float, default=4.0, help="training time per task in this call")
    parser.add_argument(
        "--total-minutes", type=float, default=None, help="schedule length across calls (default: --minutes)"
    )
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="resume from and save <dir>/<task>.ckpt (several calls)"
    )
    parser.add_argument("--listops-train", type=int, default=20_000)
    parser.add_argument("--listops-val", type=int, default=2_000)
    parser.add_argument("--listops-test", type=int, default=2_000)
    parser.add_argument("--pathfinder-images", type=int, default=40_000)
    parser.add_argument(
        "--pathfinder-contour-length",
        type=int,
        default=14,
        choices=[6, 9, 14],
        help="target snake length: 14 is LRA's Pathfinder; 6 and 9 are the release's easier difficulties",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from the model weights of another run's checkpoint (e.g. one trained on an easier difficulty)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generator and loader processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="instead of the paper's batch size")
    parser.add_argument("--lr", type=float, default=None, help="instead of the paper's peak learning rate")
    parser.add_argument(
        "--overrides", type=json.loads, default={}, help='LRAConfig fields as JSON, e.g. \'{"norm": "layernorm"}\''
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=["bf16-mixed", "32-true"],
        help="Lightning precision (default: bf16-mixed on a GPU, 32-true on the CPU)",
    )
    parser.add_argument("--clip", type=float, default=None, help="clip the gradients' global norm to this")
    parser.add_argument("--tag", default=None, help="names a variant: its checkpoint and JSON entry <task>-<tag>")
    parser.add_argument("--print-every", type=int, default=200, help="steps between progress lines (0: none)")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile 10 steps from the N-th of this call, print top ops"
    )
    parser.add_argument("--prepare-only", action="store_true", help="draw (or check) the data, then exit")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized data and model: checks the path end to end")
    parser.add_argument(
        "--backend", default="auto", help="recurrence backend of the encoders (hgrn2.ops.BACKENDS), e.g. recurrent"
    )
    args = parser.parse_args(argv)
    if args.tag is not None and not args.tag.replace("-", "").replace("_", "").isalnum():
        parser.error(f"--tag names files: use letters, digits, '-' and '_', got {args.tag!r}")
    if not isinstance(args.overrides, dict):
        parser.error(f"--overrides must be a JSON object of LRAConfig fields, got {args.overrides!r}")
    for name in ("batch_size", "lr", "clip"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.accelerator = "gpu" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.precision is None:
        args.precision = "bf16-mixed" if args.accelerator == "gpu" else "32-true"
    torch.set_float32_matmul_precision("high")
    spec, overrides = apply_settings(args)
    loader_workers = min(8, max(0, args.workers - 1))
    started = time.perf_counter()
    report = {
        "device": torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "precision": args.precision,
        "tiny": args.tiny,
        "command": " ".join(sys.argv),
        "tasks": {},
    }
    for task in args.tasks:
        if task == "listops":
            sizes = {"train": args.listops_train, "val": args.listops_val, "test": args.listops_test}
            generated = prepare_listops(args.data_dir, sizes, spec, args.workers, args.seed)
            data = ListOpsDataModule(
                generated["data_dir"], args.batch_sizes[task], spec.max_length, num_workers=loader_workers
            )
        else:
            generated = prepare_pathfinder(
                args.data_dir, args.pathfinder_images, args.workers, args.seed, args.pathfinder_contour_length
            )
            data = PathfinderDataModule(
                generated["data_dir"],
                batch_size=args.batch_sizes[task],
                difficulty=generated["difficulty"],
                num_workers=loader_workers,
            )
        print(f"[{task}] data ready: {generated}", flush=True)
        if args.prepare_only:
            continue
        label = run_label(task, args.tag)
        result = {"command": " ".join(sys.argv), "data": generated, **train_and_test(task, data, overrides[task], args)}
        report["tasks"][label] = result
        baselines = f"chance {result['chance_acc']} %, majority class {result['majority_class_acc']} %"
        print(f"[{label}] test accuracy {result['test_acc']} % ({baselines}) after {result['steps']} steps", flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    if not args.prepare_only:
        write_report(report, args.out / f"{gpu_name()}-lra.json")
    return report


def write_report(report: dict, path: Path) -> None:
    """Add ``report``'s runs to the JSON at ``path`` (runs of other tasks or variants, written by earlier calls or
    by a process beside this one, stay), atomically and under a lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".json.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            previous = json.loads(path.read_text())
            report = {**report, "tasks": {**previous.get("tasks", {}), **report["tasks"]}}
        write_json_atomically(path, report)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()

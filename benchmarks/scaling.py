"""Throughput and memory of the HGRN2 LM trained under DDP or FSDP on N devices.

Trains the ``374m`` LM preset (``--preset``) at T = 2048 in bf16-mixed for ``--steps`` optimizer steps under
``--strategy ddp|fsdp`` (``--checkpointing``: activation checkpointing per block) on ``--devices`` GPUs
(``--num-nodes`` hosts), then writes ``benchmarks/results/<gpu>x<N>-<strategy>[-ckpt].json`` (``<gpu>`` is H100
or H200 from the device name, N = devices × nodes; other presets get a ``<preset>-`` prefix) with:

* ``tokens_per_s_per_gpu``: steady state, over the steps after ``--timing-warmup`` (default 10);
* ``peak_memory_gib_per_gpu``: ``torch.cuda.max_memory_allocated`` of each rank (and the reserved memory);
* ``first_step_s``: the first optimizer step (Triton compilation, FSDP's lazy init) and ``setup_s``, the time
  from the start of ``main`` to the first batch (tokenising the corpus, building and wrapping the model);
* ``final_loss``: the last step's loss averaged over ranks, and ``losses``, every step's.

Data: the embedded standard-library corpus, byte tokens (ids < 257) in the preset's 50272-entry vocabulary, as
``configs/lm/374m.yaml`` does: nothing is downloaded and the embedding and LM head cost what a GPT-2 vocabulary
costs. Recipe: AdamW(0.9, 0.98), lr 3e-4 with ``--lr-warmup`` steps of warm-up and cosine decay to 10% at
``--steps``, weight decay 0.1, gradient clipping at 1.0.

Batch: ``--global-batch`` sequences per optimizer step (default 16); each device runs micro-batches of
``--batch-per-device`` (default 8) and accumulates global / (per-device × N) of them. The text datamodule deals
step n's global batch out of the same shuffled order for any number of ranks, and every run starts from the
same weights (``--seed``), so one GPU (accumulating 2 micro-batches) and two GPUs see the same sequences in the
same steps and their losses are comparable.

Uses Lightning's Trainer directly (no LightningCLI), so the GPU machine needs only torch, lightning,
torchmetrics, numpy and timm; Lightning starts the other ranks itself::

    PYTHONPATH=$PWD python benchmarks/scaling.py --devices 1 --strategy ddp
    PYTHONPATH=$PWD python benchmarks/scaling.py --devices 2 --strategy fsdp --checkpointing

CPU check of the whole path (FSDP needs GPUs in Lightning)::

    PYTHONPATH=$PWD python benchmarks/scaling.py --preset tiny --accelerator cpu --devices 2 --strategy ddp \\
        --precision 32-true --seq-len 256 --steps 6 --timing-warmup 2 --out-dir /tmp/scaling
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch
from gpu_info import gpu_name

from datamodules.atomic import write_json_atomically
from datamodules.text import TextDataModule
from lightning_modules.causal_lm import CausalLM
from lightning_modules.optim import OptimizerConfig

STRATEGIES = ("ddp", "fsdp")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def result_path(out_dir: Path, preset: str, gpu: str, world: int, strategy: str, checkpointing: bool) -> Path:
    prefix = "" if preset == "374m" else f"{preset}-"
    return out_dir / f"{prefix}{gpu}x{world}-{strategy}{'-ckpt' if checkpointing else ''}.json"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ScalingMonitor(pl.Callback):
    """Times optimizer steps (device-synchronised at the few boundaries it measures), sums each step's loss
    over its micro-batches, and gathers memory and losses from every rank at the end of training."""

    def __init__(self, steps: int, timing_warmup: int, started: float):
        self.steps, self.timing_warmup, self.started = steps, timing_warmup, started
        self.step_losses: list[torch.Tensor] = []
        self._loss: torch.Tensor | None = None
        self._last_step = 0
        self.first_batch_at = self.first_step_s = self.window_start = self.window_end = None
        self.summary: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch_at is None:
            _synchronize(pl_module.device)
            self.first_batch_at = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning divides each micro-batch's loss by accumulate_grad_batches: their sum is the step's mean
        loss = outputs["loss"].detach().float()
        self._loss = loss if self._loss is None else self._loss + loss
        if trainer.global_step == self._last_step:
            return  # still accumulating
        self._last_step = trainer.global_step
        self.step_losses.append(self._loss)
        self._loss = None
        if trainer.global_step in (1, self.timing_warmup, self.steps):
            _synchronize(pl_module.device)
            now = time.perf_counter()
            if trainer.global_step == 1:
                self.first_step_s = now - self.first_batch_at
            if trainer.global_step == self.timing_warmup:
                self.window_start = now
            if trainer.global_step == self.steps:
                self.window_end = now

    def on_train_end(self, trainer, pl_module) -> None:
        strategy, device = trainer.strategy, pl_module.device
        losses = strategy.reduce(torch.stack(self.step_losses), reduce_op="mean")  # [steps], mean over ranks
        if device.type == "cuda":
            memory = torch.tensor(
                [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)], device=device
            )
            memory = strategy.all_gather(memory).reshape(-1, 2).cpu() / 2**30  # [world, 2] GiB
            allocated, reserved = memory[:, 0].tolist(), memory[:, 1].tolist()
        else:
            allocated = reserved = None
        self.summary = {
            "losses": [round(v, 5) for v in losses.tolist()],
            "final_loss": round(float(losses[-1]), 5),
            "first_step_s": round(self.first_step_s, 3),
            "setup_s": round(self.first_batch_at - self.started, 3),
            "measured_s": self.window_end - self.window_start,
            "peak_memory_gib_per_gpu": None if allocated is None else [round(v, 3) for v in allocated],
            "peak_reserved_gib_per_gpu": None if reserved is None else [round(v, 3) for v in reserved],
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="374m", help="LM preset (hgrn2.models.lm.PRESETS)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--devices", type=int, default=1, help="devices per node")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--timing-warmup", type=int, default=10, help="steps left out of the throughput")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-per-device", type=int, default=8, help="sequences per micro-batch and device")
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step, all devices")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--lr-warmup", type=int, default=10, help="learning-rate warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="token cache (default $HGRN2_DATA_CACHE or ~/.cache)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    world = args.devices * args.num_nodes
    if min(args.devices, args.num_nodes, args.batch_per_device, args.seq_len) < 1:
        raise ValueError("--devices, --num-nodes, --batch-per-device and --seq-len must be >= 1")
    if args.global_batch % (args.batch_per_device * world):
        raise ValueError(
            f"--global-batch {args.global_batch} is not a multiple of --batch-per-device {args.batch_per_device} × "
            f"{world} devices; pass --global-batch {args.batch_per_device * world} (or a multiple of it)"
        )
    if not 1 <= args.timing_warmup < args.steps:
        raise ValueError(f"need 1 <= --timing-warmup < --steps, got {args.timing_warmup} and {args.steps}")
    return args


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    world = args.devices * args.num_nodes
    accumulate = args.global_batch // (args.batch_per_device * world)
    pl.seed_everything(args.seed)
    optim = OptimizerConfig(
        lr=args.lr,
        weight_decay=0.1,
        betas=(0.9, 0.98),
        warmup_steps=args.lr_warmup,
        schedule="cosine",
        min_lr_ratio=0.1,
        total_steps=args.steps,
    )
    module = CausalLM(args.preset, overrides={"gradient_checkpointing": args.checkpointing}, optim=optim)
    parameters = module.model.num_parameters()
    data = TextDataModule(
        dataset="stdlib",
        tokenizer="byte",
        seq_len=args.seq_len,
        batch_size=args.batch_per_device,
        num_workers=args.num_workers,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    monitor = ScalingMonitor(args.steps, args.timing_warmup, started)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        max_steps=args.steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(module, datamodule=data)
    summary = dict(monitor.summary)
    measured_s = summary.pop("measured_s")
    tokens_per_step = args.global_batch * args.seq_len
    tokens_per_s = (args.steps - args.timing_warmup) * tokens_per_step / measured_s
    result = {
        "benchmark": "scaling",
        "preset": args.preset,
        "parameters": parameters,
        "strategy": args.strategy,
        "checkpointing": args.checkpointing,
        "devices": args.devices,
        "num_nodes": args.num_nodes,
        "world_size": trainer.world_size,
        "gpu": gpu_name(),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "precision": args.precision,
        "seq_len": args.seq_len,
        "batch_per_device": args.batch_per_device,
        "global_batch": args.global_batch,
        "accumulate_grad_batches": accumulate,
        "tokens_per_step": tokens_per_step,
        "steps": args.steps,
        "timing_warmup": args.timing_warmup,
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_per_gpu": round(tokens_per_s / trainer.world_size, 1),
        "step_s": round(measured_s / (args.steps - args.timing_warmup), 4),
        **summary,
        "peak_memory_gib": max(allocated) if (allocated := summary["peak_memory_gib_per_gpu"]) else None,
        "data": "stdlib corpus, byte tokens (ids < 257) in the preset's vocabulary",
        "recipe": {"lr": args.lr, "lr_warmup": args.lr_warmup, "weight_decay": 0.1, "clip": 1.0, "seed": args.seed},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "cuda": torch.version.cuda,
        },
        "command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]),
    }
    if trainer.is_global_zero:
        ranks = trainer.world_size
        path = result_path(args.out_dir, args.preset, result["gpu"], ranks, args.strategy, args.checkpointing)
        write_json_atomically(path, result, indent=1)
        brief = {k: result[k] for k in ("tokens_per_s_per_gpu", "peak_memory_gib", "first_step_s", "final_loss")}
        print(f"{path}: {json.dumps(brief)}", flush=True)
    return result


if __name__ == "__main__":
    main()

"""Optimiser and learning-rate schedule shared by every LightningModule.

AdamW with weight decay on matrices only (no decay on norms, biases, embeddings or the lower-bound
parameters), and a per-step schedule: linear warm-up, then cosine, inverse square root, linear or constant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("cosine", "inverse_sqrt", "linear", "constant")


@dataclass
class OptimizerConfig:
    """AdamW and schedule settings; ``total_steps=None`` takes the Trainer's estimate."""

    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    total_steps: int | None = None
    fused: bool | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices of Linear/Conv layers decay; everything else (norms, biases,
    embeddings, lower bounds, positional tables) does not."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))  # tied weights appear twice
            is_matrix = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and name == "weight"
            (decay if is_matrix else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_multiplier(step: int, config: OptimizerConfig, total_steps: int | Callable[[], int]) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based). ``total_steps`` (or the function giving it) is
    needed only after the warm-up."""
    warmup = config.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    if step <= warmup:  # the decay has not begun: 1 whatever the length
        return 1.0
    total = total_steps() if callable(total_steps) else total_steps
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = config.min_lr_ratio
    if config.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: OptimizerConfig, total_steps: int | Callable[[], int]) -> dict:
    """What ``configure_optimizers`` returns: AdamW plus a LambdaLR stepped every optimizer step.

    ``total_steps`` may be a function (see :func:`deferred_total_steps`), called once, the first time the schedule
    needs the length, past the warm-up."""
    fused = config.fused
    if fused is None:
        fused = all(p.is_cuda for p in model.parameters())
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.lr,
        betas=tuple(config.betas),
        eps=config.eps,
        fused=fused or None,
    )
    total = config.total_steps or (functools.cache(total_steps) if callable(total_steps) else total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def estimated_total_steps(trainer) -> int:
    """The Trainer's estimate of optimizer steps for the whole fit (at least 1)."""
    try:
        return max(1, int(trainer.estimated_stepping_batches))
    except (RuntimeError, ValueError, TypeError, AttributeError, OverflowError):
        return 1


def deferred_total_steps(trainer) -> Callable[[], int]:
    """:func:`estimated_total_steps`, asked for when the schedule first needs it, in training.

    ``configure_optimizers`` runs before a resumed fit restores its checkpoint, and with ``max_epochs`` set the
    Trainer's estimate sets up the training data to count its batches. Lightning then keeps that loader and never
    gives it the position saved in the checkpoint (Lightning issue #20550): the resumed fit would start its epoch
    from the first batch again. Asked for in training, the estimate reads the loader the fit loop set up after the
    restore."""
    return functools.partial(estimated_total_steps, trainer)


def training_steps_per_epoch(trainer) -> int | None:
    """Optimizer steps in one training epoch, with the Trainer's ``limit_train_batches`` and
    ``accumulate_grad_batches``, counted on a training loader of the datamodule's own: not the fit loop's, for the
    reason :func:`deferred_total_steps` gives. Without a datamodule (loaders given to ``fit``), the Trainer's
    estimate over ``max_epochs``, which a resumed fit pays for with the restart of its epoch. None when unknown."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        if not trainer.max_epochs or trainer.max_epochs < 1:
            return None
        return max(1, estimated_total_steps(trainer) // trainer.max_epochs)
    try:
        batches = len(datamodule.train_dataloader())
    except (TypeError, NotImplementedError):
        return None
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


# Lightning >= 2.6 resumes checkpoints with torch.load(weights_only=True): hyper-parameters that hold an
# OptimizerConfig must be on the allow-list to load.
torch.serialization.add_safe_globals([OptimizerConfig])

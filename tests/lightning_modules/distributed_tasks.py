"""``python -m tests.lightning_modules.distributed_tasks OUT_DIR``: the image and sequence classifiers trained
for a few steps by two CPU processes under DDP and then under FSDP (with activation checkpointing), from the
same initial weights and batches. Each fit writes its per-rank records (``StepRecorder``) to
``OUT_DIR/<task>-<strategy>/records/``; the test compares them.

The first Trainer starts the second process, which runs this module from the top as rank 1; the later
Trainers reuse the same two processes and process group.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_modules.cli import close_process_group
from lightning_modules.image_classifier import ImageClassifier
from lightning_modules.optim import OptimizerConfig
from lightning_modules.sequence_classifier import SequenceClassifier
from tests.lightning_modules.distributed_helpers import CPUFSDPStrategy, StepRecorder

STEPS, BATCH_PER_RANK, NUM_CLASSES = 3, 2, 4
OPTIM = OptimizerConfig(lr=1e-2, betas=(0.9, 0.999), warmup_steps=1)


class _TokenDicts(Dataset):
    """LRA-style batches: ``input_ids [T]`` and ``labels``."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.labels[index]}


def image_task(checkpointing: bool) -> tuple[pl.LightningModule, Dataset]:
    model_kwargs = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, backend="naive")
    module = ImageClassifier(
        "hgrn2_vit_tiny_patch16_224", NUM_CLASSES, model_kwargs, OPTIM, gradient_checkpointing=checkpointing
    )
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 1, 16, 16, generator=generator)  # [N, C, H, W]
    return module, TensorDataset(images, torch.randint(0, NUM_CLASSES, (16,), generator=generator))


def sequence_task(checkpointing: bool) -> tuple[pl.LightningModule, Dataset]:
    # LayerNorm: FSDP keeps BatchNorm running statistics per rank where DDP broadcasts rank 0's, so with BatchNorm
    # the two would evaluate differently (not a fault of either)
    overrides = {"hidden_size": 16, "num_layers": 2, "num_classes": NUM_CLASSES, "norm": "layernorm"}
    module = SequenceClassifier("listops", {**overrides, "gradient_checkpointing": checkpointing}, OPTIM)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, 16, (16, 24), generator=generator)  # [N, T]
    return module, _TokenDicts(tokens, torch.randint(0, NUM_CLASSES, (16,), generator=generator))


def fit(task, strategy_name: str, out_dir: Path) -> None:
    pl.seed_everything(0)
    module, dataset = task(checkpointing=strategy_name == "fsdp")
    strategy = CPUFSDPStrategy() if strategy_name == "fsdp" else "ddp"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=STEPS,
        limit_val_batches=2,
        val_check_interval=STEPS,
        num_sanity_val_steps=0,
        gradient_clip_val=0.1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StepRecorder(str(out_dir / f"{task.__name__}-{strategy_name}" / "records"))],
    )
    loader = DataLoader(dataset, batch_size=BATCH_PER_RANK)
    trainer.fit(module, loader, DataLoader(dataset, batch_size=BATCH_PER_RANK))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for task in (image_task, sequence_task):
        for strategy_name in ("ddp", "fsdp"):
            fit(task, strategy_name, out)
    close_process_group()

"""Pieces the multi-process tests name in their configs (``class_path: tests.lightning_modules...``).

* :class:`CPUFSDPStrategy`: Lightning's ``FSDPStrategy`` on CPU processes (gloo), for tests only. Lightning
  refuses ``strategy="fsdp"`` without a GPU and passes FSDP the device index (``None`` on the CPU), which
  FSDP reads as "find an accelerator"; FSDP itself shards on the CPU when given ``device_id=cpu``.
* :class:`StepRecorder`: writes, per rank, how the model was wrapped, every training step's loss and the
  rows it read, and the validation metrics, as JSON lines under ``out_dir``.
* :class:`CountingTextDataModule`: a ``TextDataModule`` that leaves a marker file each time ``prepare_data``
  runs, so a test can count the processes that built the token cache.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import enable_wrap

from datamodules.text import TextDataModule


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` whose FSDP units live on the CPU (``device_id=cpu``); the LightningModule must wrap its
    modules in ``configure_model`` (ours do), since Lightning's own root wrapping would pass no device."""

    @contextmanager
    def model_sharded_context(self):
        with enable_wrap(
            wrapper_cls=FullyShardedDataParallel,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        ):
            yield


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _checkpoints(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an HGRN2 model that recomputes its blocks' activations (its config's field)."""
    return getattr(getattr(module, "config", None), "gradient_checkpointing", False) is True


class StepRecorder(pl.Callback):
    """Per rank in ``out_dir``: ``setup-rank<r>.jsonl`` (FSDP units and checkpoint wrappers in the module),
    ``train-rank<r>.jsonl`` (step, loss, the input rows) and ``val-rank<r>.jsonl`` (step and every logged
    ``val/*`` metric)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def _path(self, trainer: pl.Trainer, kind: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / f"{kind}-rank{trainer.global_rank}.jsonl"

    def on_train_start(self, trainer, pl_module) -> None:
        modules = list(pl_module.modules())
        record = {
            "world_size": trainer.world_size,
            "fsdp_units": sum(isinstance(m, FullyShardedDataParallel) for m in modules),
            "checkpoint_wrappers": sum(isinstance(m, CheckpointWrapper) for m in modules),
            "grad_checkpointing": any(_checkpoints(m) for m in modules),
        }
        _append(self._path(trainer, "setup"), record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        inputs = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        record = {"step": trainer.global_step, "loss": float(outputs["loss"]), "rows": inputs.flatten(1).tolist()}
        _append(self._path(trainer, "train"), record)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        _append(self._path(trainer, "val"), {"step": trainer.global_step, **metrics})


class CountingTextDataModule(TextDataModule):
    """``TextDataModule`` that records each ``prepare_data`` call as ``prepare_data-rank<r>-pid<p>`` in
    ``cache_dir`` and each split a rank opens as ``opened-<split>-rank<r>`` (holding the cache file's path)."""

    def _rank(self) -> int:
        return 0 if self.trainer is None else self.trainer.global_rank

    def prepare_data(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / f"prepare_data-rank{self._rank()}-pid{os.getpid()}").touch()
        super().prepare_data()

    def _open(self, split: str) -> None:
        super()._open(split)
        (self.cache_dir / f"opened-{split}-rank{self._rank()}").write_text(str(self.tokens[split].filename))

"""The folders a fit writes to, checked before it trains.

A checkpoint folder that cannot be written would otherwise be found at the first save, after the steps before it
were trained and lost; a log folder, in Lightning's setup with a bare ``OSError``. ``hgrn2 fit`` checks both
before the Trainer starts and adds :class:`OutputFolderCheck`, which checks the checkpoint folders again once
Lightning has resolved them (a ModelCheckpoint without a ``dirpath`` writes under the logger's or the root folder).
"""

from __future__ import annotations

import lightning.pytorch as pl

from datamodules.atomic import check_writable_folder


def check_output_folders(trainer: pl.Trainer) -> None:
    """Create and write a file in every checkpoint callback's folder that is known and every logger's folder, or
    fail with a ValueError naming the folder and the fix."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None):
            fix = "set the ModelCheckpoint's dirpath (or trainer.default_root_dir) to a folder you can write"
            check_writable_folder(callback.dirpath, "checkpoint", fix)
    for logger in trainer.loggers:
        if getattr(logger, "save_dir", None):
            fix = f"set the {type(logger).__name__}'s save_dir to a folder you can write"
            check_writable_folder(logger.save_dir, "log", fix)


class OutputFolderCheck(pl.Callback):
    """:func:`check_output_folders` before the first training step, on the process that writes checkpoints."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            check_output_folders(trainer)

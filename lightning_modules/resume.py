"""Exact resume: the random generators' states travel with the checkpoint, and the loop's counters stay right.

Dropout and drop-path draw from Python's, NumPy's and torch's global generators in every training step. A fit
resumed from a checkpoint gets back the weights, the optimiser, the schedule and (``datamodules.resumable``) the
data position, but without this would draw different random numbers from the first step on. :class:`RNGStates`
saves every rank's generators with the checkpoint and puts them back just before the first training step after
the restore; ``hgrn2 fit`` adds it to every run. The loaders take no numbers from these generators
(``datamodules.resumable``), so the states saved after step n are those step n + 1 starts from.

:class:`LoopProgress` keeps Lightning's progress counters true across restores (:func:`start_next_epoch_afresh`,
:func:`repair_loop_progress`). Lightning resumes a checkpoint written at an epoch's last batch (``last.ckpt``
every n steps, n dividing the epoch) with the next epoch but, still marked as restarted mid-epoch, neither counts
that epoch as started nor calls ``on_train_epoch_start`` for it. Every checkpoint written inside that epoch and the
later ones then reads as one written after an epoch's end: where ``max_steps`` is unset, a fit resumed from it does
not restart (``FitLoop.restarting``), so it never gives the loader its position, starts the epoch's batches from the
first and validates that many steps late, and leaves counts behind that make a later resume train an epoch's last
batch again and repeat its validation. ``hgrn2 fit`` adds it to every run too.
"""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn


def generator_states() -> dict:
    """The states of Python's, NumPy's, torch's CPU and (where there is one) the current CUDA device's generators."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    # plain lists and tensors: Lightning reads checkpoints with torch.load(weights_only=True), which refuses arrays
    numpy_state = (kind, keys.tolist(), position, has_gauss, gauss)
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_generator_states(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def start_next_epoch_afresh(trainer: pl.Trainer) -> None:
    """Has a fit resumed from a checkpoint written at an epoch's last batch start its next epoch as an
    uninterrupted fit does: counted as started, with ``on_train_epoch_start`` called.

    Run after ``FitLoop.reset``, which counts the checkpoint's epoch as processed and completed but leaves the loop
    marked as restarted mid-epoch; ``FitLoop.on_advance_start`` would then skip the next epoch's start.
    """
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress.current
    if fit_loop.restarted_mid_epoch and epochs.processed == epochs.ready:
        fit_loop.reset_restart_stage()


def repair_loop_progress(fit_loop_state: dict) -> None:
    """Puts right, in place, the counters that fits resumed without :func:`start_next_epoch_afresh` left in a
    checkpoint's ``loops.fit_loop``, for a checkpoint written at a training batch's end (as ``every_n_train_steps``
    writes them): an epoch not counted as started (ready and started equal to processed, as after an epoch's end)
    and trained batches never counted as completed (``total``'s processed ahead of its completed by more than the
    batch being written). With them right, Lightning resumes the checkpoint as the mid-epoch position, or the
    epoch's end, that it is."""
    epochs, batches = fit_loop_state.get("epoch_progress"), fit_loop_state.get("epoch_loop.batch_progress")
    if epochs is None or batches is None:
        return
    in_flight = batches["current"]["processed"] - batches["current"]["completed"]  # 1 at a training batch's end
    if in_flight != 1:
        return
    total = batches["total"]
    total["completed"] = total["processed"] - in_flight
    for counts in (epochs["total"], epochs["current"]):
        if counts["ready"] == counts["started"] == counts["processed"]:
            counts["ready"] = counts["started"] = counts["processed"] + 1


class LoopProgress(pl.Callback):
    """Keeps Lightning's progress counters true across restores (the module's docstring): repairs those an earlier
    resume left in a checkpoint before the loops read them, and starts the next epoch afresh after a checkpoint
    written at an epoch's last batch."""

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # callbacks are restored before the loops, which then read the repaired counters
        if "fit_loop" in checkpoint.get("loops", {}):
            repair_loop_progress(checkpoint["loops"]["fit_loop"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start_next_epoch_afresh(trainer)


class RNGStates(pl.Callback):
    """Saves the global generators' states of every rank in checkpoints and restores them at the first training
    step of a resumed fit."""

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        states = generator_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every_rank, states)  # every rank builds the checkpoint
            return {"ranks": every_rank}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict) -> None:
        ranks = state_dict["ranks"]
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if len(ranks) != world:
            rank_zero_warn(
                f"the checkpoint holds the random generators of {len(ranks)} processes, this run has {world}: "
                "they are not restored, so dropout draws differ from the interrupted run's"
            )
            return
        self._pending = ranks[rank]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._pending is not None:
            set_generator_states(self._pending)
            self._pending = None

"""Exact resume: the random generators' states travel with the checkpoint.

Dropout and drop-path draw from Python's, NumPy's and torch's global generators in every training step. A fit
resumed from a checkpoint gets back the weights, the optimiser, the schedule and (``datamodules.resumable``) the
data position, but without this would draw different random numbers from the first step on. :class:`RNGStates`
saves every rank's generators with the checkpoint and puts them back just before the first training step after
the restore; ``hgrn2 fit`` adds it to every run. The loaders take no numbers from these generators
(``datamodules.resumable``), so the states saved after step n are those step n + 1 starts from.
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

"""A callback for the kill-and-resume tests: records each step's loss exactly and the global step of each
validation, saves the final weights, and can kill its own process with SIGKILL after a given step (a crash: nothing
runs after it)."""

from __future__ import annotations

import json
import os
import signal

import lightning.pytorch as pl
import torch


class ResumeProbe(pl.Callback):
    def __init__(self, losses: str, weights: str, kill_after: int | None = None):
        self.losses, self.weights, self.kill_after = losses, weights, kill_after

    def record(self, entry: dict) -> None:
        with open(self.losses, "a", encoding="utf-8") as file:  # flushed at once: the kill may come next
            file.write(json.dumps(entry) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.record({"step": trainer.global_step, "loss": float(loss).hex()})
        if self.kill_after is not None and trainer.global_step >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:  # the check before training, which only an unresumed fit runs
            self.record({"validated": trainer.global_step})

    def on_train_end(self, trainer, pl_module):
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.weights)

"""The ``hgrn2`` command: a LightningCLI in subclass mode.

A YAML config (``--config configs/...``) or ``--model`` / ``--data`` flags pick the LightningModule and
LightningDataModule classes by name, e.g. ``model: CausalLM``; ``fit``, ``validate``, ``test`` and
``predict`` come from Lightning, and multi-GPU from ``--trainer.strategy`` / ``--trainer.devices``.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import datamodules  # noqa: F401  (imported so that config files can name its classes)
import lightning_modules  # noqa: F401


class HGRN2CLI(LightningCLI):
    """LightningCLI with the project's defaults; see ``hgrn2 --help``."""


def main(args: list[str] | None = None) -> None:
    HGRN2CLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Train and evaluate HGRN2 models (LM, images, Long Range Arena, MQAR)."},
        args=args,
    )


if __name__ == "__main__":
    main()

"""Start a fit from the model weights of another run's checkpoint (a curriculum, or fine-tuning).

A LightningModule with an ``init_from`` argument loads that checkpoint's ``state_dict`` in its ``setup("fit")``:
the optimiser, schedule and step count start fresh. A fit that resumes (``--ckpt_path``) restores its own
weights over them, and needs the file only where the strategy restores after wrapping the model (FSDP).
``validate``, ``test``, ``predict`` and ``load_from_checkpoint`` never read it, so a checkpoint trained this way
loads after the first one is gone::

    hgrn2 fit --config configs/lra/pathfinder_grid_conv_c14.yaml \\
        --model.init_args.init_from runs/pathfinder_c6/checkpoints/last.ckpt
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_model_weights(module: nn.Module, checkpoint: str | Path) -> dict:
    """Load the ``state_dict`` of a Lightning checkpoint into ``module``, every key and shape matching.

    Returns the whole checkpoint (``global_step``, callback states, ...), so that callers read it once.

    Raises:
        FileNotFoundError: no file at ``checkpoint``.
        ValueError: the file is not a readable checkpoint, holds no ``state_dict``, or its weights are those
            of another architecture (the message names the missing, unexpected and mis-shaped keys).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"init_from {path}: no such file; give the .ckpt file a fit saved (--model.init_args.init_from PATH)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(
            f"init_from {path}: cannot read it as a checkpoint ({type(error).__name__}: {error}); "
            "it may be truncated or not a file torch.save wrote"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ValueError(f"init_from {path}: holds no 'state_dict'; give a checkpoint saved by a Lightning fit")
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"init_from {path}: its weights are another architecture's; start from a checkpoint of the same "
            f"preset and overrides. {error}"
        ) from None
    return state

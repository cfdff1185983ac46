"""Start a fit from the model weights of another run's checkpoint (a curriculum, or fine-tuning).

A LightningModule with an ``init_from`` argument loads that checkpoint's ``state_dict`` in its ``setup("fit")``:
the optimiser, schedule and step count start fresh. A fit that resumes (``--ckpt_path``) restores its own
weights over them, and needs the file only where the strategy restores after wrapping the model (FSDP).
``validate``, ``test``, ``predict`` and ``load_from_checkpoint`` never read it, so a checkpoint trained this way
loads after the first one is gone::

    hgrn2 fit --config configs/lra/pathfinder_grid_conv_c14.yaml \\
        --model.init_args.init_from runs/pathfinder_c6/checkpoints/last.ckpt

``CausalLM`` also starts from a model folder (:func:`load_lm_weights`): one that ``hgrn2 export`` or
``save_pretrained`` wrote, or an HGRN2 checkpoint of fla or of the authors (``hgrn2.models.convert``).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from hgrn2.models.convert import load_lm
from hgrn2.models.pretrained import architecture_differences


def check_checkpoint_file(checkpoint: str | Path, argument: str) -> Path:
    """The path of a complete checkpoint file, without reading it: it exists, is not empty, and is a whole zip
    archive, which is what ``torch.save`` writes (an interrupted copy or save lacks the archive's end).

    Raises:
        FileNotFoundError: no file at ``checkpoint``.
        ValueError: the file is empty or truncated; the message names ``argument``, the flag that gave it.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{argument} {path}: no such file; give the .ckpt file a fit saved")
    size = path.stat().st_size
    if size == 0 or not zipfile.is_zipfile(path):
        problem = "an empty file" if size == 0 else f"not a complete checkpoint ({size} bytes, not a whole archive)"
        raise ValueError(
            f"{argument} {path}: {problem}, e.g. a save or a copy that was interrupted; give another checkpoint (a "
            "fit that saves with save_last keeps the previous one until the new one is complete)"
        )
    return path


def read_checkpoint(checkpoint: str | Path, argument: str) -> dict:
    """The dict a Lightning fit saved at ``checkpoint`` (on the CPU), or an error naming ``argument``, the flag
    that gave the file, and what is wrong with it."""
    path = check_checkpoint_file(checkpoint, argument)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(
            f"{argument} {path}: cannot read it as a checkpoint ({type(error).__name__}: {error}); "
            "it may be truncated or not a file torch.save wrote"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ValueError(f"{argument} {path}: holds no 'state_dict'; give a checkpoint saved by a Lightning fit")
    return state


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
    state = read_checkpoint(path, "init_from")
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"init_from {path}: its weights are another architecture's; start from a checkpoint of the same "
            f"preset and overrides. {error}"
        ) from None
    return state


def load_lm_weights(module: nn.Module, source: str | Path) -> str:
    """Load the weights of ``source`` into a ``CausalLM`` (``module.model``, its ``module.config``).

    ``source``: a Lightning checkpoint file (:func:`load_model_weights`), or a model folder or Hub id in any layout
    :func:`hgrn2.models.convert.load_lm` reads. A folder's model must compute what ``module``'s does: the config
    fields in which they differ (other than runtime fields) are a ValueError that gives the overrides to set.
    Returns what was loaded, for the log.
    """
    if Path(source).is_file() or str(source).endswith(".ckpt"):
        state = load_model_weights(module, source)
        return f"{source} (saved at step {state.get('global_step')})"
    donor = load_lm(source)
    differences = architecture_differences(donor.config, module.config)
    if differences:
        listed = ", ".join(f"{name}: {theirs!r} there, {ours!r} here" for name, (theirs, ours) in differences.items())
        fix = json.dumps({name: theirs for name, (theirs, _) in differences.items()})
        raise ValueError(
            f"init_from {source}: its model differs from this one in {listed}; build the same model with "
            f"--model.init_args.overrides '{fix}' (merged with the preset's fields)"
        )
    module.model.load_state_dict(donor.state_dict())
    return f"{source} ({type(donor).__name__} folder)"

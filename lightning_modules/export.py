"""``hgrn2 export`` and ``hgrn2 convert``: model folders (``hgrn2.models.pretrained``) from checkpoints.

``export`` writes the model of any task's Lightning checkpoint (``CausalLM``, ``SequenceClassifier``, or an
``ImageClassifier`` of an HGRN2 vision model) as ``config.json`` + ``model.safetensors``, with the tokenizer the
LM trained with; ``convert`` turns fla's or the authors' HGRN2 folders into such a folder, or ours into fla's::

    hgrn2 export --ckpt_path runs/lm_demo/checkpoints/last.ckpt --out runs/lm_demo/model
    hgrn2 convert --from fla path/to/fla-hgrn2 --out runs/from_fla
    hgrn2 convert --to fla runs/lm_demo/model --out runs/lm_demo/fla
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from hgrn2.models.convert import folder_format, from_authors, from_fla
from hgrn2.models.lm import HGRN2ForCausalLM
from hgrn2.models.pretrained import load_pretrained, resolve_folder, tokenizer_spec
from lightning_modules.causal_lm import CausalLM
from lightning_modules.image_classifier import ImageClassifier
from lightning_modules.sequence_classifier import SequenceClassifier

TASKS = (CausalLM, SequenceClassifier, ImageClassifier)


def task_of(checkpoint: dict, path: str) -> type:
    """The LightningModule class of a checkpoint: the ``_class_path`` LightningCLI records in its
    ``hyper_parameters``, else the one task whose constructor takes every hyper-parameter."""
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path")
    if class_path is not None:
        module_name, _, name = class_path.rpartition(".")
        task = getattr(importlib.import_module(module_name), name, None)
        if task not in TASKS:
            raise ValueError(f"{path}: a {class_path} checkpoint; export reads those of {[t.__name__ for t in TASKS]}")
        return task
    names = {name for name in hparams if not name.startswith("_")}
    matches = [task for task in TASKS if names and names <= set(inspect.signature(task.__init__).parameters)]
    if len(matches) != 1:
        raise ValueError(
            f"{path}: its hyper_parameters {sorted(names)} are not those of one of {[t.__name__ for t in TASKS]}; "
            "give a checkpoint that hgrn2 fit saved"
        )
    return matches[0]


def export(ckpt_path: str, out: str, tokenizer: str | None = None, ema: bool = False) -> Path:
    """Write the model of a Lightning checkpoint as a model folder (config.json, model.safetensors, tokenizer).

    Args:
        ckpt_path: a checkpoint saved by ``hgrn2 fit`` (any task).
        out: the folder to write.
        tokenizer: the LM's tokenizer (``byte`` or a Hugging Face name or path); default: the one it trained with.
        ema: an ImageClassifier's exponential moving average of the weights instead of the raw weights.
    """
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint file")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    task = task_of(checkpoint, ckpt_path)
    module = task.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    if ema and getattr(module, "ema", None) is None:
        raise ValueError(f"{ckpt_path}: --ema true needs a checkpoint trained with ema_decay; it has no EMA weights")
    model = module.ema.module if ema else module.model
    if task is CausalLM:
        spec = tokenizer or (checkpoint.get("datamodule_hyper_parameters") or {}).get("tokenizer")
        if spec is None:
            print(f"{ckpt_path} does not record its tokenizer: the folder holds none (pass --tokenizer)", flush=True)
        folder = model.save_pretrained(out, tokenizer=spec)
    else:
        folder = model.save_pretrained(out)
    print(f"wrote {type(model).__name__} to {folder}", flush=True)
    return folder


def convert(src: str, out: str, source: str | None = None, target: str = "hgrn2", tokenizer: str | None = None) -> Path:
    """Convert the language model of folder (or Hub id) ``src`` between layouts and write it to ``out``.

    ``source``: ``fla``, ``authors`` or ``hgrn2`` (default: read from src's config.json); ``target``: ``hgrn2``
    (a save_pretrained folder) or ``fla``. The tokenizer files in ``src`` travel along unless ``tokenizer`` is given.
    """
    folder = resolve_folder(src)
    source = source or folder_format(folder)
    loaders = {
        "fla": lambda: from_fla(HGRN2ForCausalLM, folder),
        "authors": lambda: from_authors(HGRN2ForCausalLM, folder),
        "hgrn2": lambda: load_pretrained(folder, expected="HGRN2ForCausalLM"),
    }
    model = loaders[source]()
    spec = tokenizer or tokenizer_spec(folder)
    written = model.to_fla(out, tokenizer=spec) if target == "fla" else model.save_pretrained(out, tokenizer=spec)
    print(f"wrote {target} folder {written} from the {source} folder {folder}", flush=True)
    return written


def convert_command(args: list[str]) -> Path:
    parser = ArgumentParser(prog="hgrn2 convert", description=convert.__doc__.splitlines()[0])
    parser.add_argument("src", help="the folder (or Hugging Face Hub id) to convert")
    parser.add_argument("--from", dest="source", choices=["fla", "authors", "hgrn2"], default=None,
                        help="the layout of src (default: read from its config.json)")  # fmt: skip
    parser.add_argument("--to", dest="target", choices=["hgrn2", "fla"], default="hgrn2", help="the layout to write")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--tokenizer", default=None, help="byte or a Hugging Face tokenizer (default: src's own)")
    parsed = parser.parse_args(args)
    return convert(parsed.src, parsed.out, parsed.source, parsed.target, parsed.tokenizer)

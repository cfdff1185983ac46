"""The ``hgrn2`` command: a LightningCLI in subclass mode.

A YAML config (``--config configs/...``) or ``--model`` / ``--data`` flags pick the LightningModule and
LightningDataModule classes by name, e.g. ``model: CausalLM``; ``fit``, ``validate``, ``test`` and
``predict`` come from Lightning, and multi-GPU from ``--trainer.strategy`` / ``--trainer.devices``.

``hgrn2 generate --ckpt_path runs/.../last.ckpt --prompt "def "`` continues a prompt with a trained
``CausalLM`` or a model folder (see :func:`generate`); ``hgrn2 export`` and ``hgrn2 convert`` write model folders
(:mod:`lightning_modules.export`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from jsonargparse import auto_cli
from lightning.pytorch.cli import LightningCLI

import datamodules  # noqa: F401  (imported so that config files can name its classes)
import lightning_modules  # noqa: F401
from lightning_modules.init_from import check_checkpoint_file, read_checkpoint
from lightning_modules.outputs import OutputFolderCheck, check_output_folders
from lightning_modules.resume import LoopProgress, RNGStates


class HGRN2CLI(LightningCLI):
    """LightningCLI with the project's defaults; see ``hgrn2 --help``."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:  # before LightningCLI itself reads the checkpoint for its hyper-parameters
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))

    def before_fit(self) -> None:
        if self.trainer.is_global_zero:  # before Lightning creates the log folder in its setup
            check_output_folders(self.trainer)


def generate(
    ckpt_path: str,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    top_p: float | None = None,
    seed: int = 0,
    num_samples: int = 1,
    stop_at_eos: bool = True,
    tokenizer: str | None = None,
    device: str = "cpu",
) -> list[str]:
    """Load a ``CausalLM`` checkpoint or a model folder and print continuations of ``prompt``.

    Args:
        ckpt_path: a checkpoint saved by ``hgrn2 fit`` with ``CausalLM``, or a model folder (or Hugging Face Hub id):
            one ``hgrn2 export`` or ``save_pretrained`` wrote, or an HGRN2 checkpoint of fla or of the authors.
        prompt: the text to continue (empty: start after an end-of-document token).
        max_new_tokens: tokens to generate per sample.
        temperature: 0 is greedy decoding; otherwise sampling at this temperature.
        top_k: sample among the k most likely tokens (None: all).
        top_p: sample from the smallest set of tokens whose probability reaches p (None: all).
        seed: seed of the sampler.
        num_samples: continuations to generate (in one batch).
        stop_at_eos: end a sample at the end-of-document token.
        tokenizer: the tokenizer (``byte`` or a Hugging Face path); default: the one the checkpoint trained with
            (or the folder holds).
        device: where to run (``cpu``, ``cuda``).
    """
    from datamodules.tokenizer import build_tokenizer
    from lightning_modules.causal_lm import CausalLM

    for name, value, low in (("num_samples", num_samples, 1), ("max_new_tokens", max_new_tokens, 0)):
        if value < low:
            raise ValueError(f"--{name} must be at least {low}, got {value}")
    if Path(ckpt_path).is_file():
        checkpoint = read_checkpoint(ckpt_path, "--ckpt_path")
        spec = tokenizer or checkpoint.get("datamodule_hyper_parameters", {}).get("tokenizer")
        model = CausalLM.load_from_checkpoint(ckpt_path, map_location=device).model
    else:
        from hgrn2.models.convert import load_lm
        from hgrn2.models.pretrained import resolve_folder, tokenizer_spec

        folder = resolve_folder(ckpt_path)
        spec = tokenizer or tokenizer_spec(folder)
        model = load_lm(folder).to(device)
    if spec is None:
        raise ValueError(f"{ckpt_path} does not record its tokenizer; pass --tokenizer byte or a tokenizer path")
    tok = build_tokenizer(spec)
    model.eval()
    ids = tok.encode(prompt) or [tok.eos_id]
    input_ids = torch.tensor([ids] * num_samples, device=device)  # [N, T]
    stops = [tok.eos_id] if stop_at_eos else []
    out = model.generate(
        input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stops, seed=seed
    )
    texts = []
    for row in out:
        new = row[len(ids) :].tolist()
        if stops and tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        texts.append(prompt + tok.decode(new))
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}" if num_samples > 1 else text, flush=True)
    return texts


def check_ckpt_path(ckpt_path) -> None:
    """A ``--ckpt_path`` that names a local file must name a complete checkpoint: an empty or truncated one is an
    error naming the flag before the run starts."""
    # a folder (a sharded checkpoint), a URL, Lightning's names ("last", ...) and missing files are Lightning's
    if isinstance(ckpt_path, (str, Path)) and "://" not in str(ckpt_path) and Path(ckpt_path).is_file():
        check_checkpoint_file(ckpt_path, "--ckpt_path")


def close_process_group() -> None:
    """Close the ``torch.distributed`` process group a run opened (Lightning leaves it open after ``fit``).

    Left to the interpreter's exit-time destructors, gloo's worker threads are sometimes torn down while still
    running, which aborts the process ("terminate called without an active exception") after the run has
    finished and written everything. The barrier lets every rank finish its collectives before any closes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["generate"]:
        auto_cli(generate, args=argv[1:], as_positional=False, prog="hgrn2 generate")
        return
    if argv[:1] == ["export"]:
        from lightning_modules.export import export

        auto_cli(export, args=argv[1:], as_positional=False, prog="hgrn2 export")
        return
    if argv[:1] == ["convert"]:
        from lightning_modules.export import convert_command

        convert_command(argv[1:])
        return
    HGRN2CLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [OutputFolderCheck(), RNGStates(), LoopProgress()]},
        parser_kwargs={"description": "Train and evaluate HGRN2 models (LM, images, Long Range Arena, MQAR)."},
        args=args,
    )
    close_process_group()


if __name__ == "__main__":
    main()

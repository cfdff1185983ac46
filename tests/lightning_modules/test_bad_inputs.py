"""Inputs that used to end in a bare traceback, or in lost work, end in one error naming what to fix."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.digits import DigitsDataModule
from lightning_modules.cli import main
from lightning_modules.image_classifier import ImageClassifier
from lightning_modules.outputs import OutputFolderCheck

DIGITS = str(Path(__file__).resolve().parents[2] / "configs" / "imagenet" / "digits_demo.yaml")
TINY = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, expand_ratio=4, backend="naive")


class StepCounter(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


def digits_fit(tmp_path, callbacks, num_classes: int = 10, **trainer_kwargs):
    """A one-step fit of a tiny classifier on the digits; returns the step counter."""
    counter = StepCounter()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tmp_path, callbacks=[counter, *callbacks], **{"logger": False, **trainer_kwargs},
    )  # fmt: skip
    module = ImageClassifier("hgrn2_vit_tiny_patch16_224", num_classes=num_classes, model_kwargs=TINY)
    trainer.fit(module, DigitsDataModule(image_size=8, batch_size=16))
    return counter


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A path under a regular file: no process, root included, can create a folder there."""
    plain = tmp_path / "plain_file"
    plain.write_text("a file, not a folder")
    return plain


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short"], ids=["empty", "truncated"])
def test_fit_from_an_empty_or_truncated_checkpoint_is_an_error_naming_ckpt_path(tmp_path, content):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(content)
    args = ["fit", "--config", DIGITS, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(ckpt)]
    with pytest.raises(ValueError, match=r"--ckpt_path .*last\.ckpt: (an empty file|not a complete checkpoint)"):
        main(args)


def test_generate_from_an_empty_checkpoint_is_an_error_naming_ckpt_path(tmp_path):
    ckpt = tmp_path / "empty.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match=r"--ckpt_path .*empty\.ckpt: an empty file"):
        main(["generate", "--ckpt_path", str(ckpt)])


@pytest.mark.parametrize("flag, value", [("--num_samples", "0"), ("--max_new_tokens", "-1")])
def test_generate_rejects_no_samples_or_negative_lengths_by_name(tmp_path, flag, value):
    with pytest.raises(ValueError, match=rf"{flag} must be at least \d+, got {value}"):
        main(["generate", "--ckpt_path", str(tmp_path / "unread.ckpt"), flag, value])


def test_fewer_model_classes_than_the_digits_labels_is_an_error_naming_num_classes(tmp_path):
    with pytest.raises(ValueError, match=r"DigitsDataModule has 10 classes .*num_classes = 5 .*num_classes to 10"):
        digits_fit(tmp_path, [], num_classes=5)


def test_a_checkpoint_folder_that_cannot_be_written_fails_before_the_first_step(tmp_path, blocked):
    counter = StepCounter()
    checkpoint = ModelCheckpoint(dirpath=blocked / "checkpoints", every_n_train_steps=1)
    with pytest.raises(ValueError, match=r"checkpoint folder .*plain_file/checkpoints cannot be written .*dirpath"):
        digits_fit(tmp_path, [counter, checkpoint, OutputFolderCheck()], enable_checkpointing=True)
    assert counter.steps == 0


def test_the_cli_checks_the_output_folders_of_every_fit(tmp_path, blocked, monkeypatch):
    trained = []
    monkeypatch.setattr(ImageClassifier, "training_step", lambda *args: trained.append(1) or torch.tensor(0.0))
    args = ["fit", "--config", DIGITS, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1"]
    args += ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(blocked)]
    with pytest.raises(ValueError, match=r"log folder .*plain_file cannot be written"):
        main(args)
    assert trained == []

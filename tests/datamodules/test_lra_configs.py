"""The LRA configs: every one parses, the paper ones carry the authors' settings, a tiny one trains end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from datamodules.lra.generate_listops import main as generate_listops
from lightning_modules.cli import HGRN2CLI, main
from lightning_modules.sequence_classifier import SequenceClassifier

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "lra"
TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")

# OpenNLPLab/HGRN2 run_lra.py: lr, warm-up steps, scheduler steps, total batch, epochs, gradient clip (0: none)
RUN_LRA = {
    "listops": (5e-4, 5000, 50000, 128, 50, 0),
    "text": (5e-3, 10000, 50000, 64, 40, 0),
    "retrieval": (5e-3, 312, 50000, 128, 20, 1),
    "image": (3e-3, 30000, 50000, 64, 75, 0),
    "pathfinder": (2e-3, 50000, 500000, 128, 100, 0),
    "pathx": (7.5e-4, 150000, 500000, 256, 200, 1),
}


@pytest.mark.parametrize(
    "name",
    [f"{task}{suffix}" for task in TASKS for suffix in ("", "_tiny")]
    + ["pathfinder_grid_conv", "pathfinder_grid_conv_c14"],
)
def test_every_lra_config_parses_with_print_config(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_modules.sequence_classifier.SequenceClassifier"
    assert printed["model"]["init_args"]["preset"] == name.split("_")[0]


@pytest.mark.parametrize("task", TASKS)
def test_paper_configs_carry_the_authors_run_lra_settings(task):
    config = yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())
    optim = config["model"]["init_args"]["optim"]
    trainer = config["trainer"]
    lr, warmup, total, batch, epochs, clip = RUN_LRA[task]
    assert (optim["lr"], optim["warmup_steps"], optim["total_steps"]) == (lr, warmup, total)
    assert (optim["weight_decay"], optim["schedule"], optim["min_lr_ratio"]) == (0.0, "cosine", 0.0)
    assert config["data"]["init_args"]["batch_size"] == batch and trainer["max_epochs"] == epochs
    assert trainer.get("gradient_clip_val") == (clip or None)
    assert trainer["precision"] == "bf16-mixed" and config["model"]["init_args"].get("overrides") is None


def test_grid_conv_config_builds_the_measured_encoder():
    config = yaml.safe_load((CONFIGS / "pathfinder_grid_conv.yaml").read_text())
    init = config["model"]["init_args"]
    model = SequenceClassifier(init["preset"], overrides=init["overrides"]).model
    assert model.blocks[0].glu is None and [block.grid_conv.dilation for block in model.blocks] == [1, 2, 4, 8, 16, 1]
    assert (init["optim"]["lr"], init["optim"]["warmup_steps"], init["optim"]["schedule"]) == (2e-3, 100, "constant")
    assert config["trainer"]["gradient_clip_val"] == 1.0 and config["data"]["init_args"]["batch_size"] == 128


def test_grid_conv_length_14_config_continues_the_curv_baseline_encoder():
    easy, hard = (
        yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        for name in ("pathfinder_grid_conv", "pathfinder_grid_conv_c14")
    )
    assert hard["model"]["init_args"]["overrides"] == easy["model"]["init_args"]["overrides"]
    assert hard["model"]["init_args"]["init_from"].endswith(".ckpt")
    assert (easy["data"]["init_args"]["difficulty"], hard["data"]["init_args"]["difficulty"]) == (
        "curv_baseline",
        "curv_contour_length_14",
    )
    optim = hard["model"]["init_args"]["optim"]
    assert (optim["lr"], optim["warmup_steps"], optim["schedule"], optim["min_lr_ratio"]) == (2e-3, 100, "cosine", 0)
    assert hard["trainer"]["max_steps"] == 3600 and hard["trainer"]["gradient_clip_val"] == 1.0


def test_tiny_listops_config_trains_validates_and_tests_on_generated_data(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["hgrn2"])  # the CLI warns when it gets both args and pytest's argv
    data_dir = tmp_path / "listops"
    generate_listops(["--out", str(data_dir), "--train", "64", "--val", "16", "--test", "16",
                      "--min-length", "10", "--max-length", "60"])  # fmt: skip
    overrides = ["--data.init_args.data_dir", str(data_dir), "--trainer.max_steps", "3", "--trainer.max_epochs", "5",
                 "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip
    cli = HGRN2CLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=["fit", "--config", str(CONFIGS / "listops_tiny.yaml"), *overrides],
    )
    assert cli.trainer.global_step == 3
    assert {"train/loss_step", "val/acc", "val/loss"} <= set(cli.trainer.callback_metrics)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert 0.0 <= results[0]["test/acc"] <= 1.0 and results[0]["test/loss"] > 0

"""experiments/config_seeds.py: one hgrn2 config fitted at several seeds side by side, each tested, in one report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import load_experiment

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "lra"
TINY = '{"glu_hidden_size": 0, "grid_conv": 3, "hidden_size": 8, "num_layers": 2}'


@pytest.fixture
def config_seeds(monkeypatch):
    return load_experiment("config_seeds", monkeypatch)


def tiny_flags(data_dir: Path, steps: int) -> list[str]:
    return ["--data.init_args.data_dir", str(data_dir), "--data.init_args.difficulty", "curv_baseline",
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "8", "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true", "--trainer.max_steps", str(steps),
            "--model.init_args.overrides", TINY]  # fmt: skip


def test_each_seed_is_fitted_tested_and_reported(config_seeds, pathfinder_baseline_dir, tmp_path):
    run_dir, out = tmp_path / "runs", tmp_path / "report.json"
    argv = ["--config", str(CONFIGS / "pathfinder_grid_conv.yaml"), "--seeds", "0", "1", "--run-dir", str(run_dir)]
    report = config_seeds.main([*argv, "--out", str(out), "--", *tiny_flags(pathfinder_baseline_dir, 5)])
    assert json.loads(out.read_text()) == report
    assert report["config"] == "configs/lra/pathfinder_grid_conv.yaml" and report["seeds"] == [0, 1]
    for seed, run in zip((0, 1), report["runs"]):
        assert run["seed"] == seed and run["fit_exit"] == 0 and run["test_exit"] == 0
        assert run["checkpoint_step"] == 5 and run["checkpoint"].startswith(f"s{seed}/fit/")
        assert run["fit_command"][run["fit_command"].index("--seed_everything") + 1] == str(seed)
        assert run["fit_command"][run["fit_command"].index("--config") + 1] == report["config"]  # repo-relative
        assert [step for step, _, _ in run["val_curve"]] == [3]  # after the 4 batches of the first epoch
        assert 0.0 <= run["test"]["test/acc"] <= 1.0 and run["test"]["test/loss"] > 0
    first, second = (torch.load(run_dir / run["checkpoint"], weights_only=False) for run in report["runs"])
    head = "model.head.weight"
    assert not torch.equal(first["state_dict"][head], second["state_dict"][head])  # the seeds differ

    # each seed of a second config starts from its own checkpoint of the first: {seed} in the flags
    for seed, run in zip((0, 1), report["runs"]):
        shutil.copy(run_dir / run["checkpoint"], tmp_path / f"c6-s{seed}.ckpt")
    init = ["--model.init_args.init_from", str(tmp_path / "c6-s{seed}.ckpt")]
    argv = ["--config", str(CONFIGS / "pathfinder_grid_conv_c14.yaml"), "--seeds", "0", "1"]
    flags = [*tiny_flags(pathfinder_baseline_dir, 1), *init]
    report = config_seeds.main([*argv, "--run-dir", str(tmp_path / "c14"), "--out", str(out), "--", *flags])
    for seed, run in zip((0, 1), report["runs"]):
        assert run["fit_exit"] == 0 and run["checkpoint_step"] == 1
        log = (tmp_path / "c14" / f"s{seed}" / "run.log").read_text()
        assert f"Weights from {tmp_path / f'c6-s{seed}.ckpt'} (saved at step 5)" in log


def test_a_failed_fit_is_reported_with_its_log(config_seeds, pathfinder_baseline_dir, tmp_path):
    flags = [*tiny_flags(pathfinder_baseline_dir, 1), "--trainer.max_stepz", "3"]
    argv = ["--config", str(CONFIGS / "pathfinder_grid_conv.yaml"), "--seeds", "4", "--run-dir", str(tmp_path)]
    report = config_seeds.main([*argv, "--out", str(tmp_path / "report.json"), "--", *flags])
    (run,) = report["runs"]
    assert run["fit_exit"] != 0 and run["error"] == "the fit saved no checkpoint"
    assert "max_stepz" in run["log_tail"] and "test" not in run


def test_bad_arguments_are_refused_before_any_run(config_seeds, tmp_path):
    with pytest.raises(SystemExit):
        config_seeds.main(["--config", str(tmp_path / "missing.yaml"), "--seeds", "0"])
    with pytest.raises(SystemExit):
        config_seeds.main(["--config", str(CONFIGS / "pathfinder_grid_conv.yaml"), "--seeds", "1", "1"])

"""experiments/pathfinder_cnn_control.py: the convolutional control on the Pathfinder datamodule's split."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.lra.pathfinder import PathfinderDataModule
from tests.helpers import load_experiment


@pytest.fixture
def control(monkeypatch):
    return load_experiment("pathfinder_cnn_control", monkeypatch)


def test_control_trains_on_the_datamodule_split_and_writes_its_curve(control, pathfinder_baseline_dir, tmp_path):
    data_dir = pathfinder_baseline_dir
    out = tmp_path / "control.json"
    argv = ["--data-dir", str(data_dir), "--difficulty", "curv_baseline", "--steps", "3", "--eval-every", "2"]
    report = control.main([*argv, "--batch-size", "8", "--workers", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert [point["step"] for point in report["curve"]] == [2, 3]
    assert all(0 <= point["test_acc"] <= 100 for point in report["curve"])
    module = PathfinderDataModule(str(data_dir), difficulty="curv_baseline")
    module.setup("fit")
    assert report["split_sizes"] == {"train": len(module.splits["train"]), "test": len(module.splits["test"])}
    x, y = control.load_split(module.splits["test"], workers=0)
    assert x.shape == (len(module.splits["test"]), 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == module.splits["test"].labels.tolist()
    assert report["parameters"] == sum(p.numel() for p in control.control_network().parameters())


def test_control_refuses_non_positive_settings(control, tmp_path):
    with pytest.raises(SystemExit):
        control.main(["--data-dir", str(tmp_path), "--steps", "0"])

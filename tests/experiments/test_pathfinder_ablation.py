"""experiments/pathfinder_ablation.py: variants of the LRA encoder trained side by side on the datamodule's split."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import load_experiment

TINY = {"hidden_size": 8, "num_layers": 2, "backend": "naive"}


@pytest.fixture
def ablation(monkeypatch):
    return load_experiment("pathfinder_ablation", monkeypatch)


def test_variants_train_in_their_own_processes_and_are_collected(ablation, pathfinder_baseline_dir, tmp_path):
    data_dir = pathfinder_baseline_dir
    out = tmp_path / "ablation.json"
    variants = [f"hgrn:{json.dumps(TINY)}", 'conv:{"mixer": "dilated_conv", "hidden_size": 8, "glu_hidden_size": 0}']
    argv = ["--data-dir", str(data_dir), "--difficulty", "curv_baseline", "--variants", *variants]
    report = ablation.main([*argv, "--steps", "3", "--eval-every", "2", "--batch-size", "4", "--workers", "0",
                            "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == report
    assert [run["tag"] for run in report["runs"]] == ["hgrn", "conv"]
    for run in report["runs"]:
        assert run["exit_code"] == 0 and run["steps"] == 3
        assert [point["step"] for point in run["curve"]] == [2]
        assert 0 <= run["test_acc"] <= 100 and 0 <= run["curve"][0]["val_acc"] <= 100
    splits = torch.load(data_dir / "curv_baseline-splits-s0.pt")
    assert sum(len(labels) for _, labels in splits.values()) == 40


def test_short_conv_keys_build_the_configs_grid_convolutions(ablation):
    net = ablation.build({**TINY, "glu_hidden_size": 0, "short_conv": 3, "short_conv_dilated": True})
    assert (net.net.config.grid_conv, net.net.config.grid_conv_dilations) == (3, (1, 2, 4, 8, 16, 1))
    assert [block.grid_conv.dilation for block in net.net.blocks] == [1, 2]
    logits = net(torch.randint(0, 256, (2, 16), dtype=torch.uint8))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    dilated = ablation.build({"mixer": "dilated_conv", "hidden_size": 8, "num_layers": 3})
    assert [block.mixer.spatial.dilation for block in dilated.net.blocks] == [(1, 1), (2, 2), (4, 4)]


def test_bad_variants_fail_before_any_training(ablation, tmp_path):
    base = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "o.json"), "--variants"]
    for bad in ["notag", "a:[1]", "a:{bad json", 'a:{"pool": "median"}', 'a:{"hidden": 3}']:
        with pytest.raises(SystemExit):
            ablation.parse_args([*base, bad])
    with pytest.raises(SystemExit):
        ablation.parse_args([*base, "a:{}", "a:{}"])  # tags must differ

"""experiments/lra_checkpoint_probe.py: reading a classifier checkpoint and what it reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.lra.generate_pathfinder import write_pathfinder
from lightning_modules.sequence_classifier import SequenceClassifier
from tests.helpers import load_experiment


@pytest.fixture
def probe_script(monkeypatch):
    return load_experiment("lra_checkpoint_probe", monkeypatch)


def test_probe_reports_the_checkpoints_own_predictions_and_block_scales(probe_script, tmp_path):
    torch.manual_seed(0)
    module = SequenceClassifier("pathfinder", overrides={"hidden_size": 8, "num_layers": 2, "expand_ratio": 2})
    with torch.no_grad():
        module.model.lower_bounds.gamma.normal_()
    checkpoint = tmp_path / "probe.ckpt"
    torch.save(
        {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), "global_step": 7}, checkpoint
    )
    data_dir = write_pathfinder(tmp_path / "d", resolution=32, images=30, images_per_batch=30, seed=4, contour_length=6)
    report = probe_script.main([str(checkpoint), "--data-dir", str(data_dir), "--difficulty", "curv_baseline"])
    assert report["step"] == 7 and report["images"] == 3  # the 10% test split of 30 images
    assert sorted(report["blocks"]) == ["glu0", "glu1", "mixer0", "mixer1"]
    expected_bounds = module.model.lower_bounds().detach().mean(1)
    np.testing.assert_allclose(report["lower_bounds"], expected_bounds.numpy(), atol=5e-4)

    loaded, _ = probe_script.load_classifier(checkpoint)  # the same predictions as the saved module, in eval mode
    pixels = torch.randint(0, 256, (4, 1024), dtype=torch.uint8)
    module.eval()
    loaded.eval()
    torch.testing.assert_close(loaded.model(pixels), module.model(pixels), rtol=1e-5, atol=1e-6)
    result = probe_script.probe(loaded, pixels, torch.tensor([0, 1, 0, 1]))
    logits = module.model(pixels).detach().double()
    diff = (logits[:, 1] - logits[:, 0]).numpy()
    assert result["eval"]["logit_diff_std"] == pytest.approx(diff.std(), rel=1e-5)
    assert result["eval"]["corr"] == pytest.approx(np.corrcoef(diff, [0, 1, 0, 1])[0, 1], rel=1e-4)

"""SequenceClassifier(init_from=...): a fit starts from another run's weights; resuming and testing never need them."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from datamodules.lra import PathfinderDataModule
from lightning_modules.init_from import load_model_weights
from lightning_modules.optim import OptimizerConfig
from lightning_modules.sequence_classifier import SequenceClassifier

TINY = {"hidden_size": 8, "num_layers": 2, "glu_hidden_size": 0, "grid_conv": 3}


def classifier(**kwargs) -> SequenceClassifier:
    # lr tiny and no decay: each step moves a weight by about 1e-9 (AdamW), far below the tests' tolerances
    optim = OptimizerConfig(lr=1e-9, weight_decay=0.0, schedule="constant")
    return SequenceClassifier("pathfinder", overrides=dict(TINY, **kwargs.pop("overrides", {})), optim=optim, **kwargs)


def trainer(root, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip


@pytest.fixture
def data(pathfinder_baseline_dir):
    return PathfinderDataModule(pathfinder_baseline_dir, difficulty="curv_baseline", batch_size=8, num_workers=0)


@pytest.fixture
def source(tmp_path):
    """A checkpoint file whose weights are random draws, far from any fresh initialisation."""
    torch.manual_seed(5)
    donor = classifier()
    with torch.no_grad():
        for parameter in donor.parameters():
            parameter.normal_()
    path = tmp_path / "donor.ckpt"
    torch.save({"state_dict": donor.state_dict(), "global_step": 17}, path)
    return path, {name: value.clone() for name, value in donor.state_dict().items()}


def test_a_fit_starts_from_the_checkpoints_weights(tmp_path, data, source):
    path, weights = source
    seen = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # after setup, before the first step
            seen.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    module = classifier(init_from=str(path))
    fresh = {name: value.clone() for name, value in module.state_dict().items()}
    fit = trainer(tmp_path, max_steps=1)
    fit.callbacks.append(Capture())
    fit.fit(module, datamodule=data)
    assert seen.keys() == weights.keys()
    assert all(torch.equal(seen[name], weights[name]) for name in weights)
    assert not torch.equal(fresh["model.head.weight"], weights["model.head.weight"])


def test_a_resumed_fit_and_a_test_never_need_init_from(tmp_path, data, source):
    path, _ = source
    first = trainer(tmp_path, max_steps=2)
    first.fit(classifier(init_from=str(path)), datamodule=data)
    resume_from = tmp_path / "two-steps.ckpt"
    first.save_checkpoint(resume_from)
    saved = torch.load(resume_from, map_location="cpu", weights_only=False)["state_dict"]
    path.unlink()  # the source is gone: neither the resumed fit nor the test may need it, a fresh fit does
    with pytest.raises(FileNotFoundError, match=r"donor\.ckpt: no such file"):
        trainer(tmp_path, max_steps=1).fit(classifier(init_from=str(path)), datamodule=data)

    module = classifier(init_from=str(path))
    trainer(tmp_path, max_steps=3).fit(module, datamodule=data, ckpt_path=resume_from)
    head = module.state_dict()["model.head.weight"]
    assert torch.allclose(head, saved["model.head.weight"], atol=1e-6)  # carried on from its own weights
    restored = SequenceClassifier.load_from_checkpoint(resume_from, map_location="cpu")
    results = trainer(tmp_path, max_steps=1).test(restored, datamodule=data, verbose=False)
    assert 0.0 <= results[0]["test/acc"] <= 1.0


def test_bad_checkpoints_raise_errors_that_name_the_file_and_the_problem(tmp_path, source):
    path, _ = source
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt: no such file.*init_from PATH"):
        load_model_weights(classifier(), tmp_path / "missing.ckpt")
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken\.ckpt: not a complete checkpoint"):
        load_model_weights(classifier(), tmp_path / "broken.ckpt")
    torch.save({"weights": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match=r"bare\.ckpt: holds no 'state_dict'"):
        load_model_weights(classifier(), tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match=r"(?s)another architecture.s.*size mismatch"):
        load_model_weights(classifier(overrides={"hidden_size": 16}), path)
    with pytest.raises(ValueError, match=r"(?s)another architecture.s.*Missing key"):
        load_model_weights(classifier(overrides={"num_layers": 3}), path)

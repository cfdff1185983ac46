"""ImageClassifier: losses against closed forms, optimisation, schedule, weight-decay groups, EMA, configs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.imagenet import write_synthetic_image_folder
from lightning_modules.cli import main as cli_main
from lightning_modules.image_classifier import ImageClassifier, classification_loss, soft_target_cross_entropy
from lightning_modules.optim import OptimizerConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "imagenet"
TINY = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, expand_ratio=4, glu_hidden_size=32)


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _classifier(**kwargs) -> ImageClassifier:
    defaults = dict(model_name="hgrn2_vit_tiny_patch16_224", num_classes=4, model_kwargs=TINY)
    return ImageClassifier(**{**defaults, **kwargs})


def _fixed_batch_loader(n: int = 16, batch: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=generator)
    labels = torch.arange(n) % 4
    return DataLoader(TensorDataset(images, labels), batch_size=batch)


def test_soft_target_cross_entropy_matches_the_hand_computed_value():
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]])  # softmax = [1/4, 1/2, 1/4]
    targets = torch.tensor([[0.5, 0.5, 0.0]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.5))  # = 1.5 ln 2
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_hard_labels_use_label_smoothed_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 2])
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    eps = 0.1
    expected = ((1 - eps) * -log_p[torch.arange(2), labels] + eps * -log_p.mean(1)).mean()
    assert classification_loss(logits, labels, eps).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="soft targets"):
        classification_loss(logits, torch.zeros(2, 4))


def test_a_few_optimisation_steps_lower_the_loss():
    module = _classifier(optim=OptimizerConfig(lr=3e-3, weight_decay=0.0, schedule="constant"))
    loader = _fixed_batch_loader()
    images, labels = next(iter(loader))

    def loss() -> float:
        with torch.no_grad():
            return classification_loss(module.model.eval()(images), labels).item()

    before = loss()
    _trainer(max_steps=25).fit(module, loader)
    after = loss()
    assert after < 0.5 * before, (before, after)


class _RecordLR(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_warmup_epochs_become_steps_then_cosine_per_step():
    record = _RecordLR()
    lr, floor = 1e-3, 0.1
    module = _classifier(warmup_epochs=1, optim=OptimizerConfig(lr=lr, schedule="cosine", min_lr_ratio=floor))
    _trainer(max_epochs=3, callbacks=[record]).fit(module, _fixed_batch_loader(n=16, batch=4))  # 4 steps / epoch
    warmup, total = 4, 12
    expected = [lr * (k + 1) / warmup for k in range(warmup)]
    expected += [
        lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))))
        for k in range(warmup, total)
    ]
    assert record.lrs == pytest.approx(expected, rel=1e-9)


def _decay_of(optimizer) -> dict[int, float]:
    return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_no_weight_decay_names_land_in_the_zero_decay_group():
    module = _classifier(model_name="vit_tiny_patch16_224", model_kwargs=dict(img_size=16, patch_size=8, depth=1))
    module.model.no_weight_decay = lambda: {"pos_embed", "cls_token", "head.weight"}  # head.weight is a Linear
    _trainer(max_steps=1).fit(module, _fixed_batch_loader())
    decay = _decay_of(module.optimizers().optimizer)
    named = dict(module.model.named_parameters())
    for name in ("pos_embed", "cls_token", "head.weight", "head.bias"):
        assert decay[id(named[name])] == 0.0, name
    assert decay[id(named["blocks.0.attn.qkv.weight"])] == module.optim.weight_decay
    assert len(decay) == len(named)  # every parameter in exactly one group

    hgrn2 = _classifier()
    _trainer(max_steps=1).fit(hgrn2, _fixed_batch_loader())
    decay = _decay_of(hgrn2.optimizers().optimizer)
    named = dict(hgrn2.model.named_parameters())
    assert decay[id(named["lower_bounds.gamma"])] == 0.0
    assert decay[id(named["blocks.0.mixer.f_proj.weight"])] > 0.0


class _Snapshot(pl.Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # runs before the module's hook
        self.weights.append(module.model.head.weight.detach().clone())


def test_ema_is_the_hand_computed_moving_average_of_the_weights():
    snapshot, decay = _Snapshot(), 0.5
    module = _classifier(ema_decay=decay, optim=OptimizerConfig(lr=1e-2, weight_decay=0.0, schedule="constant"))
    _trainer(max_steps=4, callbacks=[snapshot]).fit(module, _fixed_batch_loader(n=16, batch=4))
    expected = snapshot.weights[0]  # the first update copies the weights
    for weights in snapshot.weights[1:]:
        expected = decay * expected + (1 - decay) * weights
    torch.testing.assert_close(module.ema.module.head.weight, expected)
    assert not any(p.requires_grad for p in module.ema.parameters())


def test_validation_top1_and_top5_match_a_hand_count():
    module = _classifier(num_classes=8)
    labels = torch.tensor([0] * 14 + list(range(8)) + [3, 3])  # unbalanced: a mean over classes would differ
    loader = DataLoader(TensorDataset(torch.randn(24, 3, 16, 16), labels), batch_size=8)
    metrics = _trainer().validate(module, loader, verbose=False)[0]
    images, labels = loader.dataset.tensors
    with torch.no_grad():
        logits = module.model.eval()(images)
    top5 = logits.topk(5, dim=1).indices
    assert metrics["val/acc1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-6)
    assert metrics["val/acc5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item(), abs=1e-6)


@pytest.mark.parametrize("name", ["hgrn2_tiny.yaml", "hgrn2_small.yaml", "digits_demo.yaml", "folder_test.yaml"])
def test_configs_parse_with_print_config(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_modules.image_classifier.ImageClassifier" in printed
    assert "hgrn2_vit_" in printed


def test_generated_folder_config_trains_end_to_end_with_mixup_and_ema(tmp_path):
    root = write_synthetic_image_folder(tmp_path / "data", num_classes=4, train_per_class=8, val_per_class=2)
    cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "folder_test.yaml"),
            "--data.init_args.root",
            str(root),
            "--trainer.max_epochs=1",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path / 'logs'}",
        ]
    )
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    train_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [r for r in rows if r.get("val/acc1")][-1]
    assert len(train_losses) == 4 and all(math.isfinite(v) for v in train_losses)  # 32 images / batch 8
    assert not any(r.get("train/acc1") for r in rows)  # logged for unmixed labels only: every batch was mixed
    for key in ("val/acc1", "val/acc5", "val/ema_acc1"):
        assert 0.0 <= float(val[key]) <= 1.0
    assert float(val["val/acc5"]) == 1.0  # 4 classes: the top 5 always hold the label

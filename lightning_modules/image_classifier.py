"""Image classification around any timm model (the HGRN2 vision models are registered with timm on import).

Loss: soft-target cross-entropy when the datamodule mixed the batch (targets ``[B, classes]``), otherwise
cross-entropy with optional label smoothing. Metrics: top-1 and top-5 accuracy. AdamW with per-step warm-up
and cosine decay from :mod:`lightning_modules.optim`; gradient clipping is the Trainer's
(``gradient_clip_val``). Optional exponential moving average of the weights (timm ``ModelEmaV3``), evaluated
next to the raw model.

Multi-device: ``--trainer.strategy ddp`` or ``fsdp``; under FSDP each element of the model's ``blocks`` (the
HGRN2 ``Block``, or a timm ViT block) is its own unit (:mod:`lightning_modules.sharding`). The EMA needs
full weights on every rank, so it works with DDP only. ``gradient_checkpointing`` is timm's
``set_grad_checkpointing``: each block's activations are recomputed in the backward pass.
"""

from __future__ import annotations

import dataclasses
import re

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

import hgrn2  # noqa: F401  (registers the hgrn2 vision models with timm)
from lightning_modules.optim import (
    OptimizerConfig,
    build_optimizer,
    deferred_total_steps,
    training_steps_per_epoch,
)
from lightning_modules.sharding import (
    check_compile_mode,
    clip_gradients,
    compile_units,
    fsdp_roots,
    shard_modules,
)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over the batch of −Σ_c t_c log softmax(logits)_c, for targets ``[B, C]`` that sum to 1 per row."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Soft-target cross-entropy for ``[B, C]`` float targets; cross-entropy for ``[B]`` class indices."""
    if targets.dim() == 2:
        if targets.shape != logits.shape:
            raise ValueError(f"soft targets {list(targets.shape)} must match logits {list(logits.shape)}")
        return soft_target_cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def check_data_classes(trainer: pl.Trainer | None, num_classes: int, setting: str) -> None:
    """The model's ``num_classes`` must cover the datamodule's classes: a label past the last logit would fail deep
    in the loss (an IndexError, or a device assert on a GPU). ``setting`` names the config key to change."""
    datamodule = getattr(trainer, "datamodule", None)
    classes = getattr(datamodule, "num_classes", None)
    if isinstance(classes, int) and classes > num_classes:
        raise ValueError(
            f"{type(datamodule).__name__} has {classes} classes (labels 0..{classes - 1}) but the model has "
            f"num_classes = {num_classes} outputs; set {setting} to {classes}"
        )


def move_to_no_decay(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Move ``params`` into the optimizer's group with weight decay 0 (a model's ``no_weight_decay`` list)."""
    ids = {id(p) for p in params}
    groups = optimizer.param_groups
    no_decay = next((g for g in groups if g["weight_decay"] == 0.0), None)
    if no_decay is None or not ids:
        return
    for group in groups:
        if group is not no_decay and group["weight_decay"] != 0.0:
            moved = [p for p in group["params"] if id(p) in ids]
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            no_decay["params"].extend(moved)


class ImageClassifier(pl.LightningModule):
    """A timm classifier trained with AdamW, warm-up + cosine per step, and optional EMA.

    Args:
        model_name: any ``timm.create_model`` name, e.g. ``hgrn2_vit_tiny_patch16_224`` or ``deit_tiny_patch16_224``.
        num_classes: classifier width (must match the datamodule).
        model_kwargs: extra keywords for ``timm.create_model`` (``drop_path_rate``, ``img_size``, ``in_chans``, ...;
            for the HGRN2 models any :class:`~hgrn2.models.vision.VisionConfig` field, e.g. ``dropout``).
        optim: AdamW and schedule settings; ``None`` uses :class:`OptimizerConfig` defaults.
        warmup_epochs: if set, overrides ``optim.warmup_steps`` with this many epochs of optimizer steps.
        label_smoothing: for batches with hard labels (mixed batches carry their own smoothing).
        ema_decay: keep an EMA of the weights with this decay (e.g. 0.99996) and validate it too; None: off.
        gradient_checkpointing: recompute each block's activations in the backward pass (less memory), for any
            timm model (``set_grad_checkpointing``); for the HGRN2 models it sets the config's field of that name.
        compile_blocks: put each element of the model's ``blocks`` through ``torch.compile`` (fewer, fused kernel
            launches; the first steps of each stage compile). Checkpoints are the same either way.
        compile_mode: ``torch.compile``'s mode for those blocks (None: its default). ``reduce-overhead`` replays
            each block as CUDA graphs, one launch from the host per block: HGRN2-Tiny trained at 5,964 images/s
            with it against 3,838 without in one benchmark run on an H100 (``benchmarks/results/ops-notes.md``).
    """

    def __init__(
        self,
        model_name: str = "hgrn2_vit_tiny_patch16_224",
        num_classes: int = 1000,
        model_kwargs: dict | None = None,
        optim: OptimizerConfig | None = None,
        warmup_epochs: float | None = None,
        label_smoothing: float = 0.0,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
        compile_blocks: bool = False,
        compile_mode: str | None = None,
    ):
        super().__init__()
        check_compile_mode(compile_mode)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        self.save_hyperparameters()
        self.model = timm.create_model(model_name, num_classes=num_classes, **(model_kwargs or {}))
        if gradient_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.optim = optim or OptimizerConfig()
        self.ema = None
        if ema_decay is not None:
            self.ema = timm.utils.ModelEmaV3(self.model, decay=ema_decay)
            self.ema.requires_grad_(False)  # never trained directly; keeps DDP from waiting for its gradients
        # fraction of all images classified correctly (micro), as ImageNet reports it, not a mean over classes
        accuracy = lambda k: MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")
        self.train_acc1, self.val_acc1, self.val_acc5 = accuracy(1), accuracy(1), accuracy(5)
        if self.ema is not None:
            self.ema_acc1, self.ema_acc5 = accuracy(1), accuracy(5)

    def setup(self, stage: str) -> None:
        check_data_classes(self.trainer, self.hparams.num_classes, "model.init_args.num_classes")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self.model(images)
        loss = classification_loss(logits, targets, self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        if targets.dim() == 1:  # accuracy is only meaningful against unmixed labels
            self.train_acc1(logits, targets)
            self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=False)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # the EMA follows every optimizer step here, before any callback's on_train_batch_end, so that a
        # checkpoint saved there holds the EMA of the weights it holds (a resumed fit continues it exactly);
        # the step counter counts this step from the next hook on
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits = self.model(images)
        self.log("val/loss", F.cross_entropy(logits.float(), targets), prog_bar=True, sync_dist=True)
        self.val_acc1(logits, targets)
        self.val_acc5(logits, targets)
        self.log("val/acc1", self.val_acc1, prog_bar=True)
        self.log("val/acc5", self.val_acc5)
        if self.ema is not None:
            ema_logits = self.ema.module(images)
            self.ema_acc1(ema_logits, targets)
            self.ema_acc5(ema_logits, targets)
            self.log("val/ema_acc1", self.ema_acc1)
            self.log("val/ema_acc5", self.ema_acc5)

    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(images).softmax(dim=-1)

    def _optimizer_config(self) -> OptimizerConfig:
        if self.hparams.warmup_epochs is None:
            return self.optim
        per_epoch = training_steps_per_epoch(self.trainer)
        if per_epoch is None:
            raise ValueError("warmup_epochs needs a known epoch length: set optim.warmup_steps instead")
        return dataclasses.replace(self.optim, warmup_steps=round(self.hparams.warmup_epochs * per_epoch))

    def configure_model(self) -> None:
        # under FSDP: one unit per element of `blocks` plus the root (patch embedding, norms, head)
        is_block = lambda name, module: re.fullmatch(r"blocks\.\d+", name) is not None  # noqa: E731
        self.model = shard_modules(self.model, is_block)
        if self.hparams.compile_blocks:
            compile_units(self.model, is_block, self.hparams.compile_mode)
        if self.ema is not None and fsdp_roots(self.model):
            raise ValueError(
                "ema_decay keeps a full copy of the weights, updated from the model's full parameters on every rank, "
                "but FSDP shards them: train with --trainer.strategy ddp, or set ema_decay: null"
            )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        schedule = build_optimizer(self.model, self._optimizer_config(), deferred_total_steps(self.trainer))
        named = dict(self.model.named_parameters())
        skip = getattr(self.model, "no_weight_decay", lambda: set())()
        move_to_no_decay(schedule["optimizer"], [named[n] for n in skip if n in named])
        return schedule

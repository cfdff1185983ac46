"""SequenceClassifier: an LRA classifier trained with cross-entropy, scored by accuracy.

The backbone is :class:`hgrn2.models.lra.LRAClassifier`, built from a task preset plus overrides (see
:data:`hgrn2.models.lra.PRESETS`). The optimiser is AdamW with linear warm-up and a cosine schedule, the
schedule of the authors' LRA runs (``cosine_warmup``: warm-up, then cosine to 0 at ``total_steps``); configs
set ``betas: [0.9, 0.999]``, ``min_lr_ratio: 0`` and the per-task warm-up and step counts.

Batches are the LRA datamodules' dicts: ``labels`` plus the model inputs (``input_ids``, ``attention_mask``
and, for retrieval, ``input_ids_2``/``attention_mask_2``). Logged: ``{train,val,test}/loss`` and ``/acc``.

Multi-device: ``--trainer.strategy ddp`` or ``fsdp``; under FSDP each ``hgrn2.layers.Block`` is a unit
(:mod:`lightning_modules.sharding`). ``overrides: {gradient_checkpointing: true}`` recomputes each block's
activations in the backward pass. BatchNorm statistics stay per device unless ``--trainer.sync_batchnorm true``
(DDP only).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from hgrn2.layers import Block
from hgrn2.models.lra import LRAClassifier, LRAConfig
from lightning_modules.image_classifier import check_data_classes
from lightning_modules.init_from import load_model_weights
from lightning_modules.optim import OptimizerConfig, build_optimizer, deferred_total_steps
from lightning_modules.sharding import check_compile_mode, clip_gradients, compile_units, shard_modules

STAGES = ("train", "val", "test")


class SequenceClassifier(pl.LightningModule):
    """Classify whole sequences (or pairs of sequences) with an HGRN2 LRA encoder.

    Args:
        preset: task preset of the encoder: listops, text, retrieval, image, pathfinder or pathx.
        overrides: :class:`~hgrn2.models.lra.LRAConfig` fields to change, e.g. ``{"num_layers": 2}`` or
            ``{"gradient_checkpointing": true}`` (each block's activations recomputed in the backward pass).
        optim: AdamW and schedule settings (defaults of :class:`OptimizerConfig` when None).
        label_smoothing: of the cross-entropy.
        init_from: a checkpoint of the same preset and overrides whose weights a fit starts from, with a fresh
            optimiser and schedule (e.g. Pathfinder's easiest difficulty before the LRA one); read only by ``fit``,
            and a resumed fit restores its own weights over them (:mod:`lightning_modules.init_from`).
        compile_blocks: put each block of the encoder through ``torch.compile`` (fewer, fused kernel launches
            around the recurrence; the first steps of each stage compile). Checkpoints are the same either way.
        compile_mode: ``torch.compile``'s mode for those blocks (None: its default). ``reduce-overhead`` replays
            each block as CUDA graphs, one launch from the host per block; Pathfinder-32's step, bound by its
            kernels on a fast host, trained at 50.1 steps/s with it against 49.7 without on an H100
            (``benchmarks/results/ops-notes.md``).
    """

    def __init__(
        self,
        preset: str = "listops",
        overrides: dict | None = None,
        optim: OptimizerConfig | None = None,
        label_smoothing: float = 0.0,
        init_from: str | None = None,
        compile_blocks: bool = False,
        compile_mode: str | None = None,
    ):
        super().__init__()
        check_compile_mode(compile_mode)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters()
        self.config = LRAConfig.from_name(preset, **(overrides or {}))
        self.model = LRAClassifier(self.config)
        self.optim = optim if optim is not None else OptimizerConfig()
        self.label_smoothing = label_smoothing
        self.init_from = init_from
        self.compile_blocks, self.compile_mode = compile_blocks, compile_mode
        self._init_pending = False  # set by setup("fit") while init_from is still to be loaded
        # keyed "<stage>_acc": a ModuleDict key may not shadow an nn.Module attribute such as `train`
        self.accuracy = nn.ModuleDict(
            {
                f"{stage}_acc": MulticlassAccuracy(num_classes=self.config.num_classes, average="micro")
                for stage in STAGES
            }
        )

    def setup(self, stage: str) -> None:
        # init_from loads here, before configure_model may shard the model; a resumed fit restores its own
        # weights after this hook. A missing file is left to on_fit_start, where a resumed run no longer needs it.
        check_data_classes(self.trainer, self.config.num_classes, "model.init_args.overrides.num_classes")
        self._init_pending = stage == "fit" and self.init_from is not None
        if self._init_pending and Path(self.init_from).is_file():
            state = load_model_weights(self, self.init_from)
            rank_zero_info(f"Weights from {self.init_from} (saved at step {state.get('global_step')})")
            self._init_pending = False

    def on_fit_start(self) -> None:
        if self._init_pending and self.trainer.ckpt_path is None:
            load_model_weights(self, self.init_from)  # raises FileNotFoundError naming the file

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for a batch dict (``labels``, if present, is ignored)."""
        return self.model(**{name: value for name, value in batch.items() if name != "labels"})

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        labels = batch["labels"]
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy(logits.detach(), labels)
        on_step = stage == "train"
        # validation and test losses are averaged over all ranks (accuracy, a torchmetrics metric, syncs itself)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(labels),
            sync_dist=not on_step,
        )
        self.log(f"{stage}/acc", accuracy, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_model(self) -> None:
        # under FSDP: one unit per block plus the root (embedding, final norm, head); elsewhere a no-op
        self.model = shard_modules(self.model, lambda name, module: isinstance(module, Block))
        if self.compile_blocks:
            compile_units(self.model, lambda name, module: isinstance(module, Block), self.compile_mode)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict:
        return build_optimizer(self.model, self.optim, deferred_total_steps(self.trainer))

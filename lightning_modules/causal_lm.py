"""``CausalLM``: next-token training and evaluation of an ``HGRN2ForCausalLM``, and the ``LMSummary`` callback.

Batches are ``{"input_ids": [B, T], "labels": [B, T]}`` with ``labels[:, t]`` the target of position t
(already shifted) and -100 ignored. Metrics are exact corpus-level values: token-weighted means of the NLL
and of the accuracy (torchmetrics ``MeanMetric``, synchronised across devices), perplexity = exp(mean NLL).

Long documents: with ``eval_carry_state`` the validation and test loops also run each batch starting from
the recurrent state the previous batch ended in (the text datamodule's ``streams`` layout makes row i of
batch n+1 continue row i of batch n), and log ``*/loss_carry`` and ``*/ppl_carry`` beside the usual
metrics. With ``carry_state`` training does the same with the state detached (truncated backpropagation
through time); it needs ``train_layout: streams``.

Multi-device: ``--trainer.strategy ddp`` replicates the model; ``--trainer.strategy fsdp`` makes every
``hgrn2.layers.Block`` an FSDP unit in ``configure_model`` (see :mod:`lightning_modules.sharding`), with
mixed precision from ``--trainer.precision``; ``overrides: {gradient_checkpointing: true}`` recomputes each
block's activations in the backward pass under either.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from hgrn2.layers import Block
from hgrn2.models.lm import IGNORE_INDEX, HGRN2ForCausalLM, LMConfig, lm_loss
from lightning_modules.init_from import load_lm_weights
from lightning_modules.optim import OptimizerConfig, build_optimizer, deferred_total_steps
from lightning_modules.sharding import clip_gradients, fsdp_roots, full_state_dict, shard_modules

STAGES = ("val", "test")


class CausalLM(pl.LightningModule):
    """An HGRN2 (or HGRN1) causal LM built from a named preset plus overrides.

    Args:
        preset: a key of ``hgrn2.models.lm.PRESETS`` (``tiny``, ``demo``, ``wt103-44m``, ``374m``, ...).
        vocab_size: overrides the preset's vocabulary (e.g. 257 for the byte tokenizer).
        overrides: any other ``LMConfig`` fields, e.g. ``{mixer: hgru1, expand_ratio: 1}``.
        optim: AdamW and learning-rate schedule (``lightning_modules.optim.OptimizerConfig``).
        carry_state: carry the recurrent state across consecutive training batches (detached).
        eval_carry_state: also evaluate with the state carried across consecutive validation/test batches.
        init_from: weights a fit starts from, with a fresh optimiser and schedule (fine-tuning): a ``.ckpt`` of
            this module, a model folder (``hgrn2 export``, ``save_pretrained``) or an fla / authors' HGRN2 folder
            or Hub id, whose config must match this one's; read only by ``fit`` (:mod:`lightning_modules.init_from`).
    """

    def __init__(
        self,
        preset: str = "tiny",
        vocab_size: int | None = None,
        overrides: dict[str, Any] | None = None,
        optim: OptimizerConfig | None = None,
        carry_state: bool = False,
        eval_carry_state: bool = False,
        init_from: str | None = None,
    ):
        super().__init__()
        if isinstance(optim, dict):  # how it is stored in checkpoints
            optim = OptimizerConfig(**optim)
        self.optim = optim or OptimizerConfig()
        self.save_hyperparameters(ignore=["optim"])
        # plain values only, so that Lightning can resume with torch.load(weights_only=True)
        self.hparams["optim"] = dataclasses.asdict(self.optim)
        overrides = dict(overrides or {})
        if vocab_size is not None:
            if overrides.get("vocab_size", vocab_size) != vocab_size:
                raise ValueError(
                    f"vocab_size={vocab_size} disagrees with overrides.vocab_size={overrides['vocab_size']}"
                )
            overrides["vocab_size"] = vocab_size
        self.config = LMConfig.from_name(preset, **overrides)
        self.model = HGRN2ForCausalLM(self.config)
        self.carry_state, self.eval_carry_state = carry_state, eval_carry_state
        self.init_from = init_from
        self._init_pending = False  # set by setup("fit") while init_from is still to be loaded
        metric_names = ["nll", "accuracy"] + (["nll_carry"] if eval_carry_state else [])
        self.eval_metrics = torch.nn.ModuleDict(
            {f"{stage}_{name}": MeanMetric() for stage in STAGES for name in metric_names}
        )
        self._train_state: list[torch.Tensor] | None = None
        self._eval_state: list[torch.Tensor] | None = None
        self._step_started: float | None = None
        self._step_tokens = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids, labels, **kwargs)

    # ------------------------------------------------------------------ setup checks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab = getattr(datamodule, "vocab_size", None)
        if isinstance(data_vocab, int) and data_vocab > self.config.vocab_size:
            raise ValueError(
                f"the data has {data_vocab} token ids but the model's vocab_size is {self.config.vocab_size}; "
                f"set model.init_args.vocab_size: {data_vocab} (or larger)"
            )
        if stage == "fit" and self.carry_state and getattr(datamodule, "train_layout", "streams") != "streams":
            raise ValueError(
                "carry_state needs consecutive training batches to continue each other: set the datamodule's "
                "train_layout: streams (or turn carry_state off)"
            )
        # init_from loads here, before configure_model may shard the model; a resumed fit restores its own weights
        # after this hook. A source not found here is left to on_fit_start, which a resumed run skips.
        self._init_pending = stage == "fit" and self.init_from is not None
        if self._init_pending and Path(self.init_from).exists():
            rank_zero_info(f"Weights from {load_lm_weights(self, self.init_from)}")
            self._init_pending = False

    def on_fit_start(self) -> None:
        if self._init_pending and self.trainer.ckpt_path is None:
            rank_zero_info(f"Weights from {load_lm_weights(self, self.init_from)}")  # a Hub id, or a clear error

    # ------------------------------------------------------------------ training
    @staticmethod
    def _carried(state: list[torch.Tensor] | None, batch_size: int, device: torch.device):
        if state is None or state[0].shape[0] != batch_size:
            return None
        return [s.to(device) for s in state]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        state = self._carried(self._train_state, input_ids.shape[0], input_ids.device) if self.carry_state else None
        # the loss straight from the hidden states: the [B, T, V] logits are never formed
        out = self.model(input_ids, labels, state=state, output_state=self.carry_state, return_logits=False)
        if self.carry_state:
            self._train_state = [s.detach() for s in out.state]
        self._step_tokens = input_ids.numel() * self.trainer.world_size
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/ppl", torch.exp(out.loss.detach().clamp_max(30.0)))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        if input_ids.is_cuda:
            self.log("train/peak_memory_gib", torch.cuda.max_memory_allocated(input_ids.device) / 2**30)
        return out.loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._step_started is not None and self._step_tokens:
            # batch start to batch start: forward, backward, optimizer and data loading of the previous batch
            self.log("train/tokens_per_s", self._step_tokens / (now - self._step_started), prog_bar=True)
        self._step_started = now

    def on_train_epoch_start(self) -> None:
        self._train_state = None  # the streams start again from their beginnings

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.carry_state and self._train_state is not None:
            checkpoint["carried_train_state"] = [s.cpu() for s in self._train_state]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._train_state = checkpoint.get("carried_train_state")

    def configure_model(self) -> None:
        # under FSDP: one unit per block plus the root (embeddings, final norm, head); elsewhere a no-op
        self.model = shard_modules(self.model, lambda name, module: isinstance(module, Block))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def unsharded_model(self) -> HGRN2ForCausalLM | None:
        """The model with full weights for use outside ``forward`` (generation): ``self.model`` itself, or under
        FSDP a copy built on global rank 0 from the gathered weights (None on the other ranks).

        Collective under FSDP: call it on every rank.
        """
        if not fsdp_roots(self.model):
            return self.model
        weights = full_state_dict(self.model)
        if self.global_rank != 0:
            return None
        model = HGRN2ForCausalLM(self.config)
        model.load_state_dict(weights)
        return model.to(self.device)

    def configure_optimizers(self) -> dict:
        return build_optimizer(self.model, self.optim, deferred_total_steps(self.trainer))

    # ------------------------------------------------------------------ evaluation
    def _update(self, stage: str, name: str, value: torch.Tensor, count: torch.Tensor) -> None:
        if count > 0:
            self.eval_metrics[f"{stage}_{name}"].update(value / count, weight=count)

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        input_ids, labels = batch["input_ids"], batch["labels"]
        out = self.model(input_ids)
        nll, count = lm_loss(out.logits, labels)
        correct = ((out.logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
        self._update(stage, "nll", nll, count)
        self._update(stage, "accuracy", correct.float(), count)
        if self.eval_carry_state:
            state = self._carried(self._eval_state, input_ids.shape[0], input_ids.device)
            carried = self.model(input_ids, state=state, output_state=True)
            self._eval_state = carried.state
            self._update(stage, "nll_carry", lm_loss(carried.logits, labels)[0], count)

    def _log_epoch(self, stage: str) -> None:
        for suffix in ("", "_carry"):
            metric = self.eval_metrics[f"{stage}_nll{suffix}"] if f"{stage}_nll{suffix}" in self.eval_metrics else None
            if metric is None or not metric.update_called:
                continue
            loss = metric.compute()
            self.log(f"{stage}/loss{suffix}", loss, prog_bar=not suffix)
            self.log(f"{stage}/ppl{suffix}", torch.exp(loss.clamp_max(30.0)))
            metric.reset()
        accuracy = self.eval_metrics[f"{stage}_accuracy"]
        if accuracy.update_called:
            self.log(f"{stage}/accuracy", accuracy.compute())
            accuracy.reset()

    def on_validation_epoch_start(self) -> None:
        self._eval_state = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._eval_state = None

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")


class LMSummary(pl.Callback):
    """At the end of ``fit``: validation loss in nats per byte beside the data's unigram baseline, and a sample.

    Needs a datamodule with ``unigram_baseline``, ``bytes_per_token`` and ``tokenizer`` (``TextDataModule``).
    """

    def __init__(
        self,
        prompt: str = "def ",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
    ):
        self.prompt, self.max_new_tokens, self.temperature = prompt, max_new_tokens, temperature
        self.top_k, self.seed = top_k, seed

    def summary(self, trainer: pl.Trainer, module: CausalLM, model: HGRN2ForCausalLM | None = None) -> str:
        """The report; the sample comes from ``model`` (default ``module.model``)."""
        model = module.model if model is None else model
        data = trainer.datamodule
        lines = []
        val_loss = trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            per_byte = data.bytes_per_token("val")
            model_nats = float(val_loss) / per_byte
            unigram = data.unigram_baseline("val") / per_byte
            lines.append(
                f"validation loss {model_nats:.4f} nats/byte ({model_nats / math.log(2):.3f} bits/byte, "
                f"perplexity {math.exp(float(val_loss)):.2f} per token) vs unigram baseline {unigram:.4f} nats/byte"
            )
            if "val/loss_carry" in trainer.callback_metrics:
                carry = float(trainer.callback_metrics["val/loss_carry"]) / per_byte
                lines.append(f"validation loss with the state carried across segments {carry:.4f} nats/byte")
        tokens = torch.tensor([data.tokenizer.encode(self.prompt) or [data.tokenizer.eos_id]], device=module.device)
        sample = model.generate(
            tokens, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, seed=self.seed
        )
        lines.append(
            f"sample (temperature {self.temperature}, top-k {self.top_k}):\n{data.tokenizer.decode(sample[0])}"
        )
        return "\n".join(lines)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: CausalLM) -> None:
        model = pl_module.unsharded_model()  # every rank: gathering FSDP shards is collective
        if trainer.is_global_zero:
            print("\n" + self.summary(trainer, pl_module, model), flush=True)

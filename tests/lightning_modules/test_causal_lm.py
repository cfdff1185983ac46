"""CausalLM: metrics against manual computations, training under both precisions, resume, configs and CLI."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.text import TextDataModule
from hgrn2.models.lm import LMConfig
from lightning_modules.causal_lm import CausalLM, LMSummary
from lightning_modules.cli import main
from lightning_modules.optim import OptimizerConfig
from tests.helpers import LossRecorder

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "lm").glob("*.yaml"))


def grammar_text(lines: int, seed: int) -> str:
    rng = random.Random(seed)
    nouns, verbs = ["cat", "dog", "bird", "fish"], ["sees", "likes", "eats"]
    return "".join(f"the {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}.\n" for _ in range(lines))


def make_data(tmp_path: Path, train_lines: int = 200, **kwargs) -> TextDataModule:
    files = {}
    for split, lines, seed in (("train", train_lines, 0), ("val", 40, 1), ("test", 40, 2)):
        path = tmp_path / f"{split}.txt"
        path.write_text(grammar_text(lines, seed))
        files[split] = str(path)
    options = dict(seq_len=16, batch_size=4, eval_batch_size=2, cache_dir=str(tmp_path / "cache"), txt_document="file")
    return TextDataModule(data_files=files, **{**options, **kwargs})


def make_trainer(max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return pl.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


def tiny_lm(seed: int = 0, **kwargs) -> CausalLM:
    torch.manual_seed(seed)
    optim = OptimizerConfig(lr=3e-3, warmup_steps=2, schedule="cosine", total_steps=None)
    return CausalLM("tiny", vocab_size=257, optim=optim, **kwargs)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_few_optimisation_steps_lower_the_validation_loss(tmp_path, precision):
    data, module = make_data(tmp_path), tiny_lm()
    trainer = make_trainer(40, precision=precision, limit_val_batches=4)
    before = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    trainer.fit(module, data)
    assert {"train/loss", "train/lr", "train/ppl", "train/tokens_per_s"} <= set(trainer.callback_metrics)
    after = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    assert before > 5.0  # about log(257) at initialisation
    assert after < before - 2.0, (before, after)


def test_validation_metrics_equal_a_manual_computation_with_and_without_carried_state(tmp_path):
    data, module = make_data(tmp_path), tiny_lm(eval_carry_state=True)
    with torch.no_grad():  # a sharper model than the 0.02 init, so that the carried state matters
        for p in module.parameters():
            p.normal_(0, 0.2)
    metrics = make_trainer(1, limit_val_batches=1.0).validate(module, data, verbose=False)[0]
    batches = list(data.val_dataloader())
    with torch.no_grad():
        logits = torch.cat([module.model(b["input_ids"]).logits for b in batches]).double()  # [N·B, T, V]
        labels = torch.cat([b["labels"] for b in batches])
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        accuracy = (logits.argmax(-1) == labels).double().mean()
        # carrying the state across the segments of a row is one forward over the whole row
        rows = torch.cat([b["input_ids"] for b in batches], dim=1)  # [B, N·T]
        row_labels = torch.cat([b["labels"] for b in batches], dim=1)
        carried = module.model(rows).logits.double()
        nll_carry = torch.nn.functional.cross_entropy(carried.flatten(0, 1), row_labels.flatten())
    from torchmetrics.functional.text import perplexity

    assert metrics["val/loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(perplexity(logits.float(), labels).item(), rel=1e-4)
    assert metrics["val/accuracy"] == pytest.approx(accuracy.item(), rel=1e-6)
    assert metrics["val/loss_carry"] == pytest.approx(nll_carry.item(), rel=1e-5)
    assert abs(metrics["val/loss_carry"] - metrics["val/loss"]) > 1e-3  # the carried state changes the result


def test_token_accuracy_and_loss_skip_ignored_targets():
    module = tiny_lm()
    input_ids = torch.randint(0, 257, (2, 6))
    labels = torch.randint(0, 257, (2, 6))
    with torch.no_grad():
        predicted = module.model(input_ids).logits.argmax(-1)
    labels[0, :2] = predicted[0, :2]  # two right answers that are ignored
    labels[0, :2] = -100
    labels[1, 3] = predicted[1, 3]  # one right answer that counts
    module._eval_step({"input_ids": input_ids, "labels": labels}, "val")
    expected = ((predicted == labels) & (labels != -100)).sum().item() / 10
    assert module.eval_metrics["val_accuracy"].compute().item() == pytest.approx(expected)


@pytest.mark.parametrize("layout", ["blocks", "streams"])
def test_resumed_run_continues_the_loss_curve_of_an_uninterrupted_run(tmp_path, layout):
    carry = layout == "streams"
    data_options = dict(train_lines=22, train_layout=layout)  # 6 batches an epoch: the run crosses an epoch
    straight = LossRecorder()
    make_trainer(10, [straight]).fit(tiny_lm(carry_state=carry), make_data(tmp_path, **data_options))

    first = LossRecorder(stop_at=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4, save_top_k=0)
    make_trainer(10, [first, checkpoint], enable_checkpointing=True).fit(
        tiny_lm(carry_state=carry), make_data(tmp_path, **data_options)
    )
    resumed = LossRecorder()
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True, every_n_train_steps=4, save_top_k=0)
    make_trainer(10, [resumed, again], enable_checkpointing=True).fit(
        tiny_lm(seed=1, carry_state=carry), make_data(tmp_path, **data_options), ckpt_path=tmp_path / "ckpt/last.ckpt"
    )
    assert len(straight.losses) == 10 and len(first.losses) == 4 and len(resumed.losses) == 6
    assert first.losses == pytest.approx(straight.losses[:4], rel=1e-6)
    assert resumed.losses == pytest.approx(straight.losses[4:], rel=1e-5)


def test_carry_state_in_training_needs_the_streams_layout(tmp_path):
    with pytest.raises(ValueError, match="train_layout: streams"):
        make_trainer(1).fit(tiny_lm(carry_state=True), make_data(tmp_path))


def test_model_vocabulary_smaller_than_the_data_is_rejected(tmp_path):
    module = CausalLM("tiny", vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size: 257"):
        make_trainer(1).fit(module, make_data(tmp_path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    data, module = make_data(tmp_path), tiny_lm()
    summary = LMSummary(prompt="the ", max_new_tokens=20, temperature=0.0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = make_trainer(60, [checkpoint], enable_checkpointing=True, limit_val_batches=4, val_check_interval=30)
    trainer.fit(module, data)
    return trainer, module, data, summary, tmp_path / "ckpt" / "last.ckpt"


def test_summary_reports_nats_per_byte_against_the_unigram_baseline_and_a_sample(trained):
    trainer, module, data, summary, _ = trained
    text = summary.summary(trainer, module)
    per_byte = data.bytes_per_token("val")
    unigram = data.unigram_baseline("val") / per_byte
    model_nats = trainer.callback_metrics["val/loss"].item() / per_byte
    assert f"validation loss {model_nats:.4f} nats/byte" in text
    assert f"unigram baseline {unigram:.4f} nats/byte" in text
    assert model_nats < unigram  # 60 steps on a four-noun grammar beat the byte frequencies
    assert "sample (temperature 0.0" in text and "\nthe " in text


def test_generate_command_prints_the_greedy_continuation_from_a_checkpoint(trained, capsys):
    *_, module, data, _, ckpt = trained
    main(["generate", "--ckpt_path", str(ckpt), "--prompt", "the dog", "--max_new_tokens", "12", "--temperature", "0"])
    printed = capsys.readouterr().out.strip()
    expected = module.model.generate(torch.tensor([list(b"the dog")]), 12, temperature=0.0, stop_tokens=[256])
    new = [t for t in expected[0, 7:].tolist() if t != 256]
    assert printed == "the dog" + bytes(new).decode("utf-8", errors="replace")


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_lm_config_parses_and_names_a_valid_model(config, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["hgrn2"])  # the command line is the args below, not pytest's
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    parsed = yaml.safe_load(capsys.readouterr().out)
    model = parsed["model"]["init_args"]
    assert parsed["model"]["class_path"] == "lightning_modules.causal_lm.CausalLM"
    assert parsed["data"]["class_path"] == "datamodules.text.TextDataModule"
    extra = {"vocab_size": model["vocab_size"]} if model.get("vocab_size") else {}
    LMConfig.from_name(model["preset"], **extra, **(model.get("overrides") or {}))


def test_demo_config_trains_on_the_embedded_corpus_with_checkpoint_and_summary():
    parsed = yaml.safe_load((CONFIGS[0].parent / "demo.yaml").read_text())
    assert parsed["data"]["init_args"]["dataset"] == "stdlib"
    assert parsed["trainer"]["accelerator"] == "cpu"
    callbacks = [c["class_path"] for c in parsed["trainer"]["callbacks"]]
    assert callbacks == ["lightning.pytorch.callbacks.ModelCheckpoint", "lightning_modules.causal_lm.LMSummary"]


class GradRecorder(pl.Callback):
    """Global norm and largest entry of the gradients each optimizer step applied (after clipping): they
    stay on the parameters until the next step zeroes them."""

    def __init__(self):
        self.norms, self.largest = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        self.largest.append(max(g.abs().max().item() for g in grads))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_adamw_is_clipped_under_bf16_mixed(tmp_path, algorithm):
    # Lightning refuses to clip for optimizers that unscale inside step(); under bf16-mixed nothing is scaled
    torch.manual_seed(0)
    module = CausalLM("tiny", vocab_size=257, optim=OptimizerConfig(lr=3e-3, warmup_steps=2, fused=True))
    recorder, clip = GradRecorder(), 1e-3
    trainer = make_trainer(
        3, callbacks=[recorder], precision="bf16-mixed", gradient_clip_val=clip, gradient_clip_algorithm=algorithm
    )
    trainer.fit(module, make_data(tmp_path))
    assert module.optimizers().optimizer.defaults["fused"]
    assert len(recorder.norms) == 3
    if algorithm == "norm":
        assert max(recorder.norms) <= clip * (1 + 1e-3), recorder.norms
    else:
        assert max(recorder.largest) <= clip * (1 + 1e-6), recorder.largest
        assert max(recorder.norms) > clip  # value clipping leaves the norm above the clip value

"""Model folders in the Lightning workflow: fine-tuning starts from a folder's (or fla's, or a .ckpt's) weights at
the saved model's loss, ``hgrn2 export`` writes any task's checkpoint as a folder that runs with nothing else, and
``hgrn2 convert`` moves LMs between fla's layout and ours."""

from __future__ import annotations

import json
import re

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from datamodules.text import TextDataModule
from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig
from hgrn2.models.lra import LRAClassifier
from hgrn2.models.vision import HGRN2Vision
from lightning_modules.causal_lm import CausalLM
from lightning_modules.cli import main
from lightning_modules.image_classifier import ImageClassifier
from lightning_modules.init_from import load_lm_weights
from lightning_modules.optim import OptimizerConfig
from lightning_modules.sequence_classifier import SequenceClassifier
from tests.helpers import LossRecorder
from tests.models.foreign_checkpoints import fla_config, fla_weights, write_folder

# lr tiny and no decay, so that what the first step reports is the loss of the weights the fit started from
OPTIM = OptimizerConfig(lr=1e-9, weight_decay=0.0, schedule="constant")


def trainer(root, max_steps: int = 1, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root, callbacks=list(callbacks),
    )  # fmt: skip


def first_step_loss(root, module: CausalLM, batch: dict) -> float:
    recorder = LossRecorder()
    trainer(root, callbacks=[recorder]).fit(module, DataLoader([batch], batch_size=None))
    return recorder.losses[0]


def perturbed_lm(config: LMConfig) -> HGRN2ForCausalLM:
    model = HGRN2ForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model


@pytest.fixture
def batch():
    ids = torch.randint(0, 257, (4, 17), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


@pytest.mark.parametrize("kind", ["save_pretrained", "lightning-ckpt"])
def test_fine_tuning_starts_at_the_saved_models_loss(tmp_path, batch, kind):
    donor = perturbed_lm(LMConfig.from_name("tiny"))
    if kind == "save_pretrained":
        source = donor.save_pretrained(tmp_path / "model")
    else:
        holder = CausalLM("tiny")
        holder.model.load_state_dict(donor.state_dict())
        source = tmp_path / "donor.ckpt"
        torch.save({"state_dict": holder.state_dict(), "global_step": 9}, source)
    expected = donor(batch["input_ids"], batch["labels"]).loss.item()
    loss = first_step_loss(tmp_path, CausalLM("tiny", optim=OPTIM, init_from=str(source)), batch)
    assert loss == pytest.approx(expected, rel=1e-5)
    fresh = first_step_loss(tmp_path, CausalLM("tiny", optim=OPTIM), batch)
    assert abs(fresh - expected) > 1e-2  # the fit did start from the donor, not from a fresh initialisation


def test_fine_tuning_from_an_fla_folder_takes_the_overrides_its_error_names(tmp_path, batch):
    config = fla_config(vocab_size=257)
    weights = fla_weights(config)
    folder = write_folder(tmp_path / "fla", config, weights)
    with pytest.raises(ValueError, match=r"differs from this one in .*norm: 'rmsnorm' there") as error:
        first_step_loss(tmp_path, CausalLM("tiny", optim=OPTIM, init_from=str(folder)), batch)
    overrides = json.loads(re.search(r"--model\.init_args\.overrides '(\{.*\})'", str(error.value))[1])
    module = CausalLM("tiny", optim=OPTIM, overrides=overrides, init_from=str(folder))
    expected = HGRN2ForCausalLM.from_fla(folder)(batch["input_ids"], batch["labels"]).loss.item()
    assert first_step_loss(tmp_path, module, batch) == pytest.approx(expected, rel=1e-5)


def test_a_missing_init_from_is_a_file_not_found_error_that_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gone/model: no such folder"):
        load_lm_weights(CausalLM("tiny"), str(tmp_path / "gone" / "model"))
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt: no such file"):
        load_lm_weights(CausalLM("tiny"), str(tmp_path / "last.ckpt"))


def test_export_writes_a_folder_that_generates_what_the_checkpoint_generates(tmp_path, capsys):
    text = tmp_path / "train.txt"
    text.write_text("the cat sat on the mat.\n" * 40)
    data = TextDataModule(data_files={"train": str(text), "val": str(text)}, tokenizer="byte", seq_len=16,
                          batch_size=4, cache_dir=str(tmp_path / "cache"), txt_document="file")  # fmt: skip
    fit = trainer(tmp_path, max_steps=3)
    fit.fit(CausalLM("tiny", optim=OptimizerConfig(lr=1e-2, warmup_steps=0)), data)
    ckpt = tmp_path / "last.ckpt"
    fit.save_checkpoint(ckpt)
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "model")])
    assert json.loads((tmp_path / "model" / "config.json").read_text())["tokenizer"] == "byte"
    capsys.readouterr()
    outputs = []
    for source in (ckpt, tmp_path / "model"):
        main(
            ["generate", "--ckpt_path", str(source), "--prompt", "the ", "--max_new_tokens", "12", "--temperature", "0"]
        )
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("the ")


def lightning_checkpoint(module: pl.LightningModule, path, cli: bool = False) -> str:
    """What ``Trainer.save_checkpoint`` writes that ``load_from_checkpoint`` reads: weights and hyper-parameters;
    ``cli``: with the class path and instantiator that ``hgrn2 fit`` (LightningCLI) adds to them."""
    hparams = dict(module.hparams)
    if cli:
        hparams["_class_path"] = f"{type(module).__module__}.{type(module).__name__}"
        hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": hparams}
    torch.save({**checkpoint, "pytorch-lightning_version": pl.__version__}, path)
    return str(path)


@pytest.mark.parametrize("cli", [False, True], ids=["python-fit", "hgrn2-fit"])
def test_export_writes_the_model_of_a_sequence_classifier_checkpoint(tmp_path, cli):
    module = SequenceClassifier("listops", overrides={"hidden_size": 16, "num_layers": 2})
    ckpt = lightning_checkpoint(module, tmp_path / "lra.ckpt", cli=cli)
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "lra")])
    ids = torch.randint(1, 16, (3, 20))
    assert torch.equal(LRAClassifier.from_pretrained(tmp_path / "lra")(ids), module.model.eval()(ids))


def test_export_writes_the_raw_or_the_ema_weights_of_an_image_classifier_checkpoint(tmp_path):
    tiny = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, expand_ratio=4, glu_hidden_size=32)
    module = ImageClassifier("hgrn2_vit_tiny_patch16_224", num_classes=4, model_kwargs=tiny, ema_decay=0.5)
    with torch.no_grad():
        for parameter in module.ema.module.parameters():
            parameter.add_(0.1)  # the EMA apart from the raw weights
    ckpt = lightning_checkpoint(module, tmp_path / "image.ckpt")
    images = torch.randn(2, 3, 16, 16)
    for ema, model in ((False, module.model), (True, module.ema.module)):
        main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / f"ema-{ema}"), "--ema", str(ema).lower()])
        assert torch.equal(HGRN2Vision.from_pretrained(tmp_path / f"ema-{ema}")(images), model.eval()(images))


def test_convert_command_moves_an_lm_from_fla_to_hgrn2_and_back(tmp_path):
    config = fla_config()
    weights = fla_weights(config)
    source = write_folder(tmp_path / "fla", config, weights)
    main(["convert", "--from", "fla", str(source), "--out", str(tmp_path / "ours")])
    ids = torch.randint(0, 50, (2, 9))
    converted = HGRN2ForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(converted(ids).logits, HGRN2ForCausalLM.from_fla(source)(ids).logits)
    main(["convert", "--to", "fla", str(tmp_path / "ours"), "--out", str(tmp_path / "back")])
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(weights) and all(torch.equal(back[k], weights[k]) for k in weights)

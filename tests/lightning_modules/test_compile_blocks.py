"""``compile_blocks``: the LRA and image LightningModules put each block through ``torch.compile`` when the Trainer
configures the model, in place, so that parameters, state-dict keys (and so checkpoints) and outputs stay those of
the uncompiled module. Compilation itself happens at a block's first call; ``aot_eager`` keeps it quick here."""

from __future__ import annotations

import logging

import pytest
import torch

from hgrn2.layers import Block
from lightning_modules.image_classifier import ImageClassifier
from lightning_modules.sequence_classifier import SequenceClassifier
from lightning_modules.sharding import compile_units


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_sequence_classifier_compiles_each_block_and_keeps_its_checkpoint_keys(caplog):
    torch.manual_seed(0)
    overrides = {"hidden_size": 16, "num_layers": 2}
    plain = SequenceClassifier("listops", overrides=overrides)
    compiled = SequenceClassifier("listops", overrides=overrides, compile_blocks=True)
    compiled.load_state_dict(plain.state_dict())
    assert not any(_compiled(m) for m in compiled.modules())  # nothing before the Trainer configures the model
    with caplog.at_level(logging.INFO):
        compiled.configure_model()
    assert "compile_blocks: 2 blocks (blocks.0 ... blocks.1) through torch.compile" in caplog.text
    blocks = [m for m in compiled.model.modules() if isinstance(m, Block)]
    assert len(blocks) == 2 and all(_compiled(b) for b in blocks)
    assert not _compiled(compiled.model) and not any(_compiled(m) for m in plain.modules())
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert compile_units(compiled.model, lambda name, module: isinstance(module, Block)) == []  # compiled already

    for block in blocks:  # the cheapest backend: traced, run eagerly
        block.compile(backend="aot_eager")
    ids = torch.randint(1, 10, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    plain.eval(), compiled.eval()
    torch.testing.assert_close(compiled(batch), plain(batch), rtol=1e-5, atol=1e-6)


def test_image_classifier_compiles_the_blocks_only_when_asked():
    kwargs = dict(model_name="hgrn2_vit_tiny_patch16_224", num_classes=3,
                  model_kwargs={"img_size": 32, "patch_size": 16, "embed_dim": 16, "depth": 2})  # fmt: skip
    module = ImageClassifier(**kwargs, compile_blocks=True)
    module.configure_model()
    assert [name for name, m in module.model.named_modules() if _compiled(m)] == ["blocks.0", "blocks.1"]
    plain = ImageClassifier(**kwargs)
    plain.configure_model()
    assert not any(_compiled(m) for m in plain.modules())
    assert list(module.state_dict()) == list(plain.state_dict())


def test_compile_mode_reaches_every_block_and_an_unknown_one_is_refused(monkeypatch, caplog):
    """``compile_mode`` is passed to ``torch.compile`` for each block (``reduce-overhead``: CUDA graphs); a mode
    torch.compile does not know is refused when the module is built, naming the modes it knows."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((type(self), kwargs)))
    overrides = {"hidden_size": 16, "num_layers": 2}
    module = SequenceClassifier("listops", overrides=overrides, compile_blocks=True, compile_mode="reduce-overhead")
    with caplog.at_level(logging.INFO):
        module.configure_model()
    assert calls == [(Block, {"mode": "reduce-overhead"})] * 2
    assert "through torch.compile in mode reduce-overhead" in caplog.text
    calls.clear()
    kwargs = dict(model_name="hgrn2_vit_tiny_patch16_224", num_classes=3,
                  model_kwargs={"img_size": 32, "patch_size": 16, "embed_dim": 16, "depth": 2})  # fmt: skip
    ImageClassifier(**kwargs, compile_blocks=True, compile_mode="max-autotune").configure_model()
    assert [kw for _, kw in calls] == [{"mode": "max-autotune"}] * 2
    for build in (
        lambda: SequenceClassifier("listops", overrides=overrides, compile_mode="fastest"),
        lambda: ImageClassifier(**kwargs, compile_mode="fastest"),
    ):
        with pytest.raises(ValueError, match=r"compile_mode 'fastest' is not a mode of torch.compile; use one of .*"
                           r"reduce-overhead"):  # fmt: skip
            build()

"""Checkpoints of fla and of the authors: converted models compute what the source models compute (against float64
forwards written from the sources' math), every tensor lands in the right place, and what cannot be mapped is an
error that names it; export to fla writes fla's names and its forward equals ours."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hgrn2.models.convert import folder_format, load_lm
from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig
from tests.helpers import assert_rel_close, relative_error
from tests.models.foreign_checkpoints import (
    authors_config,
    authors_logits,
    authors_weights,
    fla_config,
    fla_logits,
    fla_weights,
    write_folder,
)

IDS = torch.randint(0, 30, (2, 11), generator=torch.Generator().manual_seed(3))


def our_logits(model: HGRN2ForCausalLM, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model.double()(ids).logits


@pytest.mark.parametrize(
    "overrides, fused_mlp",
    [({}, False), ({"tie_word_embeddings": True}, False), ({"use_lower_bound": False}, False), ({}, True)],
    ids=["untied", "tied", "no-lower-bound", "early-fused-mlp"],
)
def test_fla_checkpoint_converts_to_a_model_with_the_same_logits(tmp_path, overrides, fused_mlp):
    config = fla_config(**overrides)
    weights = fla_weights(config, fused_mlp=fused_mlp)
    model = HGRN2ForCausalLM.from_fla(write_folder(tmp_path / "fla", config, weights))
    assert model.config.norm == "rmsnorm" and model.config.scale is None and model.config.norm_eps == 1e-3
    assert model.config.output_norm_eps == 1e-5  # fla's output norm ignores norm_eps
    assert model.config.tie_embeddings == config["tie_word_embeddings"]
    assert_rel_close(our_logits(model), fla_logits(config, weights, IDS), 1e-10, "logits")


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch_model.bin"])
def test_fla_weights_are_read_from_sharded_and_bin_files(tmp_path, layout):
    config = fla_config()
    weights = fla_weights(config)
    folder = tmp_path / "fla"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if layout == "pytorch_model.bin":
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        names = sorted(weights)
        shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({k: weights[k] for k in keys}, folder / file)
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_rel_close(our_logits(load_lm(folder)), fla_logits(config, weights, IDS), 1e-10, "logits")


def test_a_missing_fla_tensor_is_an_error_that_names_it(tmp_path):
    config = fla_config()
    weights = fla_weights(config)
    del weights["model.layers.1.attn.f_proj.weight"]
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.attn\.f_proj\.weight'\]"):
        HGRN2ForCausalLM.from_fla(write_folder(tmp_path, config, weights))


def test_an_fla_tensor_without_a_place_is_an_error_that_names_it(tmp_path):
    config = fla_config()
    weights = fla_weights(config)
    weights["model.layers.0.attn.q_conv1d.weight"] = torch.zeros(32, 1, 4)  # a convolution config.json denies
    with pytest.raises(ValueError, match=r"q_conv1d\.weight'\] have no place"):
        HGRN2ForCausalLM.from_fla(write_folder(tmp_path, config, weights))


def test_an_fla_tensor_of_the_wrong_shape_is_an_error_that_names_both_shapes(tmp_path):
    config = fla_config()
    weights = fla_weights(config)
    weights["model.layers.2.attn.o_proj.weight"] = torch.zeros(32, 16)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.attn\.o_proj\.weight has shape \[32, 16\] where"):
        HGRN2ForCausalLM.from_fla(write_folder(tmp_path, config, weights))


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_short_conv", True),
        ("attn", {"layers": [1], "num_heads": 2}),
        ("elementwise_affine", False),
        ("hidden_act", "gelu"),
    ],
)
def test_fla_options_without_a_counterpart_are_errors_that_name_the_field(tmp_path, field, value):
    config = fla_config(**{field: value})
    with pytest.raises(ValueError, match=rf"cannot be converted exactly: {field}="):
        HGRN2ForCausalLM.from_fla(write_folder(tmp_path, config, fla_weights(fla_config())))


def test_a_folder_of_another_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"its model_type is 'llama'"):
        load_lm(tmp_path)


def fla_numerics(**overrides) -> LMConfig:
    base = dict(vocab_size=50, hidden_size=32, num_layers=3, expand_ratio=8, glu_hidden_size=48, norm="rmsnorm",
                glu_activation="silu", scale=None, tie_embeddings=False, norm_eps=1e-3,
                output_norm_eps=1e-5)  # fmt: skip
    return LMConfig(**{**base, **overrides})


def randomised(config: LMConfig) -> HGRN2ForCausalLM:
    model = HGRN2ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 or name.startswith("lower_bounds"):
                parameter.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_export_to_fla_writes_fla_names_and_the_fla_forward_equals_ours(tmp_path, tie):
    model = randomised(fla_numerics(tie_embeddings=tie))
    folder = model.to_fla(tmp_path / "fla", tokenizer="byte")
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    assert config["model_type"] == "hgrn2" and config["eos_token_id"] == 256 and config["norm_eps"] == 1e-3
    assert sorted(weights) == sorted(fla_weights(fla_config(tie_word_embeddings=tie)))  # fla's published names
    expected = our_logits(model)
    assert_rel_close(fla_logits(config, weights, IDS), expected, 1e-10, "fla forward of the export")
    back = HGRN2ForCausalLM.from_fla(folder)
    assert torch.equal(our_logits(back), expected)


def test_export_of_a_simple_rmsnorm_model_gives_fla_unit_norm_weights(tmp_path):
    model = randomised(fla_numerics(norm="simple_rmsnorm"))
    folder = model.to_fla(tmp_path / "fla")
    config, weights = json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")
    assert torch.equal(weights["model.layers.1.attn.g_norm.weight"], torch.ones(32))
    assert_rel_close(fla_logits(config, weights, IDS), our_logits(model), 1e-10, "fla forward of the export")


def test_export_warns_when_the_output_norms_differ_from_flas(tmp_path):
    """fla's output norm has ε = 1e-5 whatever its config says: a model with another one exports with a warning
    that names the field, and fla's forward of the export differs from ours by about what the ε changes."""
    model = randomised(fla_numerics(output_norm_eps=None))  # norm_eps 1e-3 everywhere
    with pytest.warns(UserWarning, match=r"output_norm_eps"):
        folder = model.to_fla(tmp_path / "fla")
    config, weights = json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")
    assert relative_error(fla_logits(config, weights, IDS), our_logits(model)) > 1e-6


def test_export_to_fla_names_every_field_fla_cannot_represent(tmp_path):
    paper = LMConfig.from_name("tiny")  # identity GLU, scale 1
    with pytest.raises(ValueError, match=r"glu_activation='identity'.*scale=1\.0"):
        HGRN2ForCausalLM(paper).to_fla(tmp_path)


def test_the_authors_fused_in_proj_splits_into_input_output_gate_and_forget_rows(tmp_path):
    config = authors_config(decoder_embed_dim=4, expand_ratio=2, decoder_layers=1, glu_dim=4, vocab_size=8)
    weights = authors_weights(config)
    in_proj = torch.arange(12.0)[:, None] * torch.ones(1, 4)  # row r holds r everywhere
    weights["model.layers.0.token_mixer.in_proj.weight"] = in_proj
    model = HGRN2ForCausalLM.from_authors(write_folder(tmp_path, config, weights))
    mixer = model.blocks[0].mixer
    assert torch.equal(mixer.i_proj.weight[:, 0], torch.tensor([0.0, 1, 2, 3]))  # V: the input i
    assert torch.equal(mixer.q_proj.weight[:, 0], torch.tensor([4.0, 5, 6, 7]))  # Q: the output gate o
    assert torch.equal(mixer.f_proj.weight[:, 0], torch.tensor([8.0, 9, 10, 11]))  # F: the forget gate


@pytest.mark.parametrize(
    "overrides",
    [{}, {"norm_type": "layernorm", "bias": True, "in_act": "silu", "glu_act": "gelu", "tie_word_embeddings": False}],
    ids=["lm-defaults", "layernorm-biases-activations"],
)
def test_authors_checkpoint_converts_to_a_model_with_the_same_logits(tmp_path, overrides):
    config = authors_config(**overrides)
    weights = authors_weights(config)
    folder = write_folder(tmp_path / "authors", config, weights)
    assert folder_format(folder) == "authors"
    model = HGRN2ForCausalLM.from_authors(folder)
    assert model.config.scale == 1.0
    assert_rel_close(our_logits(model), authors_logits(config, weights, IDS), 1e-10, "logits")


@pytest.mark.parametrize("field, value", [("in_act", "elu"), ("no_scale_embedding", False), ("causal", False)])
def test_authors_options_without_a_counterpart_are_errors_that_name_the_field(tmp_path, field, value):
    config = authors_config(**{field: value})
    with pytest.raises(ValueError, match=rf"cannot be converted exactly: {field}="):
        HGRN2ForCausalLM.from_authors(write_folder(tmp_path, config, authors_weights(authors_config())))

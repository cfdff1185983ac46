"""save_pretrained / from_pretrained: a saved folder gives back the same model (LM, vision, LRA) with nothing
else, tied weights are stored once, the tokenizer travels with the LM, and damaged folders are clear errors."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from datamodules.tokenizer import build_tokenizer
from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig
from hgrn2.models.lra import LRAClassifier, lra_config
from hgrn2.models.pretrained import load_pretrained, tokenizer_spec
from hgrn2.models.vision import HGRN2Vision


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter moved off its initial value (norm weights and lower bounds too), so a dropped or swapped
    tensor changes the output."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "norm": "rmsnorm", "norm_eps": 1e-4}])
def test_lm_round_trip_gives_identical_logits_and_config(tmp_path, overrides):
    model = perturbed(HGRN2ForCausalLM(LMConfig.from_name("tiny", **overrides))).eval()
    model.save_pretrained(tmp_path)
    loaded = HGRN2ForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 257, (2, 13))
    assert loaded.config == model.config
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = HGRN2ForCausalLM(LMConfig.from_name("tiny"))
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "embed.weight" in stored and "lm_head.weight" not in stored
    loaded = HGRN2ForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed.weight


@pytest.mark.parametrize(
    "preset, overrides",
    [("listops", {"num_layers": 2}), ("pathfinder", {"grid_conv": 3, "num_layers": 2, "grid_size": (8, 8)})],
)
def test_lra_round_trip_gives_identical_logits_including_batchnorm_statistics(tmp_path, preset, overrides):
    config = lra_config(preset, hidden_size=16, **overrides)
    model = perturbed(LRAClassifier(config))
    inputs = torch.randint(1, 16, (4, 64)) if preset == "listops" else torch.randint(0, 256, (4, 64))
    model.train()(inputs)  # moves the BatchNorm running statistics, which the folder must keep
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = LRAClassifier.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(loaded(inputs), model(inputs))


def test_vision_round_trip_keeps_the_constructor_arguments_and_a_reset_head(tmp_path):
    model = timm.create_model(
        "hgrn2_vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=2, num_classes=5, pos_embed=True
    )
    model.reset_classifier(3)
    perturbed(model).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["config"]
    assert config["embed_dim"] == 16 and config["num_classes"] == 3 and config["pos_embed"] is True
    loaded = HGRN2Vision.from_pretrained(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(images), model(images))


def test_a_saved_folder_holds_the_tokenizer_byte_level(tmp_path):
    HGRN2ForCausalLM(LMConfig.from_name("tiny")).save_pretrained(tmp_path, tokenizer="byte")
    assert tokenizer_spec(tmp_path) == "byte"
    assert build_tokenizer(tokenizer_spec(tmp_path)).encode("é") == [195, 169]


def test_a_saved_folder_holds_a_hugging_face_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "[EOS]": 1, "the": 2, "cat": 3, "sat": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    HGRN2ForCausalLM(LMConfig.from_name("tiny", vocab_size=5)).save_pretrained(tmp_path / "lm", tokenizer=hf)
    tokenizer = build_tokenizer(tokenizer_spec(tmp_path / "lm"))
    assert tokenizer.encode("the cat sat") == [2, 3, 4] and tokenizer.eos_id == 1


def test_a_truncated_weights_file_is_an_error_that_names_it(tmp_path):
    HGRN2ForCausalLM(LMConfig.from_name("tiny")).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: its SHA-256 is not the one config\.json records"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())
    del record["weights_sha256"]  # without the checksum, the safetensors reader still refuses the file
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file.*truncated"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)


def test_a_flipped_byte_in_the_weights_is_caught_by_the_checksum(tmp_path):
    HGRN2ForCausalLM(LMConfig.from_name("tiny")).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # inside a tensor: the file still parses, its values do not
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged .* or was replaced"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)


def test_a_folder_of_another_architecture_or_field_set_is_named(tmp_path):
    LRAClassifier(lra_config("listops", hidden_size=16)).save_pretrained(tmp_path / "lra")
    with pytest.raises(ValueError, match=r"holds a LRAClassifier, not a HGRN2ForCausalLM"):
        HGRN2ForCausalLM.from_pretrained(tmp_path / "lra")
    HGRN2ForCausalLM(LMConfig.from_name("tiny")).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"LMConfig has no field\(s\) \['hidden_sise'\]"):
        load_pretrained(tmp_path / "lm", hidden_sise=3)
    record = json.loads((tmp_path / "lm" / "config.json").read_text())
    record["config"]["num_layers"] = 3  # the config now describes a model the weights do not fit
    (tmp_path / "lm" / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"missing: \['blocks\.2\."):
        load_pretrained(tmp_path / "lm")


def test_overrides_change_runtime_fields_of_the_loaded_model(tmp_path):
    HGRN2ForCausalLM(LMConfig.from_name("tiny")).save_pretrained(tmp_path)
    assert HGRN2ForCausalLM.from_pretrained(tmp_path, backend="torch").config.backend == "torch"


def test_a_missing_folder_or_weights_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing-here: no such folder"):
        HGRN2ForCausalLM.from_pretrained(tmp_path / "nothing-here")
    record = {"format": "hgrn2", "architecture": "HGRN2ForCausalLM", "config": {"vocab_size": 257}}
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: no such file"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)

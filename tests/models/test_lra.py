"""LRA classifiers: shapes, gradients, block wiring, the two-tower head, inputs, and learning a batch."""

from __future__ import annotations

import math

import pytest
import torch

from hgrn2.layers import Block
from hgrn2.models.lra import PRESETS, LRAClassifier, LRAConfig, lra_config, sinusoidal_positions
from lightning_modules.optim import OptimizerConfig, build_optimizer
from lightning_modules.sequence_classifier import SequenceClassifier
from tests.helpers import assert_rel_close

SMALL = {
    "listops": dict(hidden_size=16, num_layers=2),
    "text": dict(hidden_size=16, num_layers=2, expand_ratio=8),
    "retrieval": dict(hidden_size=16, num_layers=2),
    "image": dict(hidden_size=16, num_layers=2, grid_size=(6, 5)),
    "pathfinder": dict(hidden_size=16, num_layers=2, grid_size=(4, 4)),
    "pathx": dict(hidden_size=8, num_layers=2, grid_size=(8, 8)),
}


def small_model(preset: str, **overrides) -> LRAClassifier:
    return LRAClassifier(lra_config(preset, **{**SMALL[preset], **overrides}))


def inputs_for(model: LRAClassifier, batch: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    c = model.config
    if c.two_d:
        length = c.grid_size[0] * c.grid_size[1]
        return {"input_ids": torch.randint(0, 256, (batch, length), dtype=torch.uint8)}
    ids = torch.randint(1, c.vocab_size, (batch, length))
    mask = torch.arange(length) < torch.tensor([length, length - 3, 5])[:batch, None]
    out = {"input_ids": ids * mask, "attention_mask": mask}
    if c.dual:
        out.update(input_ids_2=torch.randint(1, c.vocab_size, (batch, length + 4)))
        out["attention_mask_2"] = torch.ones_like(out["input_ids_2"], dtype=torch.bool)
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_gives_logits_and_gradients_for_all_parameters(preset):
    model = small_model(preset)
    logits = model(**inputs_for(model))
    assert logits.shape == (3, model.config.num_classes) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_presets_carry_the_authors_lra_settings():
    table = {name: (c["hidden_size"], c["num_layers"], c["expand_ratio"], c["glu_hidden_size"], c["norm"])
             for name, c in PRESETS.items()}  # fmt: skip
    assert table == {  # GLU widths: the authors' ratio 1 (2 for Retrieval) times the width
        "listops": (64, 5, 4, 64, "batchnorm"),
        "text": (128, 4, 8, 128, "layernorm"),
        "retrieval": (256, 2, 2, 512, "batchnorm"),
        "image": (512, 6, 2, 512, "batchnorm"),
        "pathfinder": (128, 6, 2, 128, "batchnorm"),
        "pathx": (32, 6, 1, 32, "batchnorm"),
    }
    config = lra_config("pathfinder")
    assert (config.input_activation, config.output_gate, config.bias, config.prenorm) == ("silu", "sigmoid", True, True)
    assert config.two_d and not lra_config("text").two_d and lra_config("retrieval").dual


def test_encoder_is_its_blocks_in_order_then_the_final_norm():
    for prenorm in (True, False):
        model = small_model("listops", prenorm=prenorm).eval()
        x, bounds = torch.randn(2, 7, 16), model.lower_bounds()
        expected = x
        for block, bound in zip(model.blocks, bounds):
            assert block.prenorm == prenorm
            expected, _ = block(expected, lower_bound=bound)
        assert_rel_close(model.hidden_states(x), model.final_norm(expected), 1e-6, f"prenorm={prenorm}")
    assert isinstance(model.final_norm, torch.nn.Identity)  # post-norm blocks end in a norm already


def test_dropout_is_each_blocks_and_the_embeddings():
    model = small_model("text", dropout=0.3)
    assert model.dropout.p == 0.3 and all(block.dropout.p == 0.3 for block in model.blocks)
    assert isinstance(small_model("listops").blocks[0].dropout, torch.nn.Identity)  # the preset has none


def test_gradient_checkpointing_keeps_gradients_and_batchnorm_statistics():
    inputs = None
    models = [small_model("listops", backend="naive", gradient_checkpointing=on) for on in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        inputs = inputs or inputs_for(model)
        model(**inputs).logsumexp(-1).sum().backward()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert_rel_close(q.grad, p.grad, 1e-5, name)
    for (name, buffer), other in zip(models[0].named_buffers(), models[1].buffers()):
        assert torch.equal(other, buffer), name  # the recomputed forward does not count the batch twice


def test_two_tower_head_classifies_u_v_their_product_and_difference():
    model = small_model("retrieval").eval()
    first, second = torch.randint(1, 257, (2, 10)), torch.randint(1, 257, (2, 10))
    u, v = model.encode(first), model.encode(second)
    captured = {}
    model.head.register_forward_hook(lambda module, args, output: captured.update(features=args[0]))
    logits = model(first, input_ids_2=second)
    assert_rel_close(captured["features"], torch.cat([u, v, u * v, u - v], dim=-1), 1e-5, "head input")
    assert logits.shape == (2, 2)


def test_mean_pool_ignores_masked_positions():
    model = small_model("listops").eval()
    ids = torch.randint(1, 16, (1, 8))
    mask = torch.tensor([[True] * 5 + [False] * 3])
    features = {}
    model.final_norm.register_forward_hook(lambda module, args, output: features.update(x=output))
    pooled = model.encode(ids, mask)
    assert_rel_close(pooled, features["x"][:, :5].mean(dim=1), 1e-6, "masked mean")


def test_pixel_levels_map_linearly_onto_minus_one_to_one():
    model = small_model("pathfinder", positional_encoding=False, dropout=0.0)
    with torch.no_grad():
        model.embed.weight.fill_(1.0)
        model.embed.bias.zero_()
    embedded = model.embed_inputs(torch.tensor([[0, 255, 51]], dtype=torch.uint8))
    torch.testing.assert_close(embedded[0, :, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))


def test_sinusoidal_positions_match_hand_values():
    table = sinusoidal_positions(3, 4)
    expected = [[0, 1, 0, 1], [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)],
                [math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)]]  # fmt: skip
    torch.testing.assert_close(table, torch.tensor(expected, dtype=torch.float32))


def test_bad_configs_and_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="unknown LRA preset"):
        lra_config("listopz")
    with pytest.raises(ValueError, match=r"unknown LRAConfig field\(s\) \['hidden'\]"):
        lra_config("listops", hidden=3)
    with pytest.raises(ValueError, match="glu_expand_ratio is now glu_hidden_size, the GLU width itself"):
        LRAConfig.from_name("listops", glu_expand_ratio=1.0)
    with pytest.raises(ValueError, match="use_lower_bound is now lower_bound"):
        LRAConfig.from_name("listops", use_lower_bound=False)
    with pytest.raises(ValueError, match="multiple of expand_ratio"):
        lra_config("listops", hidden_size=18)
    with pytest.raises(ValueError, match="height·width = sequence length"):
        small_model("pathfinder")(torch.zeros(1, 15, dtype=torch.uint8))
    with pytest.raises(ValueError, match="needs input_ids_2"):
        small_model("retrieval")(torch.ones(1, 4, dtype=torch.long))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    module = SequenceClassifier("listops", overrides=SMALL["listops"], optim=OptimizerConfig(lr=1e-2, weight_decay=0.0))
    batch = {**inputs_for(module.model, batch=3, length=12), "labels": torch.tensor([3, 7, 1])}
    optimizer = build_optimizer(module.model, OptimizerConfig(lr=1e-2, weight_decay=0.0, schedule="constant"), 20)
    losses = []
    for step in range(12):
        loss = module.training_step(batch, step)
        optimizer["optimizer"].zero_grad()
        loss.backward()
        optimizer["optimizer"].step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    module.eval()
    assert module(batch).argmax(-1).tolist() == [3, 7, 1]


def test_block_modules_are_the_layers_blocks():
    model = small_model("image")
    assert all(isinstance(block, Block) for block in model.blocks)
    assert type(model.blocks[0].mixer).__name__ == "HGRU2d"
    assert type(small_model("text").blocks[0].mixer).__name__ == "BidirectionalHGRU2"


def test_grid_scan_picks_the_2d_mixer_mode_and_refuses_unknown_ones():
    assert not small_model("pathfinder").blocks[0].mixer.series  # the default, four scans summed
    series = small_model("pathfinder", grid_scan="series")
    assert all(block.mixer.series for block in series.blocks)
    logits = series(torch.randint(0, 256, (2, 16), dtype=torch.uint8))  # the small grid, 4 × 4
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="grid_scan"):
        lra_config("pathfinder", grid_scan="diagonal")


def test_forget_gate_init_spreads_the_initial_gates_evenly_over_the_channels():
    model = small_model("pathfinder", forget_gate_init=(0.9, 0.99))
    dim = model.config.hidden_size
    expected = torch.tensor([0.9 + 0.09 * i / (dim - 1) for i in range(dim)], dtype=torch.float64)
    for block in model.blocks:
        gates = torch.sigmoid(block.mixer.f_proj(torch.zeros(1, dim)).double())[0]
        torch.testing.assert_close(gates, expected, rtol=0, atol=1e-6)
    default = small_model("pathfinder")
    assert torch.sigmoid(default.blocks[0].mixer.f_proj.bias).max() < 0.9  # PyTorch's init: gates near 1/2
    for bad in [(0.0, 0.5), (0.6, 0.5), (0.5, 1.0), (0.5,)]:
        with pytest.raises(ValueError, match="forget_gate_init"):
            lra_config("pathfinder", forget_gate_init=bad)


def test_grid_conv_convolves_each_mixers_input_with_the_layers_dilation():
    model = small_model("pathfinder", num_layers=3, grid_conv=3, grid_conv_dilations=(1, 2)).eval()
    assert [block.grid_conv.dilation for block in model.blocks] == [1, 2, 1]  # cycled over the layers
    block, bound = model.blocks[1], model.lower_bounds()[1]
    x = torch.randn(2, 16, 16)
    convolved = block.grid_conv(block.mixer_norm(x), grid_size=(4, 4))
    mixed = x + block.mixer(convolved, lower_bound=bound, grid_size=(4, 4))[0]
    expected = mixed + block.glu(block.glu_norm(mixed))
    got, _ = block(x, lower_bound=bound, grid_size=(4, 4))
    torch.testing.assert_close(got, expected)
    logits = model.train()(**inputs_for(model))
    logits.logsumexp(-1).sum().backward()
    assert all(block.grid_conv.conv.weight.grad.abs().sum() > 0 for block in model.blocks)
    assert small_model("pathfinder").blocks[0].grid_conv is None  # off by default: the paper's encoders have none
    assert not any("grid_conv" in name for name in small_model("pathfinder").state_dict())


def test_checkpoints_with_the_grid_convolutions_outside_the_blocks_still_load():
    model = small_model("pathfinder", grid_conv=3, grid_conv_dilations=(1, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    old = {}  # how checkpoints written before the blocks held the convolutions name them
    for key, value in model.state_dict().items():
        layer, dot, rest = key.removeprefix("blocks.").partition(".grid_conv.")
        old[f"grid_convs.{layer}.{rest}" if dot else key] = value
    assert "grid_convs.1.conv.weight" in old
    fresh = small_model("pathfinder", grid_conv=3, grid_conv_dilations=(1, 2))
    fresh.load_state_dict(old)  # strict: every key placed
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name


def test_grid_conv_needs_an_odd_kernel_a_2d_model_and_positive_dilations():
    with pytest.raises(ValueError, match="grid_conv must be 0"):
        lra_config("pathfinder", grid_conv=4)
    with pytest.raises(ValueError, match="needs a 2-D model"):
        lra_config("text", grid_conv=3)
    with pytest.raises(ValueError, match="grid_conv_dilations"):
        lra_config("pathfinder", grid_conv=3, grid_conv_dilations=(1, 0))
    with pytest.raises(ValueError, match="grid_conv_dilations"):
        lra_config("pathfinder", grid_conv=3, grid_conv_dilations=())

"""HGRN2ForCausalLM: parameter counts, loss, state carry, recurrent decoding and generation."""

from __future__ import annotations

import math

import pytest
import torch

from hgrn2.models.lm import PRESETS, HGRN2ForCausalLM, LMConfig, count_parameters
from hgrn2.models.sampling import sample_next_token, top_k_filter, top_p_filter
from tests.helpers import assert_rel_close

TINY_VARIANTS = {
    "hgru2": {},
    "hgru1": dict(mixer="hgru1", expand_ratio=1),
    "bias_rmsnorm_untied": dict(bias=True, norm="rmsnorm", tie_embeddings=False),
    "layernorm_no_lower_bound_no_glu": dict(norm="layernorm", lower_bound=False, glu_hidden_size=0),
    "per_head_norm_fla_scale": dict(norm="rmsnorm", norm_per_head=True, scale=None),
}


def tiny_model(dtype=torch.float64, **overrides) -> HGRN2ForCausalLM:
    config = LMConfig.from_name("tiny", vocab_size=37, **overrides)
    model = HGRN2ForCausalLM(config).to(dtype)
    # larger than the 0.02 init so that the outputs depend visibly on the recurrence and the gates
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_parameter_count_equals_closed_form(variant):
    model = HGRN2ForCausalLM(LMConfig.from_name("tiny", **TINY_VARIANTS[variant]))
    assert model.num_parameters() == count_parameters(model.config)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_equals_closed_form(name):
    config = LMConfig.from_name(name)
    with torch.device("meta"):  # no memory, no init cost: only shapes
        model = HGRN2ForCausalLM(config)
    assert model.num_parameters() == count_parameters(config)
    print(f"{name}: {model.num_parameters() / 1e6:.2f}M parameters")


def test_wikitext_presets_have_the_papers_44m_parameters_for_both_mixers():
    hgrn2, hgrn1 = (count_parameters(LMConfig.from_name(n)) for n in ("wt103-44m", "wt103-44m-hgrn1"))
    assert hgrn2 == hgrn1  # state expansion adds no parameters
    assert 43.5e6 <= hgrn2 <= 44.5e6
    # by hand: tied GPT-2 embedding + 6 × (4 D² mixer + 3·D·1280 GLU) + Γ
    assert hgrn2 == 50272 * 512 + 6 * (4 * 512 * 512 + 3 * 512 * 1280) + 6 * 512


def test_374m_preset_is_the_benchmark_shape():
    config = LMConfig.from_name("374m")
    assert (config.hidden_size, config.num_layers, config.expand_ratio, config.glu_hidden_size) == (1024, 24, 128, 2816)
    assert config.vocab_size == 50272
    assert round(count_parameters(LMConfig.from_name("374m", vocab_size=32000)) / 1e6) == 374


def test_loss_equals_float64_cross_entropy_loop_with_ignored_targets():
    model = tiny_model()
    input_ids = torch.randint(0, 37, (2, 9))
    labels = torch.randint(0, 37, (2, 9))
    labels[0, :3] = -100
    labels[1, 5] = -100
    out = model(input_ids, labels=labels)
    log_probs = out.logits.double().log_softmax(-1)
    terms = [-log_probs[b, t, labels[b, t]] for b in range(2) for t in range(9) if labels[b, t] != -100]
    assert math.isclose(out.loss.item(), (sum(terms) / len(terms)).item(), rel_tol=1e-10)


def test_all_ignored_targets_give_zero_loss_not_nan():
    model = tiny_model()
    out = model(torch.zeros(1, 4, dtype=torch.long), labels=torch.full((1, 4), -100))
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("variant", ["hgru2", "hgru1"])
def test_carrying_state_across_segments_equals_one_forward(variant):
    model = tiny_model(**TINY_VARIANTS[variant])
    input_ids = torch.randint(0, 37, (2, 23))
    full = model(input_ids).logits
    first = model(input_ids[:, :10], output_state=True)
    second = model(input_ids[:, 10:], state=first.state, output_state=True)
    assert_rel_close(torch.cat([first.logits, second.logits], 1), full, 1e-10, "segmented logits")


@pytest.mark.parametrize("variant", ["hgru2", "hgru1"])
def test_recurrent_step_equals_parallel_forward_at_every_position(variant):
    model = tiny_model(**TINY_VARIANTS[variant])
    input_ids = torch.randint(0, 37, (3, 19))
    full = model(input_ids, output_state=True)
    state, stepped = None, []
    for t in range(input_ids.shape[1]):
        logits, state = model.step(input_ids[:, t], state)
        stepped.append(logits)
    assert_rel_close(torch.stack(stepped, 1), full.logits, 1e-10, "stepped logits")
    for layer_state, final in zip(state, full.state):
        assert_rel_close(layer_state, final, 1e-10, "final state")


@pytest.mark.parametrize("variant", ["hgru2", "hgru1"])
def test_greedy_generation_equals_argmax_of_full_forward_at_every_position(variant):
    model = tiny_model(**TINY_VARIANTS[variant])
    prompt = torch.randint(0, 37, (2, 6))
    generated = model.generate(prompt, max_new_tokens=15, temperature=0.0)
    assert generated.shape == (2, 21)
    assert torch.equal(generated[:, :6], prompt)
    predicted = model(generated).logits.argmax(-1)  # position t predicts token t + 1
    assert torch.equal(generated[:, 6:], predicted[:, 5:-1])


def test_decoding_state_size_does_not_grow_with_generated_length():
    model = tiny_model()
    state = None
    shapes = []
    for t in range(40):
        _, state = model.step(torch.tensor([t % 37]), state)
        shapes.append([tuple(s.shape) for s in state])
    assert all(s == shapes[0] for s in shapes)
    assert sum(math.prod(s) for s in shapes[0]) == model.config.num_layers * model.config.state_size


def test_generation_stops_at_stop_token_and_pads_finished_rows():
    model = tiny_model()
    prompt = torch.randint(0, 37, (1, 5))
    free = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    stop = int(free[0, 7])  # the third generated token
    stopped = model.generate(prompt, max_new_tokens=8, temperature=0.0, stop_tokens=[stop])
    first_hit = int((free[0, 5:] == stop).nonzero()[0])
    assert torch.equal(stopped[0], free[0, : 5 + first_hit + 1])
    # two rows: the row that stops first is padded with the stop token until the other one stops
    both = model.generate(torch.cat([prompt, prompt.flip(1)]), max_new_tokens=8, temperature=0.0, stop_tokens=[stop])
    for row in both:
        hits = (row[5:] == stop).nonzero()
        if len(hits):
            assert (row[5 + int(hits[0]) :] == stop).all()


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model()
    prompt = torch.randint(0, 37, (2, 4))
    a = model.generate(prompt, 30, temperature=1.0, top_k=20, top_p=0.95, seed=1)
    b = model.generate(prompt, 30, temperature=1.0, top_k=20, top_p=0.95, seed=1)
    c = model.generate(prompt, 30, temperature=1.0, top_k=20, top_p=0.95, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_and_top_p_filters_on_a_hand_example():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    inf = float("-inf")
    assert torch.equal(top_k_filter(logits, 2).isinf(), torch.tensor([[True, False, True, False]]))
    # sorted 0.5, 0.25, 0.15, 0.1: the nucleus for p = 0.7 needs 0.5 + 0.25
    assert torch.equal(top_p_filter(logits, 0.7).isinf(), torch.tensor([[True, False, True, False]]))
    assert torch.equal(top_p_filter(logits, 0.5).isinf(), torch.tensor([[True, False, True, True]]))
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert top_k_filter(logits, 1).eq(inf).sum() == 3


def test_sampling_frequencies_follow_the_filtered_distribution():
    generator = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).expand(40000, 3)
    plain = sample_next_token(logits, 1.0, generator=generator).bincount(minlength=3) / 40000
    assert torch.allclose(plain, torch.tensor([0.5, 0.3, 0.2]), atol=0.01)
    nucleus = sample_next_token(logits, 1.0, top_p=0.6, generator=generator).bincount(minlength=3) / 40000
    assert torch.allclose(nucleus, torch.tensor([0.625, 0.375, 0.0]), atol=0.01)
    # temperature 0.5 squares the probabilities before renormalising
    cold = sample_next_token(logits, 0.5, generator=generator).bincount(minlength=3) / 40000
    assert torch.allclose(cold, torch.tensor([0.25, 0.09, 0.04]) / 0.38, atol=0.01)


def test_initialisation_follows_the_standalone_code():
    model = HGRN2ForCausalLM(LMConfig.from_name("tiny", hidden_size=256, expand_ratio=64, num_layers=4))
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    assert abs(weights.std().item() - 0.02) < 0.0005
    assert abs(model.embed.weight.std().item() - 0.02) < 0.001
    betas = torch.stack(model.layer_lower_bounds())
    assert torch.allclose(betas, torch.arange(4.0)[:, None].expand(4, 256) / 4)
    assert model.lm_head.weight is model.embed.weight


def test_rescaled_residual_init_divides_output_projections_by_sqrt_2l():
    model = HGRN2ForCausalLM(LMConfig.from_name("tiny", hidden_size=256, num_layers=8, rescale_residual=True))
    std = torch.cat([b.mixer.o_proj.weight.flatten() for b in model.blocks]).std().item()
    assert abs(std - 0.02 / 4) < 0.0002


def test_invalid_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="expand_ratio=1"):
        LMConfig.from_name("tiny", mixer="hgru1")
    with pytest.raises(ValueError, match="unknown LM preset"):
        LMConfig.from_name("7b")
    with pytest.raises(ValueError, match="unknown LMConfig field"):
        LMConfig.from_name("tiny", hidden=3)
    with pytest.raises(ValueError, match="multiple of expand_ratio"):
        LMConfig(hidden_size=100, expand_ratio=64)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        tiny_model()(torch.zeros(5, dtype=torch.long))


def test_dropout_acts_in_training_only_on_the_embeddings_and_every_residual_branch():
    plain = tiny_model()
    dropped = HGRN2ForCausalLM(LMConfig.from_name("tiny", vocab_size=37, dropout=0.5)).double()
    dropped.load_state_dict(plain.state_dict())
    input_ids = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(dropped.eval()(input_ids).logits, plain(input_ids).logits)
    dropped.train()
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(dropped(input_ids).logits)
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert not torch.allclose(runs[0], plain(input_ids).logits)
    assert isinstance(dropped.dropout, torch.nn.Dropout)
    assert all(block.dropout.p == 0.5 for block in dropped.blocks)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        LMConfig.from_name("tiny", dropout=1.0)

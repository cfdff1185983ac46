"""The static-buffer decoder (CUDA graph on CUDA, eager on the CPU) against the model's own step loop."""

from __future__ import annotations

import pytest
import torch

from hgrn2.models.decoding import Decoder, clear_decoder_cache, decoder_for, generate_tokens
from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig
from tests.helpers import assert_rel_close


def tiny_model(dtype=torch.float64, **overrides) -> HGRN2ForCausalLM:
    model = HGRN2ForCausalLM(LMConfig.from_name("tiny", vocab_size=37, **overrides)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _step_loop(model, prompt, next_tokens):
    """Reference: full forward of the prompt, then ``model.step`` per token; logits of every step."""
    out = model(prompt, output_state=True)
    logits, state = [out.logits[:, -1]], out.state
    for token in next_tokens:
        step_logits, state = model.step(token, state)
        logits.append(step_logits)
    return logits, state


@pytest.mark.parametrize("variant", [{}, dict(mixer="hgru1", expand_ratio=1)])
def test_static_buffers_keep_their_storage_and_match_the_step_loop(variant):
    model = tiny_model(**variant)
    prompt = torch.randint(0, 37, (3, 7))
    decoder = Decoder(model, 3, greedy=False, use_cuda_graph=False)
    pointers = [s.data_ptr() for s in (*decoder.states, decoder.token)]
    logits = [decoder.prefill(prompt)]
    fed = []
    for _ in range(6):
        decoder.token.copy_(torch.randint(0, 37, (3,)))
        fed.append(decoder.token.clone())
        logits.append(decoder.step())
    assert [s.data_ptr() for s in (*decoder.states, decoder.token)] == pointers
    expected, state = _step_loop(model, prompt, fed)
    for got, want in zip(logits, expected):
        assert_rel_close(got, want, 1e-10, "logits")
    for got, want in zip(decoder.states, state):
        assert_rel_close(got, want, 1e-10, "state")


def test_triton_step_updates_the_static_state_in_place_and_matches_pytorch():
    triton_model = tiny_model(torch.float32, backend="triton")
    torch_model = tiny_model(torch.float32, backend="torch")
    torch_model.load_state_dict(triton_model.state_dict())
    prompt = torch.randint(0, 37, (2, 5))
    decoder = Decoder(triton_model, 2, greedy=True, use_cuda_graph=False)
    decoder.choose(decoder.prefill(prompt))
    fed, logits = [decoder.token.clone()], []
    states_before = [s.clone() for s in decoder.states]
    for _ in range(4):
        logits.append(decoder.step())
        fed.append(decoder.token.clone())
    # the greedy step chose each next token by argmax, inside the step
    assert all(torch.equal(t, step.argmax(-1)) for t, step in zip(fed[1:], logits))
    assert all(not torch.equal(a, b) for a, b in zip(states_before, decoder.states))
    expected, state = _step_loop(torch_model, prompt, fed[:-1])
    for got, want in zip(logits, expected[1:]):
        assert_rel_close(got, want, 1e-4, "logits")
    for got, want in zip(decoder.states, state):
        assert_rel_close(got, want, 1e-4, "state")
    # what makes the CUDA graph possible: the Triton step writes into the state it is given
    x = torch.randn(2, triton_model.config.hidden_size)
    _, returned = triton_model.blocks[0].step(x, decoder.states[0])
    assert returned is decoder.states[0]


def test_checking_for_finished_rows_less_often_gives_the_same_tokens():
    model = tiny_model()
    prompt = torch.randint(0, 37, (3, 4))
    free = model.generate(prompt, 12, temperature=0.0)
    stops = [int(free[0, 6]), int(free[1, 8]), int(free[2, 7])]  # every row emits one within 5 tokens
    every_token = generate_tokens(model, prompt, 12, 0.0, None, None, stops, None, stop_check_interval=1)
    every_fifth = generate_tokens(model, prompt, 12, 0.0, None, None, stops, None, stop_check_interval=5)
    assert torch.equal(every_token, every_fifth)
    assert every_token.shape[1] <= prompt.shape[1] + 5  # stopped early: all rows finished


def test_decoder_is_reused_until_the_parameters_or_settings_change():
    model = tiny_model()
    first = decoder_for(model, 2, True, (), None)
    assert decoder_for(model, 2, True, (), None) is first
    assert decoder_for(model, 3, True, (), None) is not first
    again = decoder_for(model, 3, True, (), None)
    model.float()  # new parameter storage: a captured graph would read freed memory
    assert decoder_for(model, 3, True, (), None) is not again
    clear_decoder_cache(model)


def test_cuda_graph_on_the_cpu_is_refused():
    with pytest.raises(ValueError, match="use_cuda_graph=True needs the model on a CUDA device"):
        Decoder(tiny_model(), 1, greedy=True, use_cuda_graph=True)


@pytest.mark.gpu
def test_cuda_graph_decoding_equals_eager_decoding_on_the_gpu():
    model = tiny_model(torch.float32).cuda()
    prompt = torch.randint(0, 37, (4, 9), device="cuda")
    graphed = model.generate(prompt, 40, temperature=0.0, use_cuda_graph=True)
    eager = model.generate(prompt, 40, temperature=0.0, use_cuda_graph=False)
    assert torch.equal(graphed, eager)
    predicted = model(graphed).logits.argmax(-1)
    assert (graphed[:, 9:] == predicted[:, 8:-1]).float().mean() > 0.95

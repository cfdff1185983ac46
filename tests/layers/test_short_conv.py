"""The short convolutions (causal over time, and over a pixel grid) against float64 loops, and the LM built with
the causal one."""

import pytest
import torch

from hgrn2.layers import GridConvolution, ShortConvolution
from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig, count_parameters
from tests.helpers import assert_rel_close

F64 = torch.float64


def loop_reference(x: torch.Tensor, weight: torch.Tensor, starts: list[int] | None = None) -> torch.Tensor:
    """y[b, t, d] = Σ_j weight[d, j] · x[b, t - j, d] over the taps that stay inside t's sequence."""
    batch, seq_len, dim = x.shape
    starts = starts or [0]
    y = torch.zeros_like(x)
    for b in range(batch):
        for t in range(seq_len):
            start = max(s for s in starts if s <= t)
            for d in range(dim):
                for j in range(weight.shape[1]):
                    if t - j >= start:
                        y[b, t, d] += weight[d, j] * x[b, t - j, d]
    return y


@pytest.mark.parametrize("seq_len, kernel_size", [(9, 4), (2, 4), (5, 1)])
def test_matches_the_loop_and_is_differentiable(seq_len, kernel_size):
    torch.manual_seed(0)
    conv = ShortConvolution(3, kernel_size).double()
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(2, seq_len, 3, dtype=F64, requires_grad=True)
    assert_rel_close(conv(x), loop_reference(x.detach(), conv.weight.detach()), 1e-12, "y")
    assert torch.autograd.gradcheck(conv, (x,))


def test_starts_as_the_identity():
    x = torch.randn(2, 6, 5)
    assert torch.equal(ShortConvolution(5, 3)(x), x)


def test_packed_sequences_do_not_see_each_other():
    torch.manual_seed(1)
    conv = ShortConvolution(4, 3).double()
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(1, 10, 4, dtype=F64)
    cu_seqlens = torch.tensor([0, 1, 4, 10])
    packed = conv(x, cu_seqlens)
    assert_rel_close(packed, loop_reference(x, conv.weight.detach(), starts=[0, 1, 4]), 1e-12, "packed")
    separate = torch.cat([conv(x[:, a:b]) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])], dim=1)
    assert_rel_close(packed, separate, 1e-12, "packed vs separate")


def test_bad_shapes_and_sizes_are_named():
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        ShortConvolution(4, 0)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, D\] with D = 4, got \[2, 3, 5\]"):
        ShortConvolution(4, 2)(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="short_conv must be >= 0"):
        LMConfig.from_name("tiny", short_conv=-1)


def _model(**overrides) -> HGRN2ForCausalLM:
    torch.manual_seed(2)
    model = HGRN2ForCausalLM(LMConfig.from_name("tiny", vocab_size=31, short_conv=3, **overrides)).double()
    with torch.no_grad():
        for block in model.blocks:
            block.short_conv.weight.normal_()
    return model


@pytest.mark.parametrize("mixer", ["hgru2", "hgru1"])
def test_lm_with_short_conv_is_causal_counts_its_parameters_and_trains_the_taps(mixer):
    model = _model(**({"mixer": "hgru1", "expand_ratio": 1} if mixer == "hgru1" else {}))
    assert model.num_parameters() == count_parameters(model.config)
    input_ids = torch.randint(0, 31, (2, 12))
    logits = model(input_ids).logits
    changed = input_ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 31
    other = model(changed).logits
    assert torch.equal(logits[:, :7], other[:, :7])  # nothing before position 7 sees it
    assert not torch.allclose(logits[:, 7:], other[:, 7:])
    model(input_ids, labels=input_ids).loss.backward()
    for block in model.blocks:
        assert block.short_conv.weight.grad.abs().sum() > 0


def test_lm_with_short_conv_refuses_state_carrying_and_step_decoding():
    model = _model()
    input_ids = torch.randint(0, 31, (1, 5))
    message = "short_conv > 0 runs whole sequences only"
    with pytest.raises(ValueError, match=message):
        model(input_ids, output_state=True)
    with pytest.raises(ValueError, match=message):
        model.step(input_ids[:, 0])
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids, max_new_tokens=2)


def grid_loop_reference(x, weight, bias, height, width, dilation):
    """y[b, i·w + j, d] = silu(bias[d] + Σ_{a, c} weight[d, a, c] · x[b, (i + δa)·w + (j + δc), d]) over the taps
    inside the grid, δa = dilation · (a - k // 2)."""
    batch, _, dim = x.shape
    k = weight.shape[-1]
    y = torch.zeros_like(x)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                for d in range(dim):
                    total = bias[d].clone()
                    for a in range(k):
                        for c in range(k):
                            row, col = i + dilation * (a - k // 2), j + dilation * (c - k // 2)
                            if 0 <= row < height and 0 <= col < width:
                                total += weight[d, a, c] * x[b, row * width + col, d]
                    y[b, i * width + j, d] = total * torch.sigmoid(total)
    return y


@pytest.mark.parametrize("kernel_size, dilation", [(3, 1), (3, 2), (1, 1), (5, 3)])
def test_grid_convolution_matches_the_loop_on_a_non_square_grid(kernel_size, dilation):
    torch.manual_seed(3)
    conv = GridConvolution(3, kernel_size, dilation).double()
    x = torch.randn(2, 4 * 5, 3, dtype=F64, requires_grad=True)
    weight, bias = conv.conv.weight.detach()[:, 0], conv.conv.bias.detach()
    expected = grid_loop_reference(x.detach(), weight, bias, 4, 5, dilation)
    assert_rel_close(conv(x, grid_size=(4, 5)), expected, 1e-12, "grid conv")
    assert torch.autograd.gradcheck(lambda t: conv(t, grid_size=(4, 5)), (x,))


def test_grid_convolution_names_bad_sizes_and_grids():
    for bad in [dict(kernel_size=2), dict(kernel_size=0), dict(dilation=0)]:
        with pytest.raises(ValueError, match="odd kernel_size and dilation >= 1"):
            GridConvolution(4, **bad)
    with pytest.raises(ValueError, match="not a 3×3 grid"):
        GridConvolution(4)(torch.zeros(1, 10, 4), grid_size=(3, 3))
    with pytest.raises(ValueError, match=r"x must have shape \[B, h·w, D\] with D = 4"):
        GridConvolution(4)(torch.zeros(1, 9, 5))

"""Layers: HGRU2 against HGRU1, recurrent steps against the parallel forward, the lower-bound schedule."""

import pytest
import torch
import torch.nn.functional as F

from hgrn2.layers import (
    GLU,
    HGRU1,
    HGRU2,
    BidirectionalHGRU2,
    Block,
    LayerLowerBounds,
    lower_bound_schedule,
    run_blocks,
)
from hgrn2.ops import lower_bounded_log_forget
from hgrn2.ops.reference import hgrn2_recurrence_naive
from tests.helpers import assert_rel_close

F64 = torch.float64


def copy_projections(src, dst):
    for name in ("q_proj", "f_proj", "i_proj", "o_proj"):
        getattr(dst, name).load_state_dict(getattr(src, name).state_dict())


@pytest.mark.parametrize("input_activation, output_gate", [("identity", "silu"), ("silu", "sigmoid")])
def test_hgru2_with_expand_ratio_one_reproduces_hgru1(input_activation, output_gate):
    dim = 12
    kwargs = dict(input_activation=input_activation, output_gate=output_gate, norm="rmsnorm", bias=True)
    hgru2 = HGRU2(dim, expand_ratio=1, **kwargs).double()
    hgru1 = HGRU1(dim, **kwargs).double()
    copy_projections(hgru2, hgru1)
    x = torch.randn(2, 21, dim, dtype=F64)
    beta = torch.rand(dim, dtype=F64) * 0.9
    y2, s2 = hgru2(x, lower_bound=beta, output_final_state=True)
    y1, s1 = hgru1(x, lower_bound=beta, output_final_state=True)
    assert_rel_close(y2, y1, 1e-10, "y")
    assert_rel_close(s2.reshape(2, dim), s1, 1e-10, "state")


def test_hgru2_forward_matches_the_paper_equations_written_out():
    torch.manual_seed(1)
    dim, expand = 8, 4
    layer = HGRU2(dim, expand_ratio=expand).double()
    x = torch.randn(1, 9, dim, dtype=F64)
    beta = torch.full((dim,), 0.3, dtype=F64)
    # Independent of the layer's code path: gates from the definitions, then the naive recurrence.
    q = F.silu(x @ layer.q_proj.weight.T).view(1, 9, 2, expand)
    forget = 0.3 + 0.7 * torch.sigmoid(x @ layer.f_proj.weight.T)
    v = (x @ layer.i_proj.weight.T).view(1, 9, 2, expand)
    o, _ = hgrn2_recurrence_naive(q, v, forget.log().view(1, 9, 2, expand))
    o = o.reshape(1, 9, dim)
    expected = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)) @ layer.o_proj.weight.T
    y, _ = layer(x, lower_bound=beta)
    assert_rel_close(y, expected, 1e-10, "y")


@pytest.mark.parametrize("mixer_cls", [HGRU2, HGRU1])
def test_block_steps_equal_the_parallel_forward(mixer_cls):
    dim = 8
    mixer = mixer_cls(dim, expand_ratio=4) if mixer_cls is HGRU2 else mixer_cls(dim)
    block = Block(mixer, glu_hidden_size=16).double()
    x = torch.randn(2, 11, dim, dtype=F64)
    beta = torch.rand(dim, dtype=F64) * 0.5
    y_par, s_par = block(x, lower_bound=beta, output_final_state=True)
    state, outputs = None, []
    for t in range(11):
        y_t, state = block.step(x[:, t], state, lower_bound=beta)
        outputs.append(y_t)
    assert_rel_close(torch.stack(outputs, 1), y_par, 1e-10, "y")
    assert_rel_close(state, s_par, 1e-10, "state")


def test_lower_bound_schedule_is_zero_first_non_decreasing_and_below_one():
    gamma = torch.randn(6, 10, dtype=F64) * 3
    beta = lower_bound_schedule(gamma)
    assert torch.all(beta[0] == 0)
    assert torch.all(beta[1:] >= beta[:-1])
    assert torch.all((beta >= 0) & (beta < 1))
    probs = gamma.softmax(0)
    assert_rel_close(beta[3], probs[1] + probs[2] + probs[3], 1e-12, "beta[3]")
    assert LayerLowerBounds(4, 3)().shape == (4, 3)


def test_lower_bounded_forget_gate_equals_its_definition_and_has_finite_gradients_at_zero_bound():
    f = torch.randn(50, dtype=F64) * 5
    beta = torch.linspace(0, 0.99, 50, dtype=F64)
    expected = torch.log(beta + (1 - beta) * torch.sigmoid(f))
    assert_rel_close(lower_bounded_log_forget(f, beta), expected, 1e-12, "log λ")
    gamma = torch.zeros(3, 4, requires_grad=True)
    f = torch.randn(4, requires_grad=True)
    lower_bounded_log_forget(f, lower_bound_schedule(gamma)[0]).sum().backward()
    assert torch.isfinite(gamma.grad).all() and torch.isfinite(f.grad).all()


def test_glu_is_down_of_activation_times_up():
    glu = GLU(4, 6, activation="silu").double()
    x = torch.randn(3, 4, dtype=F64)
    expected = (F.silu(x @ glu.gate_proj.weight.T) * (x @ glu.up_proj.weight.T)) @ glu.down_proj.weight.T
    assert_rel_close(glu(x), expected, 1e-12, "glu")


def test_bidirectional_mixer_sums_forward_and_reversed_scans():
    layer = BidirectionalHGRU2(8, expand_ratio=4, norm="identity").double()
    x = torch.randn(2, 7, 8, dtype=F64)
    y, _ = layer(x)
    q_proj, v, f_proj = layer.project(x)
    q, g = F.silu(q_proj), F.logsigmoid(f_proj)
    fwd, _ = hgrn2_recurrence_naive(q, v, g)
    bwd, _ = hgrn2_recurrence_naive(q.flip(1), v.flip(1), g.flip(1))
    expected = layer.o_proj((fwd + bwd.flip(1)).flatten(-2))
    assert_rel_close(y, expected, 1e-10, "y")


def test_layers_reject_mismatched_widths():
    with pytest.raises(ValueError, match="multiple of expand_ratio"):
        HGRU2(10, expand_ratio=4)
    layer = HGRU2(8, expand_ratio=4)
    with pytest.raises(ValueError, match=r"D = hidden_size = 8 \(H·K = 2·4\), got \[2, 3, 6\]"):
        layer(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"lower_bound must have shape \[D\] = \[8\]"):
        layer(torch.randn(2, 3, 8), lower_bound=torch.zeros(4))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        layer(torch.randn(2, 3, 8), initial_state=torch.zeros(2, 4, 2, 2))


def test_bidirectional_mixer_ignores_padding_under_a_mask():
    layer = BidirectionalHGRU2(8, expand_ratio=4).double()
    x = torch.randn(1, 6, 8, dtype=F64)
    beta = torch.full((8,), 0.4, dtype=F64)
    padded = torch.cat([x, torch.randn(1, 5, 8, dtype=F64)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 5])
    y_alone, _ = layer(x, lower_bound=beta)
    y_padded, _ = layer(padded, lower_bound=beta, mask=mask)
    assert_rel_close(y_padded[:, :6], y_alone, 1e-10, "y at real positions")
    y_unmasked, _ = layer(padded, lower_bound=beta)
    assert (y_unmasked[:, :6] - y_alone).abs().max() > 1e-3  # without the mask, padding leaks backwards


def test_sequence_batchnorm_normalises_features_and_survives_sync_conversion():
    from hgrn2.layers import make_norm

    norm = make_norm("batchnorm", 3)
    x = torch.randn(4, 7, 3) * torch.tensor([1.0, 5.0, 10.0]) + 2.0
    y = norm(x)
    assert torch.allclose(y.mean(dim=(0, 1)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(dim=(0, 1), unbiased=False), torch.ones(3), atol=1e-3)
    reference = torch.nn.BatchNorm1d(3).double()  # the [B, D, T] layout, statistics over batch and time
    x64 = x.double().requires_grad_()
    expected = reference(x64.transpose(1, 2)).transpose(1, 2)
    mine = make_norm("batchnorm", 3).double()  # fresh running statistics, as the reference's
    x_mine = x.double().requires_grad_()
    got = mine(x_mine)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(got)
    (got * grad).sum().backward()
    (expected * grad).sum().backward()
    torch.testing.assert_close(x_mine.grad, x64.grad)
    torch.testing.assert_close(mine.norm.running_var, reference.running_var)  # unbiased over B·T, both ways
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(norm))
    assert isinstance(synced[0].norm, torch.nn.SyncBatchNorm)
    assert synced[0].norm.num_features == 3  # still normalising D, not T


def _block(**options) -> Block:
    return Block(HGRU2(8, expand_ratio=4), glu_hidden_size=16, glu_activation="silu", **options).double()


def test_block_drops_each_branch_output_in_training():
    block = _block(dropout=0.3).train()
    x, beta = torch.randn(2, 7, 8, dtype=F64), torch.rand(8, dtype=F64) * 0.5
    torch.manual_seed(5)
    out, _ = block(x, lower_bound=beta)
    torch.manual_seed(5)  # the same masks, drawn in the same order: mixer branch, then GLU branch
    mid = x + F.dropout(block.mixer(block.mixer_norm(x), lower_bound=beta)[0], 0.3)
    expected = mid + F.dropout(block.glu(block.glu_norm(mid)), 0.3)
    assert_rel_close(out, expected, 1e-12, "pre-norm block with dropout")
    eval_out, _ = block.eval()(x, lower_bound=beta)
    mid = x + block.mixer(block.mixer_norm(x), lower_bound=beta)[0]
    assert_rel_close(eval_out, mid + block.glu(block.glu_norm(mid)), 1e-12, "eval: no dropout")


def test_postnorm_block_normalises_after_each_residual_sum():
    block = Block(BidirectionalHGRU2(8, expand_ratio=4), 16, norm="layernorm", prenorm=False).double()
    x, beta = torch.randn(2, 7, 8, dtype=F64), torch.rand(8, dtype=F64) * 0.5
    mixed = block.mixer_norm(x + block.mixer(x, lower_bound=beta)[0])
    expected = block.glu_norm(mixed + block.glu(mixed))
    out, _ = block(x, lower_bound=beta)
    assert_rel_close(out, expected, 1e-12, "post-norm block")


def test_drop_path_skips_whole_blocks_per_sample_and_scales_the_kept_ones():
    block = _block(drop_path=0.5).train()
    x = torch.randn(64, 3, 8, dtype=F64)
    out, _ = block(x)
    full, _ = block.eval()(x)  # eval: every sample keeps the block
    skipped = (out - x).flatten(1).abs().amax(1) == 0
    kept = torch.isclose(out, x + 2 * (full - x), rtol=0, atol=1e-12).flatten(1).all(1)
    assert bool((skipped ^ kept).all()), "each sample either skips the block or keeps both branches, scaled by 2"
    assert 10 < int(skipped.sum()) < 54  # about half of 64
    block.drop_path.drop_prob = 1.0
    torch.testing.assert_close(block.train()(x)[0], x)


def test_pending_branch_is_the_residual_add_left_to_the_next_block():
    first, second = _block(), _block()
    x, beta = torch.randn(2, 5, 8, dtype=F64), torch.rand(8, dtype=F64) * 0.5
    rest, pending, _ = first(x, lower_bound=beta, return_pending=True)
    out, _ = first(x, lower_bound=beta)
    assert_rel_close(rest + pending, out, 1e-12, "x' + pending'")
    folded, _ = second(rest, lower_bound=beta, pending=pending)
    assert_rel_close(folded, second(out, lower_bound=beta)[0], 1e-12, "pending folded into the next block's norm")


def test_block_options_that_exclude_each_other_are_named():
    with pytest.raises(ValueError, match="drop_path skips a pre-norm block's residual branches"):
        _block(prenorm=False, drop_path=0.1)
    with pytest.raises(ValueError, match="short_conv .* and grid_conv .* exclude each other"):
        _block(short_conv=3, grid_conv=3)
    with pytest.raises(ValueError, match="0 <= dropout < 1"):
        _block(dropout=1.0)


def test_checkpointed_blocks_give_the_same_outputs_gradients_and_batchnorm_statistics():
    torch.manual_seed(3)
    blocks = [Block(BidirectionalHGRU2(8, expand_ratio=4), 16, norm="batchnorm").double() for _ in range(2)]
    copies = [Block(BidirectionalHGRU2(8, expand_ratio=4), 16, norm="batchnorm").double() for _ in range(2)]
    for block, copy in zip(blocks, copies):
        copy.load_state_dict(block.state_dict())
    x, betas = torch.randn(3, 6, 8, dtype=F64), [None, torch.rand(8, dtype=F64) * 0.5]
    results = []
    for stack, checkpointing in ((blocks, False), (copies, True)):
        out, pending, _ = run_blocks(stack, x, betas, checkpointing=checkpointing)
        (out + pending).square().sum().backward()
        results.append(out + pending)
    assert_rel_close(results[1], results[0], 1e-12, "output")
    for block, copy in zip(blocks, copies):
        for (name, p), q in zip(block.named_parameters(), copy.parameters()):
            assert_rel_close(q.grad, p.grad, 1e-10, name)
        # the recomputed forward does not count the batch again
        for (name, buffer), other in zip(block.named_buffers(), copy.buffers()):
            assert torch.equal(other, buffer), name

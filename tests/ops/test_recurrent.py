"""The fused recurrent Triton kernel (decoding step and short sequences) against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hgrn2.ops.reference import hgrn2_recurrence_naive
from tests.helpers import DEVICE, assert_rel_close

recurrent = pytest.importorskip("hgrn2.ops.recurrent")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _inputs(batch, seq_len, heads, key_dim, value_dim, dtype, gates="logsigmoid"):
    q = torch.randn(batch, seq_len, heads, key_dim, device=DEVICE).to(dtype)
    v = torch.randn(batch, seq_len, heads, value_dim, device=DEVICE).to(dtype)
    if gates == "extreme":  # per channel: log λ = -30 or λ = 1 - 1e-6
        channel = torch.arange(key_dim, device=DEVICE)
        log_forget = torch.where(channel % 2 == 0, -30.0, math.log1p(-1e-6)).expand(q.shape).to(dtype)
    else:
        log_forget = F.logsigmoid(2 * torch.randn(batch, seq_len, heads, key_dim, device=DEVICE)).to(dtype)
    return q, v, log_forget


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gates", ["logsigmoid", "extreme"])
def test_decoding_steps_update_the_state_in_place_and_match_naive(dtype, gates):
    batch, seq_len, heads, key_dim, value_dim = 2, 5, 2, 20, 36  # K != V, neither a power of two
    q, v, log_forget = _inputs(batch, seq_len, heads, key_dim, value_dim, dtype, gates)
    h0 = torch.randn(batch, heads, key_dim, value_dim, device=DEVICE)
    state = h0.clone()
    outputs = []
    for t in range(seq_len):
        o, returned = recurrent.fused_recurrent_hgrn2_step(q[:, t], v[:, t], log_forget[:, t], state, scale=0.5)
        assert returned is state and o.dtype == dtype
        outputs.append(o)
    o_ref, final_ref = hgrn2_recurrence_naive(
        q.double().cpu(), v.double().cpu(), log_forget.double().cpu(), scale=0.5,
        initial_state=h0.double().cpu(), output_final_state=True,
    )  # fmt: skip
    assert_rel_close(torch.stack(outputs, dim=1).float(), o_ref, TOL[dtype], "o")
    assert_rel_close(state, final_ref, TOL[dtype], "state")


def test_fused_recurrent_matches_naive_with_packed_sequences_and_writes_the_state_in_place():
    bounds = [0, 1, 9, 20]
    q, v, log_forget = _inputs(1, bounds[-1], 2, 16, 24, torch.float32)
    cu_seqlens = torch.tensor(bounds, device=DEVICE)
    h0 = torch.randn(len(bounds) - 1, 2, 16, 24, device=DEVICE)
    o_ref, final_ref = hgrn2_recurrence_naive(
        q.double().cpu(), v.double().cpu(), log_forget.double().cpu(), initial_state=h0.double().cpu(),
        output_final_state=True, cu_seqlens=cu_seqlens.cpu(),
    )  # fmt: skip
    o, final = recurrent.fused_recurrent_hgrn2(
        q, v, log_forget, initial_state=h0.clone(), output_final_state=True, cu_seqlens=cu_seqlens
    )
    assert_rel_close(o, o_ref, 1e-4, "o")
    assert_rel_close(final, final_ref, 1e-4, "final_state")
    state = h0.clone()
    o, returned = recurrent.fused_recurrent_hgrn2(
        q, v, log_forget, initial_state=state, cu_seqlens=cu_seqlens, inplace_state=True
    )
    assert returned is state
    assert_rel_close(state, final_ref, 1e-4, "state written in place")


def test_fused_recurrent_refuses_inputs_that_need_gradients():
    q, v, log_forget = _inputs(1, 3, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="forward only"):
        recurrent.fused_recurrent_hgrn2(q.requires_grad_(), v, log_forget)


def test_decoding_step_rejects_a_state_it_cannot_update_in_place():
    q, v, log_forget = _inputs(1, 1, 1, 16, 16, torch.float32)
    state = torch.zeros(1, 1, 16, 16, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        recurrent.fused_recurrent_hgrn2_step(q[:, 0], v[:, 0], log_forget[:, 0], state)


def test_hgrn2_step_runs_the_fused_kernel_under_the_triton_backend(monkeypatch):
    from hgrn2.ops import hgrn2_step

    calls = []
    original = recurrent.fused_recurrent_hgrn2_step
    monkeypatch.setattr(recurrent, "fused_recurrent_hgrn2_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    q, v, log_forget = _inputs(2, 1, 2, 16, 16, torch.float32)
    state = torch.randn(2, 2, 16, 16, device=DEVICE)
    o_ref, final_ref = hgrn2_recurrence_naive(
        q.double().cpu(), v.double().cpu(), log_forget.double().cpu(), initial_state=state.double().cpu(),
        output_final_state=True,
    )  # fmt: skip
    o, new_state = hgrn2_step(q[:, 0], v[:, 0], log_forget[:, 0], state, backend="triton")
    assert calls == [1] and new_state is state
    assert_rel_close(o, o_ref[:, 0], 1e-4, "o")
    assert_rel_close(new_state, final_ref, 1e-4, "state")

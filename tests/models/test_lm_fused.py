"""The LM's fused path (fused norms, GLU and loss on the Triton kernels) against the unfused modules."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig
from tests.helpers import assert_rel_close

VARIANTS = {
    "hgru2": {},
    "per_head_rmsnorm_bias_silu_glu_checkpointed": dict(
        norm="rmsnorm", norm_per_head=True, bias=True, glu_activation="silu", gradient_checkpointing=True
    ),
    "hgru1_no_glu_no_lower_bound": dict(mixer="hgru1", expand_ratio=1, glu_hidden_size=0, lower_bound=False),
}


def _pair(dtype=torch.float32, **overrides) -> tuple[HGRN2ForCausalLM, HGRN2ForCausalLM]:
    """The same weights twice: on the PyTorch modules, and on the Triton recurrence with the fused kernels."""
    reference = HGRN2ForCausalLM(LMConfig.from_name("tiny", vocab_size=37, backend="torch", **overrides)).to(dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    fused = HGRN2ForCausalLM(LMConfig.from_name("tiny", vocab_size=37, backend="triton", **overrides)).to(dtype)
    fused.load_state_dict(reference.state_dict())
    assert fused.uses_fused_kernels(torch.device("cpu")) and not reference.uses_fused_kernels(torch.device("cpu"))
    return reference, fused


def test_loss_without_logits_equals_loss_from_full_logits_with_the_same_gradients():
    model = HGRN2ForCausalLM(LMConfig.from_name("tiny", vocab_size=37, tie_embeddings=False)).double()
    input_ids, labels = torch.randint(0, 37, (2, 11)), torch.randint(0, 37, (2, 11))
    labels[0, :4] = -100
    full = model(input_ids, labels=labels)
    full.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lean = model(input_ids, labels=labels, return_logits=False)
    lean.loss.backward()
    assert lean.logits is None
    # the blockwise loss keeps its softmax statistics in float32
    assert math.isclose(lean.loss.item(), full.loss.item(), rel_tol=1e-6)
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, expected[name], 1e-6, name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_path_equals_unfused_modules_in_logits_states_loss_and_gradients(variant):
    reference, fused = _pair(**VARIANTS[variant])
    input_ids, labels = torch.randint(0, 37, (2, 21)), torch.randint(0, 37, (2, 21))
    labels[1, 3] = -100
    assert reference.training and fused.training  # checkpointing applies in training mode
    ref_out, fused_out = (m(input_ids, output_state=True) for m in (reference, fused))
    assert_rel_close(fused_out.logits, ref_out.logits, 1e-4, "logits")
    for got, want in zip(fused_out.state, ref_out.state):
        assert_rel_close(got, want, 1e-4, "final state")
    assert_same_loss_and_gradients(reference, fused, input_ids, labels)


def test_fused_path_with_a_short_convolution_equals_unfused_modules():
    reference, fused = _pair(short_conv=3)  # whole sequences only: no states to compare
    input_ids, labels = torch.randint(0, 37, (2, 19)), torch.randint(0, 37, (2, 19))
    assert_rel_close(fused(input_ids).logits, reference(input_ids).logits, 1e-4, "logits")
    assert_same_loss_and_gradients(reference, fused, input_ids, labels)


def assert_same_loss_and_gradients(reference, fused, input_ids, labels) -> None:
    losses = [m(input_ids, labels=labels, return_logits=False).loss for m in (reference, fused)]
    assert_rel_close(losses[1], losses[0], 1e-5, "loss")
    for loss in losses:
        loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        assert_rel_close(p.grad, ref_params[name].grad, 1e-3, f"d {name}")


def test_unfused_configs_and_cpu_auto_backend_keep_the_module_path():
    cpu = torch.device("cpu")
    assert not HGRN2ForCausalLM(LMConfig.from_name("tiny")).uses_fused_kernels(cpu)  # auto on the CPU
    assert not HGRN2ForCausalLM(LMConfig.from_name("tiny", backend="triton", fused=False)).uses_fused_kernels(cpu)
    layernorm = LMConfig.from_name("tiny", backend="triton", norm="layernorm")
    assert not HGRN2ForCausalLM(layernorm).uses_fused_kernels(cpu)


def test_loss_only_forward_needs_labels():
    model = HGRN2ForCausalLM(LMConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="return_logits=False returns only the loss: pass labels"):
        model(torch.zeros(1, 3, dtype=torch.long), return_logits=False)


@pytest.mark.gpu
def test_fused_path_on_cuda_equals_the_unfused_modules_under_bf16_autocast():
    config = LMConfig.from_name("demo", vocab_size=300)
    reference = HGRN2ForCausalLM(dataclasses.replace(config, fused=False)).cuda()
    fused = HGRN2ForCausalLM(config).cuda()
    fused.load_state_dict(reference.state_dict())
    input_ids = torch.randint(0, 300, (2, 200), device="cuda")
    labels = input_ids.roll(-1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = [m(input_ids, labels=labels, return_logits=False).loss for m in (reference, fused)]
    assert_rel_close(losses[1], losses[0], 1e-3, "loss")
    for loss in losses:
        loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        assert_rel_close(p.grad, ref_params[name].grad, 3e-2, f"d {name}")

"""The LM's fused loss, and where the fused kernels run (tests/models/test_fused_paths.py compares the paths)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig
from tests.helpers import assert_rel_close


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


def test_training_loss_on_the_fused_kernels_equals_the_pytorch_model_with_the_same_gradients():
    reference = HGRN2ForCausalLM(LMConfig.from_name("tiny", vocab_size=37, backend="torch"))
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    fused = HGRN2ForCausalLM(LMConfig.from_name("tiny", vocab_size=37, backend="triton"))
    fused.load_state_dict(reference.state_dict())
    assert fused.uses_fused_kernels(torch.device("cpu")) and not reference.uses_fused_kernels(torch.device("cpu"))
    input_ids, labels = torch.randint(0, 37, (2, 21)), torch.randint(0, 37, (2, 21))
    labels[1, 3] = -100
    # the blockwise loss (Triton on the fused model) over the recurrence, norm and GLU kernels
    losses = [m(input_ids, labels=labels, return_logits=False).loss for m in (reference, fused)]
    assert_rel_close(losses[1], losses[0], 1e-5, "loss")
    for loss in losses:
        loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        assert_rel_close(p.grad, ref_params[name].grad, 1e-3, f"d {name}")


def test_fused_kernels_run_only_with_fused_on_a_triton_recurrence():
    cpu = torch.device("cpu")
    assert not HGRN2ForCausalLM(LMConfig.from_name("tiny")).uses_fused_kernels(cpu)  # auto on the CPU
    assert not HGRN2ForCausalLM(LMConfig.from_name("tiny", backend="torch")).uses_fused_kernels(cpu)
    assert not HGRN2ForCausalLM(LMConfig.from_name("tiny", backend="triton", fused=False)).uses_fused_kernels(cpu)
    model = HGRN2ForCausalLM(LMConfig.from_name("tiny", backend="triton", norm="layernorm"))
    # a LayerNorm has no fused kernel: the block keeps the module for it and fuses the GLU
    x = torch.zeros(1, 1, 64)
    assert model.uses_fused_kernels(cpu) and model.blocks[0].runs_fused(x) and model.blocks[0].mixer.runs_fused(x)


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

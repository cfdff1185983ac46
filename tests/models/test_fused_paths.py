"""Every model flag on the fused and the unfused path: the same outputs, states and gradients.

The LM, LRA and vision models are built twice with the same weights, ``fused=False`` and ``fused=True``, both on
the Triton recurrence (through the interpreter on the CPU), so that the two differ only in how the blocks run:
the plain norm and GLU modules, or the fused add + RMSNorm and GLU kernels. Each variant turns on several flags
at once, and together they cover every field of the three configs; a flag that one path dropped would change
that path's outputs or gradients. ``precise_bound_grad`` changes nothing in float32, so what reaches the chunked
kernels is recorded on both paths, and a bfloat16 run checks that the flag changes the lower bounds' gradient
on each path.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig
from hgrn2.models.lra import LRAClassifier, LRAConfig
from hgrn2.models.vision import HGRN2Vision, VisionConfig
from hgrn2.ops import triton_available
from tests.helpers import assert_rel_close

interpreted = pytest.mark.skipif(
    not triton_available(torch.device("cpu")), reason="needs triton (TRITON_INTERPRET=1 runs its kernels on the CPU)"
)

LM_BASE = dict(vocab_size=29, hidden_size=32, num_layers=2, expand_ratio=16, glu_hidden_size=48, backend="triton")
LM_VARIANTS = {
    "paper_defaults_with_carried_state": {},
    "per_head_rmsnorm_bias_fla_scale_silu_glu_untied_checkpointed_imprecise": dict(
        norm="rmsnorm", norm_per_head=True, bias=True, scale=None, glu_activation="silu", tie_embeddings=False,
        gradient_checkpointing=True, precise_bound_grad=False,
    ),
    "hgru1_no_glu_no_lower_bound_dropout_other_gates": dict(
        mixer="hgru1", expand_ratio=1, glu_hidden_size=0, lower_bound=False, dropout=0.2, output_gate="sigmoid",
        input_activation="silu",
    ),
    "layernorm_gelu_glu_short_conv_dropout_rescaled_imprecise": dict(
        norm="layernorm", glu_activation="gelu", short_conv=3, dropout=0.2, rescale_residual=True, init_std=0.05,
        precise_bound_grad=False,
    ),
}  # fmt: skip

LRA_BASE = dict(hidden_size=16, num_layers=2, expand_ratio=16, backend="triton")  # one head: the interpreter is slow
LRA_VARIANTS = {
    "listops_postnorm_dropout_imprecise": ("listops", dict(prenorm=False, dropout=0.2, precise_bound_grad=False)),
    "text_rms_norms_checkpointed_no_lower_bound": (
        "text", dict(norm="rmsnorm", mixer_norm="rmsnorm", glu_activation="identity",
                     gradient_checkpointing=True, lower_bound=False),
    ),
    "retrieval_two_towers_layernorm_no_glu_fla_scale": (
        "retrieval", dict(norm="layernorm", glu_hidden_size=0, scale=0.5, output_gate="silu",
                          input_activation="identity"),
    ),
    "pathfinder_series_grid_conv_rms_norms_forget_init_imprecise": (
        "pathfinder", dict(grid_size=(2, 3), grid_scan="series", grid_conv=3, grid_conv_dilations=(1, 2),
                           norm="simple_rmsnorm", mixer_norm="rmsnorm", forget_gate_init=(0.8, 0.95), dropout=0.2,
                           precise_bound_grad=False, glu_hidden_size=24),
    ),
    "image_colour_positions_batchnorm_no_biases": ("image", dict(grid_size=(2, 3), in_channels=3, bias=False)),
}  # fmt: skip

VISION_BASE = dict(img_size=8, patch_size=4, embed_dim=16, depth=2, expand_ratio=16, backend="triton")
VISION_VARIANTS = {
    "dropouts_drop_path_positions_checkpointed": dict(
        dropout=0.2, drop_rate=0.2, drop_path_rate=0.5, pos_embed=True, gradient_checkpointing=True, glu_hidden_size=24
    ),
    "rms_norms_no_glu_no_lower_bound_no_pool_other_gates_dynamic_size_imprecise": dict(
        norm="simple_rmsnorm", head_norm="rmsnorm", glu_hidden_size=0, lower_bound=False, global_pool="",
        precise_bound_grad=False, output_gate="silu", input_activation="identity", bias=False, scale=0.25,
        dynamic_img_size=True, in_chans=1, num_classes=3,
    ),
}  # fmt: skip


@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    """The ``precise_bound_grad`` of every call of the chunked gated kernels while the test runs."""
    chunk = pytest.importorskip("hgrn2.ops.chunk")
    calls, real = [], chunk.chunk_hgrn2_gated

    def recording(*args, **kwargs):
        calls.append(kwargs["precise_bound_grad"])
        return real(*args, **kwargs)

    monkeypatch.setattr(chunk, "chunk_hgrn2_gated", recording)
    return calls


def _pair(build, config) -> tuple[nn.Module, nn.Module]:
    """``build(config)`` unfused and fused, with the same random weights (larger than the init, so that every
    norm weight, bias and lower bound matters)."""
    unfused = build(dataclasses.replace(config, fused=False))
    with torch.no_grad():
        for p in unfused.parameters():
            p.normal_(0, 0.3)
    fused = build(dataclasses.replace(config, fused=True))
    fused.load_state_dict(unfused.state_dict())
    return unfused.train(), fused.train()


def _run(model: nn.Module, inputs: dict, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Outputs of one training step (dropout masks drawn from ``seed``) and the recurrent states, if any."""
    torch.manual_seed(seed)
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out, []
    return out.logits, list(out.state or [])


def _assert_gradients_close(model: nn.Module, reference: nn.Module, tol: float) -> None:
    """Each parameter's gradient against the reference's, relative to the larger of its norm and 1e-3 of the whole
    gradient's norm: a bias just before a BatchNorm has an exact gradient of 0, and only rounding in its place."""
    expected = {name: p.grad for name, p in reference.named_parameters()}
    assert all(g is not None for g in expected.values()), [name for name, g in expected.items() if g is None]
    floor = 1e-3 * torch.cat([g.flatten() for g in expected.values()]).norm()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        error = ((p.grad - expected[name]).norm() / torch.maximum(expected[name].norm(), floor)).item()
        assert error <= tol, f"d {name}: relative error {error:.3e} > {tol:.1e}"


def _assert_paths_agree(unfused, fused, inputs: dict, kernel_calls: list, precise: bool, expects_kernels: bool):
    outputs, calls = [], []
    for model in (unfused, fused):
        outputs.append(_run(model, inputs))
        calls.append(len(kernel_calls) - sum(calls))  # the gated kernel calls of this path's forward
    torch.manual_seed(2)
    out_cotangent = torch.randn_like(outputs[0][0])
    state_cotangents = [torch.randn_like(s) for s in outputs[0][1]]
    for out, states in outputs:
        objective = (out * out_cotangent).sum() + sum((s * c).sum() for s, c in zip(states, state_cotangents))
        objective.backward()
    (ref_out, ref_states), (out, states) = outputs
    assert_rel_close(out, ref_out, 1e-5, "output")
    for got, want in zip(states, ref_states, strict=True):
        assert_rel_close(got, want, 1e-5, "final state")
    _assert_gradients_close(fused, unfused, 1e-4)
    ref_buffers = dict(unfused.named_buffers())  # BatchNorm statistics: updated once per step on both paths
    for name, buffer in fused.named_buffers():
        assert_rel_close(buffer, ref_buffers[name], 1e-5, name)
    # both paths ran the chunked kernels as often, and every call (recomputations too) received the config's flag
    assert calls[0] == calls[1] and (calls[0] > 0) == expects_kernels
    assert kernel_calls == [precise] * len(kernel_calls)


@interpreted
@pytest.mark.parametrize("variant", sorted(LM_VARIANTS))
def test_lm_flags_agree_on_the_fused_and_unfused_paths(variant, kernel_calls):
    config = LMConfig(**{**LM_BASE, **LM_VARIANTS[variant]})
    unfused, fused = _pair(HGRN2ForCausalLM, config)
    device = torch.device("cpu")
    assert fused.uses_fused_kernels(device) and not unfused.uses_fused_kernels(device)
    input_ids = torch.randint(0, config.vocab_size, (2, 13))
    inputs = dict(input_ids=input_ids, output_state=not config.short_conv)
    if variant == "paper_defaults_with_carried_state":
        inputs["state"] = [torch.randn(2, *block.mixer.state_shape) for block in unfused.blocks]
    _assert_paths_agree(unfused, fused, inputs, kernel_calls, config.precise_bound_grad, config.mixer == "hgru2")


def _lra_inputs(config: LRAConfig) -> dict[str, torch.Tensor]:
    if config.two_d:
        pixels = torch.randint(0, 256, (1, config.grid_size[0] * config.grid_size[1], config.in_channels))
        return {"input_ids": pixels.to(torch.uint8)}
    mask = torch.arange(10) < torch.tensor([10, 6])[:, None]  # [B, T], the second row padded
    inputs = {"input_ids": torch.randint(1, config.vocab_size, (2, 10)) * mask, "attention_mask": mask}
    if config.dual:
        inputs["input_ids_2"] = torch.randint(1, config.vocab_size, (2, 8))
    return inputs


@interpreted
@pytest.mark.parametrize("variant", sorted(LRA_VARIANTS))
def test_lra_flags_agree_on_the_fused_and_unfused_paths(variant, kernel_calls):
    preset, overrides = LRA_VARIANTS[variant]
    config = LRAConfig.from_name(preset, **{**LRA_BASE, **overrides})
    unfused, fused = _pair(LRAClassifier, config)
    x = torch.zeros(1, 1, config.hidden_size)
    assert fused.blocks[0].runs_fused(x) and not unfused.blocks[0].runs_fused(x)
    _assert_paths_agree(unfused, fused, _lra_inputs(config), kernel_calls, config.precise_bound_grad, True)


@interpreted
@pytest.mark.parametrize("variant", sorted(VISION_VARIANTS))
def test_vision_flags_agree_on_the_fused_and_unfused_paths(variant, kernel_calls):
    config = VisionConfig(**{**VISION_BASE, **VISION_VARIANTS[variant]})
    unfused, fused = _pair(HGRN2Vision, config)
    width = 12 if config.dynamic_img_size else config.img_size  # a 2 × 3 grid where the size may change
    images = torch.randn(1, config.in_chans, config.img_size, width)
    _assert_paths_agree(unfused, fused, {"x": images}, kernel_calls, config.precise_bound_grad, True)


def _lower_bound_gradient(config: LMConfig, state: dict, device: str) -> torch.Tensor:
    model = HGRN2ForCausalLM(config)
    model.load_state_dict(state)
    model = model.to(device, torch.bfloat16)
    # three chunks of the kernels: within one chunk that starts from a zero state the flag changes nothing
    input_ids = torch.randint(0, config.vocab_size, (1, 160), generator=torch.Generator().manual_seed(3)).to(device)
    model(input_ids, labels=input_ids.roll(-1, 1)).loss.backward()
    return model.lower_bounds.gamma.grad


@pytest.mark.parametrize(
    "device, backend",
    [pytest.param("cpu", "triton", marks=interpreted), pytest.param("cuda", "auto", marks=pytest.mark.gpu)],
)
def test_precise_bound_grad_changes_the_lower_bounds_gradient_on_both_paths_in_bfloat16(device, backend):
    # half-precision chunk states where β's gradient is formed give another (less exact) gradient: if one path
    # did not pass the flag to the kernels, its gradient would be the same with the flag on and off
    config = LMConfig(**{**LM_BASE, "backend": backend})
    reference = HGRN2ForCausalLM(config)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    state = reference.state_dict()
    for fused in (False, True):
        precise, imprecise = (
            _lower_bound_gradient(dataclasses.replace(config, fused=fused, precise_bound_grad=flag), state, device)
            for flag in (True, False)
        )
        assert torch.isfinite(precise).all() and torch.isfinite(imprecise).all()
        assert not torch.equal(precise, imprecise), f"fused={fused}: precise_bound_grad does not reach the kernels"

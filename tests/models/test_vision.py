"""The timm-registered HGRN2 vision model: the 2-D mixer against a per-direction loop, shapes, timm API, counts."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import hgrn2  # noqa: F401  (registers the timm models)
from hgrn2.layers import HGRU2d
from hgrn2.models.vision import HGRN2Vision, VisionConfig, count_flops, count_parameters, recurrence_flops
from tests.helpers import assert_rel_close

SMALL = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, expand_ratio=4, glu_hidden_size=32)


def _small_model(**kwargs) -> HGRN2Vision:
    return timm.create_model("hgrn2_vit_tiny_patch16_224", **{**SMALL, "num_classes": 7, **kwargs})


def _naive_hgru2d(
    mixer: HGRU2d, x: torch.Tensor, beta: torch.Tensor, height: int, width: int, axes=("rows", "columns")
) -> torch.Tensor:
    """The four-direction HGRU2 written out pixel by pixel in float64 from the mixer's weights.

    For each of the four scans (rows left->right, right->left, columns top->bottom, bottom->top) a fresh
    per-head state S ``[K, V]`` walks the pixels: S = diag(λ) S + (1 - λ) ⊗ i, y = o^T S; the four outputs are
    summed, then LayerNorm and the output projection. ``axes=("rows",)`` keeps the two row scans only.
    """
    heads, key = mixer.num_heads, mixer.expand_ratio
    lin = lambda layer, t: t @ layer.weight.double().T + layer.bias.double()
    o = torch.sigmoid(lin(mixer.q_proj, x))  # [B, T, D]
    i = F.silu(lin(mixer.i_proj, x))
    lam = beta + (1 - beta) * torch.sigmoid(lin(mixer.f_proj, x))
    batch, _, dim = x.shape
    grid = lambda t: t.reshape(batch, height, width, heads, key)
    o, i, lam = grid(o), grid(i), grid(lam)
    out = torch.zeros(batch, height, width, heads, key, dtype=torch.float64)
    row_scans = [[(r, c) for c in range(width)] for r in range(height)]
    col_scans = [[(r, c) for r in range(height)] for c in range(width)]
    scans = []
    if "rows" in axes:
        scans += row_scans + [s[::-1] for s in row_scans]
    if "columns" in axes:
        scans += col_scans + [s[::-1] for s in col_scans]
    for scan in scans:
        state = torch.zeros(batch, heads, key, key, dtype=torch.float64)
        for r, c in scan:
            state = lam[:, r, c, :, :, None] * state + (1 - lam[:, r, c, :, :, None]) * i[:, r, c, :, None, :]
            out[:, r, c] += torch.einsum("bhk,bhkv->bhv", o[:, r, c], state)
    y = out.reshape(batch, height * width, dim)
    y = F.layer_norm(y, (dim,), mixer.norm.weight.double(), mixer.norm.bias.double(), mixer.norm.eps)
    return lin(mixer.o_proj, y)


@pytest.mark.parametrize("height,width", [(3, 5), (4, 4)])
def test_hgru2d_equals_four_direction_pixel_loop(height, width):
    dim = 8
    mixer = HGRU2d(dim, expand_ratio=2, output_gate="sigmoid", input_activation="silu", norm="layernorm", bias=True)
    with torch.no_grad():  # non-trivial norm affine and biases
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.norm.bias.normal_()
    x = torch.randn(2, height * width, dim)
    beta = torch.rand(dim) * 0.9
    expected = _naive_hgru2d(mixer, x.double(), beta.double(), height, width)
    y, _ = mixer.double()(x.double(), lower_bound=beta.double(), grid_size=(height, width))
    assert_rel_close(y, expected, 1e-10, "HGRU2d vs pixel loop")
    y4, _ = mixer(x.double().reshape(2, height, width, dim), lower_bound=beta.double())  # [B, h, w, D] input
    assert_rel_close(y4.reshape(2, height * width, dim), expected, 1e-10, "HGRU2d [B, h, w, D] input")


def test_series_hgru2d_scans_the_rows_then_the_columns_of_their_output():
    height, width, dim = 3, 4, 8
    mixer = HGRU2d(
        dim, expand_ratio=2, output_gate="sigmoid", input_activation="silu", norm="layernorm", bias=True, series=True
    )
    x = torch.randn(2, height * width, dim, dtype=torch.float64)
    beta = torch.rand(dim, dtype=torch.float64) * 0.9
    rows = _naive_hgru2d(mixer, x, beta, height, width, axes=("rows",))
    expected = _naive_hgru2d(mixer, rows, beta, height, width, axes=("columns",))
    y, _ = mixer.double()(x, lower_bound=beta, grid_size=(height, width))
    assert_rel_close(y, expected, 1e-10, "series HGRU2d vs row then column pixel loops")
    # a pixel sees the whole grid in one series layer; in one parallel layer only its row and column
    x.requires_grad_(True)
    for series, reached in ((True, height * width), (False, height + width - 1)):
        mixer.series = series
        y, _ = mixer(x, lower_bound=beta, grid_size=(height, width))
        (grad,) = torch.autograd.grad(y[0, 0].sum(), x)
        assert int((grad[0].abs().sum(-1) > 0).sum()) == reached


def test_registered_variants_have_paper_widths_and_parameter_counts():
    # Paper (HGRN2, ImageNet-1k): HGRN2 Tiny 6.1M parameters, Small 23.8M; DeiT widths 192 / 384, depth 12.
    for name, width, params in (
        ("hgrn2_vit_tiny_patch16_224", 192, 6.1e6),
        ("hgrn2_vit_small_patch16_224", 384, 23.8e6),
    ):
        model = timm.create_model(name)
        assert isinstance(model, HGRN2Vision)
        assert model.num_features == width and len(model.blocks) == 12
        assert model.blocks[0].mixer.expand_ratio == 2
        assert abs(count_parameters(model) - params) < 0.05e6, count_parameters(model)
        cfg = model.pretrained_cfg
        assert cfg["architecture"] == name and cfg["input_size"] == (3, 224, 224)
        assert cfg["classifier"] == "head" and cfg["first_conv"] == "patch_embed.proj"
    assert {"hgrn2_vit_tiny_patch16_224", "hgrn2_vit_small_patch16_224"} <= set(timm.list_models("hgrn2*"))


def test_config_presets_build_the_registered_models_and_name_bad_fields():
    config = VisionConfig.from_name("hgrn2_vit_tiny_patch16_224", num_classes=10, depth=2)
    torch.manual_seed(0)
    model = HGRN2Vision(config)
    torch.manual_seed(0)
    registered = timm.create_model("hgrn2_vit_tiny_patch16_224", num_classes=10, depth=2)
    assert registered.config == model.config and registered.config.glu_hidden_size == 576
    for (name, p), q in zip(model.state_dict().items(), registered.state_dict().values()):
        assert torch.equal(p, q), name
    assert HGRN2Vision(config, embed_dim=64, glu_hidden_size=128).config.embed_dim == 64  # keywords override
    with pytest.raises(ValueError, match="glu_ratio is now glu_hidden_size, the GLU width itself"):
        timm.create_model("hgrn2_vit_tiny_patch16_224", glu_ratio=2.0)
    with pytest.raises(ValueError, match="use_lower_bound is now lower_bound"):
        VisionConfig.from_name("hgrn2_vit_small_patch16_224", use_lower_bound=False)
    with pytest.raises(ValueError, match="unknown vision preset"):
        VisionConfig.from_name("hgrn2_vit_huge")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        VisionConfig(global_pool="max")


def test_dropout_acts_on_the_patch_embeddings_and_every_branch_in_training_only():
    model = _small_model(dropout=0.5)
    plain = _small_model()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), plain.eval()(x))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(first, model(x)) and not torch.allclose(first, plain(x))
    assert model.pos_drop.p == 0.5 and all(block.dropout.p == 0.5 for block in model.blocks)


def test_image_defaults_follow_the_authors_2d_module():
    mixer = timm.create_model("hgrn2_vit_tiny_patch16_224").blocks[0].mixer
    assert (mixer.output_gate, mixer.input_activation, mixer.scale) == ("sigmoid", "silu", 1.0)
    assert isinstance(mixer.norm, nn.LayerNorm) and mixer.q_proj.bias is not None


def test_forward_shapes_and_timm_head_api():
    model = _small_model().eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 16, 16)  # 4×4 patches, width 16
    assert model(x).shape == (2, 7)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 16)
    assert model.get_classifier() is model.head
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 16, 16)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"lower_bounds.gamma"} and all(n in names for n in model.no_weight_decay())
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


def test_forward_head_is_mean_pool_rms_norm_then_linear():
    model = _small_model().eval()
    tokens = torch.randn(3, 16, 16)
    pooled = tokens.double().mean(dim=1)
    normed = pooled / pooled.pow(2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()
    expected = normed @ model.head.weight.double().T + model.head.bias.double()
    assert_rel_close(model.forward_head(tokens), expected, 1e-6, "head")


def test_block_i_receives_lower_bound_i_over_depth_at_initialisation():
    # Γ = 0 -> softmax over 4 layers is 1/4 everywhere -> β_i = cumsum - first = i / 4.
    model = _small_model(depth=4).eval()
    seen = {}
    for index, block in enumerate(model.blocks):
        hook = lambda mod, args, kwargs, out, index=index: seen.__setitem__(index, kwargs["lower_bound"].clone())
        block.mixer.register_forward_hook(hook, with_kwargs=True)
    model(torch.randn(1, 3, 32, 32))
    for index in range(4):
        torch.testing.assert_close(seen[index], torch.full((16,), index / 4))


def test_drop_path_of_one_skips_the_last_block_in_training_only():
    model = _small_model(drop_path_rate=1.0)  # rates linspace(0, 1): block 0 kept, block 1 always dropped
    x = torch.randn(2, 3, 32, 32)
    embedded, grid = model._embed(x)
    beta = model.lower_bounds()[0]
    after_first, _ = model.blocks[0](embedded, lower_bound=beta, grid_size=grid)
    torch.testing.assert_close(model.train().forward_features(x), after_first)
    assert not torch.allclose(model.eval().forward_features(x), after_first)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _small_model()
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)  # timm's switch for the config field
    assert model.grad_checkpointing and model.config.gradient_checkpointing
    model(x).square().sum().backward()
    for p, g in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, g)
    assert _small_model(gradient_checkpointing=True).grad_checkpointing


def test_dynamic_img_size_accepts_other_resolutions_and_strict_size_rejects_them():
    model = _small_model(dynamic_img_size=True, pos_embed=True).eval()
    assert model(torch.randn(1, 3, 48, 40)).shape == (1, 7)  # 6×5 grid; positional table resampled
    with pytest.raises(AssertionError):
        _small_model()(torch.randn(1, 3, 48, 48))


def test_count_flops_splits_dense_matmuls_from_the_recurrence():
    model = _small_model()
    calls = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(
                lambda m, a, out: calls.append(2 * m.in_features * m.out_features * out[..., 0].numel())
            )
    flops = count_flops(model, (3, 32, 32))
    patch = 2 * (3 * 8 * 8) * 16 * 16  # conv: 16 patches, 192 inputs, 16 outputs
    assert flops["dense"] == sum(calls) + patch
    # 2 mixers · 4 directions · 16 positions · (16 / 4 heads) · 5 · K · V with K = V = 4
    assert recurrence_flops(model, (4, 4)) == 2 * 4 * 16 * 4 * 5 * 16 == flops["recurrence"]
    assert flops["total"] == flops["dense"] + flops["recurrence"]


@pytest.mark.parametrize("backend", ["triton", "recurrent"])  # gates inside the chunked / the step-by-step kernels
def test_2d_mixer_on_the_triton_kernels_matches_the_step_by_step_backend(backend):
    from hgrn2.ops import fuses_gates, triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("needs triton (TRITON_INTERPRET=1 runs its kernels on the CPU)")
    config = dict(expand_ratio=2, output_gate="sigmoid", input_activation="silu", norm="layernorm", bias=True)
    kernels, naive = HGRU2d(4, backend=backend, **config), HGRU2d(4, backend="naive", **config)
    projection = torch.zeros(1, 1, 2, 2, requires_grad=True)
    assert fuses_gates(backend, projection, projection)
    # a short scan without gradients runs on the chunked backend's step kernel, with the gates outside
    assert fuses_gates(backend, projection.detach(), projection.detach()) == (backend == "recurrent")
    naive.load_state_dict(kernels.state_dict())
    x, beta = torch.randn(1, 6, 4), torch.rand(4) * 0.9
    out_kernels, _ = kernels(x, lower_bound=beta, grid_size=(2, 3))
    out_naive, _ = naive(x, lower_bound=beta, grid_size=(2, 3))
    out_kernels.square().sum().backward()
    out_naive.square().sum().backward()
    assert_rel_close(out_kernels, out_naive, 1e-5, "HGRU2d output")
    for (name, p), q in zip(kernels.named_parameters(), naive.parameters()):
        assert_rel_close(p.grad, q.grad, 1e-4, name)

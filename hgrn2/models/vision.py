"""HGRN2 for image classification, registered with timm (``timm.create_model("hgrn2_vit_tiny_patch16_224")``).

The model follows the authors' ImageNet code (OpenNLPLab/im, ``classification/models/hgrn``; the 2-D mixer of
Doraemonzzz/hgru2-pytorch, ``Hgru2_2d_parallel``): non-overlapping patches, a stack of pre-norm blocks whose
token mixer is the four-direction HGRU2 (rows and columns, forward and backward, summed), a layer-wise lower
bound on the forget gate, mean pooling, a SimpleRMSNorm and a linear head. There is no class token and, by
default, no positional embedding: the directional scans already know where each patch is.

Image defaults, checked against the authors' 2-D module: input i = SiLU, output gate o = sigmoid, LayerNorm
(block norms and the mixer's output norm), biases on, scale 1; the GLU uses SiLU. Two sizes, like DeiT:
Tiny (width 192) and Small (width 384), depth 12, ``expand_ratio=2`` (the authors' 2-D default, also used for
the LRA 2-D tasks) and GLU width 3·D, which gives the paper's 6.1M / 23.8M parameters.

A :class:`VisionConfig` holds the settings, with the presets of the registered variants
(``VisionConfig.from_name``); the model takes one, or its fields as keywords (what ``timm.create_model`` passes).
Fields follow timm's names where timm has them (``embed_dim``, ``depth``, ``drop_rate`` for the head's dropout,
``drop_path_rate``) and :class:`~hgrn2.models.lm.LMConfig`'s for the rest (``glu_hidden_size``, ``lower_bound``,
``dropout``, ``gradient_checkpointing``, ``fused``, ``precise_bound_grad``).

``python -m hgrn2.models.vision`` prints parameter counts and FLOPs of the registered variants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from hgrn2.layers import Block, HGRU2d, LayerLowerBounds, make_norm, run_blocks
from hgrn2.models import pretrained
from hgrn2.models.config import check_fields, check_heads, check_sizes, from_preset

__all__ = ["HGRN2Vision", "VisionConfig", "count_flops", "count_parameters", "recurrence_flops"]

GLOBAL_POOLS = ("avg", "")


@dataclass
class VisionConfig:
    """Everything that shapes an :class:`HGRN2Vision`; :meth:`from_name` starts from a registered variant.

    ``dropout`` applies to the patch embeddings and to each residual branch's output, ``drop_rate`` to the pooled
    features before the head (timm's meaning), ``drop_path_rate`` is the stochastic depth of the last block,
    rising linearly from 0 at the first (DeiT). ``fused`` runs the GLUs (and RMS norms) on the fused kernels
    where the recurrence runs on Triton.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    embed_dim: int = 192
    depth: int = 12
    expand_ratio: int = 2
    glu_hidden_size: int = 576  # 3 · embed_dim; 0 drops the GLU
    glu_activation: str = "silu"
    output_gate: str = "sigmoid"
    input_activation: str = "silu"
    norm: str = "layernorm"
    head_norm: str = "simple_rmsnorm"
    bias: bool = True
    scale: float = 1.0
    lower_bound: bool = True
    pos_embed: bool = False
    dynamic_img_size: bool = False
    dropout: float = 0.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    gradient_checkpointing: bool = False
    backend: str = "auto"
    fused: bool = False
    precise_bound_grad: bool = False

    def __post_init__(self):
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        check_sizes(self, "depth", "embed_dim", "expand_ratio", "patch_size", "in_chans")
        check_heads(self, "embed_dim")
        if self.glu_hidden_size < 0:
            raise ValueError(f"glu_hidden_size must be >= 0 (0 drops the GLU), got {self.glu_hidden_size}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.drop_rate < 1.0 and 0.0 <= self.drop_path_rate <= 1.0):
            raise ValueError(
                "need 0 <= dropout < 1, 0 <= drop_rate < 1 and 0 <= drop_path_rate <= 1, got "
                f"{self.dropout}, {self.drop_rate} and {self.drop_path_rate}"
            )

    @classmethod
    def from_name(cls, name: str, **overrides) -> VisionConfig:
        """The registered variant ``name`` (a key of ``VARIANTS``) with ``overrides``, e.g. ``num_classes=10``."""
        return from_preset(cls, VARIANTS, name, overrides, family="vision", renamed=RENAMED)


# Fields that had other names; code that uses the old ones is told what to write instead.
RENAMED = {
    "use_lower_bound": "lower_bound",
    "glu_ratio": "glu_hidden_size, the GLU width itself (glu_ratio × embed_dim)",
}


class HGRN2Vision(nn.Module):
    """Patch embedding -> ``depth`` blocks of the 2-D HGRU2 mixer and a GLU -> mean pool -> norm -> linear head.

    ``HGRN2Vision(config)``, ``HGRN2Vision(**fields)`` or both (the keywords override the config's fields).
    ``forward_features`` returns the patch tokens ``[B, h·w, D]``; ``forward_head`` pools them and classifies.
    """

    def __init__(self, config: VisionConfig | None = None, **fields):
        super().__init__()
        check_fields(VisionConfig, fields, RENAMED)
        self.config = c = dataclasses.replace(config or VisionConfig(), **fields)
        self.num_classes = c.num_classes
        self.global_pool = c.global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = c.embed_dim
        self.dynamic_img_size = c.dynamic_img_size

        # NHWC output keeps the grid shape, which the 2-D mixer needs.
        self.patch_embed = PatchEmbed(
            img_size=c.img_size,
            patch_size=c.patch_size,
            in_chans=c.in_chans,
            embed_dim=c.embed_dim,
            output_fmt="NHWC",
            strict_img_size=not c.dynamic_img_size,
        )
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], c.embed_dim)) if c.pos_embed else None
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(c.dropout) if c.dropout else nn.Identity()

        # stochastic depth rising linearly with depth, as in DeiT
        rates = torch.linspace(0, c.drop_path_rate, c.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                HGRU2d(
                    c.embed_dim,
                    expand_ratio=c.expand_ratio,
                    output_gate=c.output_gate,
                    input_activation=c.input_activation,
                    norm=c.norm,
                    bias=c.bias,
                    scale=c.scale,
                    backend=c.backend,
                    precise_bound_grad=c.precise_bound_grad,
                    fused=c.fused,
                ),
                c.glu_hidden_size,
                norm=c.norm,
                glu_activation=c.glu_activation,
                bias=c.bias,
                dropout=c.dropout,
                drop_path=rate,
                fused=c.fused,
            )
            for rate in rates
        )
        self.lower_bounds = LayerLowerBounds(c.depth, c.embed_dim) if c.lower_bound else None
        self.feature_info = [
            dict(num_chs=c.embed_dim, reduction=self.patch_embed.patch_size[0], module=f"blocks.{i}")
            for i in range(c.depth)
        ]

        self.head_norm = make_norm(c.head_norm, c.embed_dim)
        self.head_drop = nn.Dropout(c.drop_rate) if c.drop_rate else nn.Identity()
        self.head = nn.Linear(c.embed_dim, c.num_classes) if c.num_classes > 0 else nn.Identity()

    # --------------------------------------------------------------------------------- timm model API

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay: the lower-bound logits Γ and the positional table."""
        names = {"lower_bounds.gamma"} if self.lower_bounds is not None else set()
        return names | ({"pos_embed"} if self.pos_embed is not None else set())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|^patch_embed|^lower_bounds", blocks=[(r"^blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for ``config.gradient_checkpointing``."""
        self.config = dataclasses.replace(self.config, gradient_checkpointing=enable)

    @property
    def grad_checkpointing(self) -> bool:
        """timm's name for ``config.gradient_checkpointing``."""
        return self.config.gradient_checkpointing

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0 removes it); optionally change the pooling."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.config = dataclasses.replace(self.config, num_classes=num_classes, global_pool=self.global_pool)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # --------------------------------------------------------------------------------- forward

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed(x)  # [B, h, w, D]
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height * width, dim)  # [B, h·w, D], row-major grid
        if self.pos_embed is not None:
            pos = self.pos_embed
            if (height, width) != tuple(self.patch_embed.grid_size):
                pos = resample_abs_pos_embed(pos, (height, width), self.patch_embed.grid_size, num_prefix_tokens=0)
            x = x + pos
        return self.pos_drop(x), (height, width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> patch tokens ``[B, h·w, D]`` (before pooling and the head norm)."""
        x, grid = self._embed(x)
        betas = self.lower_bounds().unbind(0) if self.lower_bounds is not None else [None] * len(self.blocks)
        x, pending, _ = run_blocks(
            self.blocks, x, betas, checkpointing=self.config.gradient_checkpointing, grid_size=grid
        )
        return x if pending is None else x + pending

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, N, D]`` -> logits ``[B, num_classes]`` (``pre_logits``: the normed pooled features)."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)  # [B, D]
        x = self.head_drop(self.head_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # weights in and out (hgrn2.models.pretrained); config.json holds the VisionConfig
    save_pretrained = pretrained.save_pretrained
    from_pretrained = classmethod(pretrained.from_pretrained)


# ------------------------------------------------------------------------------------------ registry

VARIANTS: dict[str, dict] = {
    "hgrn2_vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, expand_ratio=2, glu_hidden_size=576),
    "hgrn2_vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, expand_ratio=2, glu_hidden_size=1152),
}


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,  # resize 256, centre crop 224
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2404.07904",
        "paper_name": "HGRN2: Gated Linear RNNs with State Expansion",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


def _create(variant: str, pretrained: bool = False, **kwargs) -> HGRN2Vision:
    model_args = {**VARIANTS[variant], **kwargs}
    return build_model_with_cfg(
        HGRN2Vision, variant, pretrained, feature_cfg=dict(flatten_sequential=True), **model_args
    )


def _register(fn):
    # `python -m hgrn2.models.vision` runs this file again as __main__ after `import hgrn2` registered it;
    # registering that second copy would only overwrite the same names.
    return fn if __name__ == "__main__" else register_model(fn)


@_register
def hgrn2_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> HGRN2Vision:
    """HGRN2-Tiny: width 192, depth 12, patch 16, expand ratio 2 (DeiT-Tiny sizes)."""
    return _create("hgrn2_vit_tiny_patch16_224", pretrained=pretrained, **kwargs)


@_register
def hgrn2_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> HGRN2Vision:
    """HGRN2-Small: width 384, depth 12, patch 16, expand ratio 2 (DeiT-Small sizes)."""
    return _create("hgrn2_vit_small_patch16_224", pretrained=pretrained, **kwargs)


# ------------------------------------------------------------------------------------------ counting


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def recurrence_flops(model: nn.Module, grid: tuple[int, int], batch: int = 1) -> int:
    """Forward FLOPs of the HGRN2 recurrences themselves (multiply-add = 2 FLOPs), counted from the math.

    Per direction, position and head, with a K×V state: decay the state (K·V multiplies), add the outer
    product k ⊗ i (K·V multiplies + K·V adds) and read it out with o (K·V multiply-adds = 2·K·V FLOPs):
    5·K·V. A 2-D mixer runs four directions over the h·w positions, so 20·h·w·H·K·V = 20·h·w·D·K.
    """
    positions = grid[0] * grid[1]
    total = 0
    for module in model.modules():
        if isinstance(module, HGRU2d):
            total += 4 * positions * module.num_heads * 5 * module.expand_ratio * module.expand_ratio
    return batch * total


def count_flops(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> dict[str, int]:
    """Forward FLOPs for one image.

    ``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products (patch embedding, the mixers'
    projections, GLUs, head). Inside the mixers it also sees whatever the active recurrence backend runs
    (the chunked PyTorch form on the CPU: pairwise decays and chunk-local matmuls), which is an artefact of
    that backend, so that part is replaced by :func:`recurrence_flops`, the count of the recurrence itself.

    Returns ``dense`` (matmuls outside the recurrences), ``recurrence`` (analytic), ``total`` (their sum) and
    ``backend_recurrence`` (what FlopCounterMode attributed to the recurrence backend that ran).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    backend = 0
    for name, module in model.named_modules():
        if isinstance(module, HGRU2d):
            key = f"{type(model).__name__}.{name}"
            inside = per_module.get(key, 0)
            projections = sum(
                per_module.get(f"{key}.{child}", 0)
                for child, sub in module.named_children()
                if isinstance(sub, nn.Linear)
            )
            backend += inside - projections
    patch = model.patch_embed.patch_size if hasattr(model, "patch_embed") else (16, 16)
    grid = (input_size[1] // patch[0], input_size[2] // patch[1])
    dense = counter.get_total_flops() - backend
    recurrence = recurrence_flops(model, grid)
    return {"dense": dense, "recurrence": recurrence, "total": dense + recurrence, "backend_recurrence": backend}


def _report() -> None:
    import timm
    from timm.layers import set_fused_attn
    from torch.utils.flop_counter import FlopCounterMode

    # Explicit attention matmuls in the DeiT references, so that FlopCounterMode sees them (it may not count
    # the CPU's fused scaled-dot-product kernel).
    set_fused_attn(False)
    reference = "deit_tiny_patch16_224", "deit_small_patch16_224"
    print(f"{'model':32s} {'params':>10s} {'GFLOPs':>8s} {'dense':>8s} {'recur.':>8s}")
    for name in (*VARIANTS, *reference):
        model = timm.create_model(name, num_classes=1000)
        params = count_parameters(model)
        if name in VARIANTS:
            flops = count_flops(model)
        else:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                model.eval()(torch.zeros(1, 3, 224, 224))
            flops = {"total": counter.get_total_flops(), "dense": counter.get_total_flops(), "recurrence": 0}
        print(
            f"{name:32s} {params / 1e6:9.2f}M {flops['total'] / 1e9:8.3f} "
            f"{flops['dense'] / 1e9:8.3f} {flops['recurrence'] / 1e9:8.4f}"
        )
    print("FLOPs count a multiply-add as 2; GMACs are half. 'recur.' is the 2-D recurrence counted from its math.")


if __name__ == "__main__":
    _report()

"""Long Range Arena classifiers: an embedding, HGRN2 blocks, mean pooling and a head.

* 1-D tasks (ListOps, Text, Retrieval) mix with :class:`~hgrn2.layers.BidirectionalHGRU2` (left-to-right plus
  right-to-left); 2-D tasks (Image, Pathfinder, Path-X) with :class:`~hgrn2.layers.HGRU2d` over the pixel grid
  (rows and columns, both ways; ``grid_scan="series"`` scans the rows, then the columns of their output, in
  each layer). Both are non-causal.
* each layer is a :class:`~hgrn2.layers.Block` (mixer + GLU) whose forget gates are lower-bounded by a
  :class:`~hgrn2.layers.LayerLowerBounds` schedule; pre-norm or post-norm, with dropout on both branches.
* 2-D models can put a depthwise convolution of the grid in front of each mixer (``grid_conv``, dilated per
  layer by ``grid_conv_dilations``; the block's ``grid_conv`` option): local shape that the scans, running
  averages along rows and columns, blur. The paper's encoders have none.
* tokens are embedded (``embedding="token"``) or pixel levels are mapped linearly from [-1, 1]
  (``embedding="pixel"``); sinusoidal position encodings are optional.
* Retrieval is a two-tower model: one shared encoder turns the two documents into u and v, and an MLP
  classifies ``[u, v, u·v, u − v]``.

:data:`PRESETS` holds the authors' LRA settings (``run_lra.py`` of OpenNLPLab/HGRN2: width, depth,
``expand_ratio``, GLU ratio, norm, dropout and the ``position``/``id`` input encoder of each task) and the LRA
defaults of the authors' HGRU2 modules: input SiLU, sigmoid output gate, LayerNorm inside the mixer, biases.
Their "synbatch" norm is BatchNorm here (the same on one device).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hgrn2.layers import (
    BidirectionalHGRU2,
    Block,
    HGRU2d,
    LayerLowerBounds,
    add_and_norm,
    make_norm,
    run_blocks,
    runs_fused_kernels,
)
from hgrn2.layers.hgru2 import check_forget_gate_range
from hgrn2.models import pretrained
from hgrn2.models.config import check_heads, check_sizes, from_preset

__all__ = ["PRESETS", "LRAClassifier", "LRAConfig", "lra_config", "sinusoidal_positions"]

EMBEDDINGS = ("token", "pixel")
GRID_SCANS = ("parallel", "series")  # HGRU2d(series=False / True)


@dataclass
class LRAConfig:
    """Everything that shapes an LRA classifier; :meth:`from_name` starts from a task preset.

    The fields that every family has are named as in :class:`~hgrn2.models.lm.LMConfig`: ``glu_hidden_size``
    (0 drops the GLU), ``lower_bound``, ``dropout`` (embeddings and each residual branch), ``gradient_checkpointing``,
    ``backend``, ``fused`` (norms and GLU on the fused kernels where the recurrence runs on Triton; RMS norms only
    for the norm kernel) and ``precise_bound_grad``.
    """

    num_classes: int = 10
    vocab_size: int = 16  # token embedding rows (token ids < vocab_size; id 0 pads)
    embedding: str = "token"  # "token" (nn.Embedding) or "pixel" (linear map of levels scaled to [-1, 1])
    in_channels: int = 1  # pixel features per position (3 for colour)
    hidden_size: int = 64
    num_layers: int = 5
    expand_ratio: int = 4  # per-head state is expand_ratio × expand_ratio; heads = hidden_size / expand_ratio
    glu_hidden_size: int = 64  # GLU width; 0 drops the GLU
    glu_activation: str = "silu"
    norm: str = "batchnorm"  # block norms and the final norm
    mixer_norm: str = "layernorm"  # the HGRU2 output norm
    prenorm: bool = True
    output_gate: str = "sigmoid"
    input_activation: str = "silu"
    bias: bool = True
    scale: float = 1.0
    lower_bound: bool = True
    forget_gate_init: tuple[float, float] | None = None  # (low, high): initial forget gates, even over channels
    positional_encoding: bool = False
    dropout: float = 0.0
    two_d: bool = False  # HGRU2d over a grid_size grid instead of the bidirectional 1-D mixer
    grid_size: tuple[int, int] | None = None  # (height, width); None = square
    grid_scan: str = "parallel"  # 2-D: "parallel" sums row and column scans; "series" scans rows, then columns
    grid_conv: int = 0  # 2-D: kernel size of a depthwise convolution (then SiLU) on each mixer's input; 0: none
    grid_conv_dilations: tuple[int, ...] = (1,)  # layer i's grid convolution has dilation [i % len]
    dual: bool = False  # two-tower retrieval head over [u, v, u·v, u − v]
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass
    backend: str = "auto"
    fused: bool = False
    precise_bound_grad: bool = False

    def __post_init__(self):
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        check_sizes(self, "num_classes", "vocab_size", "in_channels", "hidden_size", "num_layers", "expand_ratio")
        check_heads(self, "hidden_size")
        if self.glu_hidden_size < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"need glu_hidden_size >= 0 and 0 <= dropout < 1, got {self.glu_hidden_size}, {self.dropout}"
            )
        if self.grid_scan not in GRID_SCANS:
            raise ValueError(f"grid_scan must be one of {GRID_SCANS}, got {self.grid_scan!r}")
        if self.dual and self.two_d:
            raise ValueError("the two-tower (dual) head is for 1-D sequences; set two_d=False")
        if self.forget_gate_init is not None:
            self.forget_gate_init = tuple(float(v) for v in self.forget_gate_init)
            if len(self.forget_gate_init) != 2:
                raise ValueError(f"forget_gate_init must be (low, high), got {self.forget_gate_init}")
            check_forget_gate_range(*self.forget_gate_init, name="forget_gate_init")
        self.grid_conv_dilations = tuple(int(v) for v in self.grid_conv_dilations)
        if self.grid_conv < 0 or (self.grid_conv and self.grid_conv % 2 == 0):
            raise ValueError(f"grid_conv must be 0 (none) or an odd kernel size, got {self.grid_conv}")
        if self.grid_conv and not self.two_d:
            raise ValueError("grid_conv convolves a pixel grid: it needs a 2-D model (two_d=True)")
        if not self.grid_conv_dilations or min(self.grid_conv_dilations) < 1:
            raise ValueError(f"grid_conv_dilations must be one or more dilations >= 1, got {self.grid_conv_dilations}")
        if self.grid_size is not None:
            self.grid_size = tuple(int(v) for v in self.grid_size)
            if len(self.grid_size) != 2 or min(self.grid_size) < 1:
                raise ValueError(f"grid_size must be (height, width), got {self.grid_size}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> LRAConfig:
        """The task preset ``name`` (a key of ``PRESETS``) with ``overrides`` applied, e.g. ``num_layers=2``."""
        return from_preset(cls, PRESETS, name, overrides, family="LRA", renamed=RENAMED)


# Fields that had other names; configs that use the old ones are told what to write instead.
RENAMED = {
    "use_lower_bound": "lower_bound",
    "glu_expand_ratio": "glu_hidden_size, the GLU width itself (glu_expand_ratio × hidden_size; 0 drops the GLU)",
}

# GLU widths: the authors' glu ratio (1, or 2 for Retrieval) times the width.
_ONE_D = dict(embedding="token", two_d=False, vocab_size=257, num_classes=2)
_TWO_D = dict(embedding="pixel", two_d=True, norm="batchnorm")
PRESETS: dict[str, dict] = {
    "listops": dict(_ONE_D, vocab_size=16, num_classes=10, hidden_size=64, num_layers=5, expand_ratio=4,
                    glu_hidden_size=64, norm="batchnorm", positional_encoding=True),
    "text": dict(_ONE_D, hidden_size=128, num_layers=4, expand_ratio=8, glu_hidden_size=128, norm="layernorm",
                 dropout=0.1),
    "retrieval": dict(_ONE_D, hidden_size=256, num_layers=2, expand_ratio=2, glu_hidden_size=512, norm="batchnorm",
                      positional_encoding=True, dual=True),
    "image": dict(_TWO_D, num_classes=10, hidden_size=512, num_layers=6, expand_ratio=2, glu_hidden_size=512,
                  positional_encoding=True, grid_size=(32, 32)),
    "pathfinder": dict(_TWO_D, num_classes=2, hidden_size=128, num_layers=6, expand_ratio=2, glu_hidden_size=128,
                       grid_size=(32, 32)),
    "pathx": dict(_TWO_D, num_classes=2, hidden_size=32, num_layers=6, expand_ratio=1, glu_hidden_size=32,
                  positional_encoding=True, grid_size=(128, 128)),
}  # fmt: skip


def lra_config(preset: str, **overrides) -> LRAConfig:
    """The preset's config with ``overrides`` applied, e.g. ``lra_config("listops", num_layers=2)``
    (:meth:`LRAConfig.from_name`)."""
    return LRAConfig.from_name(preset, **overrides)


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[length, dim]``: sin on even and cos on odd features, wavelengths 2π .. 10000·2π."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table.to(dtype)


class LRAClassifier(nn.Module):
    """Embedding -> ``num_layers`` blocks -> (final norm) -> masked mean pool -> head. Returns logits."""

    def __init__(self, config: LRAConfig):
        super().__init__()
        self.config = c = config
        if c.embedding == "token":
            self.embed = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        else:
            self.embed = nn.Linear(c.in_channels, c.hidden_size)
        mixer = functools.partial(HGRU2d, series=c.grid_scan == "series") if c.two_d else BidirectionalHGRU2
        mixer_kwargs = dict(
            expand_ratio=c.expand_ratio,
            output_gate=c.output_gate,
            input_activation=c.input_activation,
            norm=c.mixer_norm,
            bias=c.bias,
            scale=c.scale,
            backend=c.backend,
            precise_bound_grad=c.precise_bound_grad,
            fused=c.fused,
        )
        dilations = c.grid_conv_dilations  # layer i's grid convolution: dilations[i % len]
        self.blocks = nn.ModuleList(
            Block(
                mixer(c.hidden_size, **mixer_kwargs),
                c.glu_hidden_size,
                c.norm,
                c.glu_activation,
                bias=c.bias,
                prenorm=c.prenorm,
                dropout=c.dropout,
                grid_conv=c.grid_conv,
                grid_conv_dilation=dilations[i % len(dilations)],
                fused=c.fused,
            )
            for i in range(c.num_layers)
        )
        if c.forget_gate_init is not None:
            for block in self.blocks:
                block.mixer.init_forget_gate(*c.forget_gate_init)
        self.lower_bounds = LayerLowerBounds(c.num_layers, c.hidden_size) if c.lower_bound else None
        self.dropout = nn.Dropout(c.dropout) if c.dropout else nn.Identity()
        self.final_norm = make_norm(c.norm, c.hidden_size) if c.prenorm else nn.Identity()
        if c.dual:
            self.head = nn.Sequential(
                nn.Linear(4 * c.hidden_size, c.hidden_size), nn.ReLU(), nn.Linear(c.hidden_size, c.num_classes)
            )
        else:
            self.head = nn.Linear(c.hidden_size, c.num_classes)
        self.register_load_state_dict_pre_hook(_moved_grid_convolutions)

    def embed_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]``, or pixel levels ``[B, T]`` / ``[B, T, C]`` (0-255) -> ``[B, T, D]``."""
        c = self.config
        if c.embedding == "token":
            if input_ids.dim() != 2:
                raise ValueError(f"token inputs must be [B, T] ids, got shape {list(input_ids.shape)}")
            x = self.embed(input_ids.long())
        else:
            pixels = input_ids if input_ids.dim() == 3 else input_ids.unsqueeze(-1)
            if pixels.dim() != 3 or pixels.shape[-1] != c.in_channels:
                raise ValueError(f"pixel inputs must be [B, T] or [B, T, {c.in_channels}], got {list(input_ids.shape)}")
            if not pixels.is_floating_point():
                pixels = pixels.float() / 127.5 - 1.0  # levels 0..255 -> [-1, 1]
            x = self.embed(pixels.to(self.embed.weight.dtype))
        if c.positional_encoding:
            x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        return self.dropout(x)

    def _mixer_kwargs(self, length: int) -> dict:
        if not self.config.two_d:
            return {}
        grid = self.config.grid_size or (math.isqrt(length),) * 2
        if grid[0] * grid[1] != length:
            raise ValueError(f"a 2-D model needs height·width = sequence length; grid {grid} vs length {length}")
        return {"grid_size": grid}

    def uses_fused_kernels(self, device: torch.device) -> bool:
        """Whether the blocks and the final norm run on the fused kernels for inputs on ``device``."""
        return self.config.fused and runs_fused_kernels(self.config.backend, device)

    def hidden_states(self, x: torch.Tensor, **mixer_kwargs) -> torch.Tensor:
        """Embedded inputs ``[B, T, D]`` through every block and the final norm, before pooling; ``mixer_kwargs``
        (``grid_size``, ``mask``) go to each mixer."""
        bounds = self.lower_bounds().unbind(0) if self.lower_bounds is not None else [None] * len(self.blocks)
        x, pending, _ = run_blocks(
            self.blocks, x, bounds, checkpointing=self.config.gradient_checkpointing, **mixer_kwargs
        )
        normed, _ = add_and_norm(self.final_norm, x, pending, fused=self.uses_fused_kernels(x.device))
        return normed

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features ``[B, D]``: the mean over the positions where ``attention_mask`` is True (all when None)."""
        x = self.embed_inputs(input_ids)  # [B, T, D]
        kwargs = self._mixer_kwargs(x.shape[1])
        if attention_mask is not None and not self.config.two_d:
            kwargs["mask"] = attention_mask.bool()  # padding must not leak into the right-to-left scan
        x = self.hidden_states(x, **kwargs)
        if attention_mask is None:
            return x.mean(dim=1)
        mask = attention_mask.to(x.dtype).unsqueeze(-1)  # [B, T, 1]
        return (x * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_ids_2: torch.Tensor | None = None,
        attention_mask_2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, num_classes]``; the two-tower model also needs ``input_ids_2`` (and its mask)."""
        if not self.config.dual:
            if input_ids_2 is not None:
                raise ValueError("input_ids_2 was given to a single-tower model; set dual=True for retrieval")
            return self.head(self.encode(input_ids, attention_mask))
        if input_ids_2 is None:
            raise ValueError("the two-tower (dual) model needs input_ids_2, the second document")
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask_2 is None:
            attention_mask_2 = torch.ones_like(input_ids_2, dtype=torch.bool)
        # both documents go through the encoder as one batch [2B, T]
        length = max(input_ids.shape[1], input_ids_2.shape[1])
        ids = torch.cat([F.pad(t, (0, length - t.shape[1])) for t in (input_ids, input_ids_2)])
        mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in (attention_mask, attention_mask_2)])
        u, v = self.encode(ids, mask).split(batch)  # [B, D] each
        return self.head(torch.cat([u, v, u * v, u - v], dim=-1))

    # weights in and out (hgrn2.models.pretrained)
    save_pretrained = pretrained.save_pretrained
    from_pretrained = classmethod(pretrained.from_pretrained)


def _moved_grid_convolutions(module, state_dict, prefix, *args) -> None:
    """Checkpoints from before the grid convolutions moved into the blocks hold layer i's as ``grid_convs.i.*``;
    they load as ``blocks.i.grid_conv.*``."""
    old = f"{prefix}grid_convs."
    for key in [k for k in state_dict if k.startswith(old)]:
        layer, rest = key[len(old) :].split(".", 1)
        state_dict[f"{prefix}blocks.{layer}.grid_conv.{rest}"] = state_dict.pop(key)

"""The HGRN2 causal language model: config and named presets, the model, and generation.

Reads top to bottom: ``LMConfig`` (with the preset table ``PRESETS``), ``count_parameters`` (closed form),
``HGRN2ForCausalLM`` (embedding, pre-norm HGRU2 or HGRU1 blocks with layer-wise forget-gate lower bounds,
final norm, LM head) and its ``generate``, which prefills the prompt with the chunked op and then decodes one
token at a time with the recurrent step, so memory stays constant in the number of generated tokens
(``hgrn2.models.decoding``: static buffers, replayed from a CUDA graph on CUDA).

Where the recurrence runs on the Triton kernels (CUDA, or ``backend="triton"``) and ``fused`` is on, the blocks
(``hgrn2.layers.Block`` with ``fused=True``) run on fused kernels with the same math: each residual add is folded
into the next RMSNorm, which emits the autocast dtype directly; the GLU keeps only its two projections for the
backward; and the training loss (``return_logits=False``) is a blockwise linear cross-entropy that never forms
the full logits.

Initialisation follows the authors' standalone code (Doraemonzzz/hgru2-pytorch, ``Hgrn2PreTrainedModel``):
every Linear and Embedding weight ~ N(0, 0.02²), biases zero, the lower-bound logits Γ equal across layers
(there ``ones``, here ``zeros``: softmax over layers makes both β_l = l / L), norms at one, no embedding scale.
``rescale_residual=True`` adds fla's GPT-2-style option of dividing the std of each residual branch's output
projection (``o_proj``, ``down_proj``) by sqrt(2 L).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hgrn2.layers import (
    HGRU1,
    HGRU2,
    Block,
    LayerLowerBounds,
    RMSNorm,
    add_and_norm,
    make_norm,
    run_blocks,
    runs_fused_kernels,
)
from hgrn2.models import convert, pretrained
from hgrn2.models.config import check_heads, check_sizes, from_preset
from hgrn2.models.decoding import generate_tokens
from hgrn2.ops.fused_cross_entropy import fused_linear_cross_entropy

IGNORE_INDEX = -100
MIXERS = ("hgru2", "hgru1")


@dataclass
class LMConfig:
    """Architecture of an HGRN2 (or HGRN1) causal LM; defaults are the paper's LM choices at the 374M size.

    ``expand_ratio`` is the head size K = V (heads H = hidden_size / expand_ratio); HGRN1 (``mixer="hgru1"``)
    has no heads and needs ``expand_ratio=1``. ``scale=None`` means K^-1/2 (fla); the paper uses 1.
    ``glu_hidden_size=0`` drops the channel mixer. ``short_conv=k`` puts a causal depthwise convolution of k
    taps in front of every token mixer (0: none, the paper's models; Zoology's MQAR models have one); such
    a model runs whole sequences only: it carries no state across segments and does not decode step by step.
    ``fused`` runs the blocks' norms and GLUs on the fused kernels (``hgrn2.ops.fused_*``) wherever the
    recurrence runs on Triton. ``precise_bound_grad=True`` keeps the chunked kernels' states in float32 where
    the lower bounds' gradient is formed: that gradient slightly more exact, those states twice the memory, the
    op's time about the same on an H100 (``hgrn2.ops.chunk``; measurements in benchmarks/results/ops-notes.md).
    ``norm_eps`` is the ε of every RMS norm, except the token mixers' output norms when ``output_norm_eps`` is set
    (fla's HGRN2 layers use 1e-5 there). ``dropout``
    applies to the embeddings and to each residual branch's output; the presets have none (the authors train
    their LMs with 0.1), so a small model on a small corpus that starts to memorise it wants some.
    """

    vocab_size: int = 50272
    hidden_size: int = 1024
    num_layers: int = 24
    expand_ratio: int = 128
    glu_hidden_size: int = 2816
    mixer: str = "hgru2"
    output_gate: str = "silu"
    input_activation: str = "identity"
    glu_activation: str = "identity"
    norm: str = "simple_rmsnorm"
    norm_per_head: bool = False
    scale: float | None = 1.0
    bias: bool = False
    lower_bound: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    rescale_residual: bool = False
    gradient_checkpointing: bool = False
    backend: str = "auto"
    fused: bool = True
    short_conv: int = 0
    precise_bound_grad: bool = False
    norm_eps: float = 1e-6
    dropout: float = 0.0
    output_norm_eps: float | None = None

    def __post_init__(self):
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.output_norm_eps is not None and not self.output_norm_eps > 0:
            raise ValueError(f"output_norm_eps must be > 0 or None (norm_eps), got {self.output_norm_eps}")
        check_sizes(self, "vocab_size", "hidden_size", "num_layers", "expand_ratio")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.short_conv < 0:
            raise ValueError(f"short_conv must be >= 0 (0: no convolution), got {self.short_conv}")
        if self.glu_hidden_size < 0:
            raise ValueError(f"glu_hidden_size must be >= 0 (0 drops the GLU), got {self.glu_hidden_size}")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.mixer == "hgru1" and self.expand_ratio != 1:
            raise ValueError(
                f"mixer='hgru1' has an element-wise state and no heads: set expand_ratio=1 (got {self.expand_ratio})"
            )
        check_heads(self, "hidden_size")

    @classmethod
    def from_name(cls, name: str, **overrides) -> LMConfig:
        """The preset ``name`` (a key of ``PRESETS``) with ``overrides`` applied, e.g. ``vocab_size=257``."""
        return from_preset(cls, PRESETS, name, overrides, family="LM")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.expand_ratio

    @property
    def state_size(self) -> int:
        """Recurrent state elements per sample and layer: H·K·V = D·e for HGRN2, D for HGRN1."""
        return self.hidden_size * self.expand_ratio


# One table of sizes. GLU widths follow fla's rule (8/3 · D rounded up to a multiple of 256: 2816 for D = 1024).
# wt103-*: the paper's WikiText-103 ablation size (44M). D = 512 and 6 layers are fairseq's base LM
# (`base_lm_architecture`, which the authors' fairseq-evo HGRN LMs build on), embeddings tied as in their
# script (`--share-decoder-input-output-embed`), GPT-2 BPE vocabulary padded to 50272; the GLU width 1280 is
# the multiple of 128 that brings the total to 44M (43.8M). "125m" (123.6M) ties its embeddings; the larger
# presets untie them as fla's HGRN2Config does. "374m" is the shape fla and our benchmarks use: 411.3M
# parameters with the GPT-2 vocabulary, 373.8M with fla's 32000. "1b" has 1.03B and "3b" 2.80B.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=257, hidden_size=64, num_layers=2, expand_ratio=16, glu_hidden_size=128),
    "demo": dict(vocab_size=257, hidden_size=128, num_layers=4, expand_ratio=32, glu_hidden_size=256),
    "wt103-44m": dict(vocab_size=50272, hidden_size=512, num_layers=6, expand_ratio=128, glu_hidden_size=1280),
    "wt103-44m-hgrn1": dict(
        vocab_size=50272, hidden_size=512, num_layers=6, expand_ratio=1, glu_hidden_size=1280, mixer="hgru1"
    ),
    "125m": dict(hidden_size=768, num_layers=12, glu_hidden_size=2048),
    "374m": dict(hidden_size=1024, num_layers=24, glu_hidden_size=2816, tie_embeddings=False),
    "1b": dict(hidden_size=2048, num_layers=16, glu_hidden_size=5632, tie_embeddings=False),
    "3b": dict(hidden_size=2560, num_layers=32, glu_hidden_size=6912, tie_embeddings=False),
}

_NORM_PARAMETERS = {"simple_rmsnorm": 0, "rmsnorm": 1, "layernorm": 2, "batchnorm": 2, "identity": 0}


def count_parameters(config: LMConfig) -> int:
    """Closed-form number of trainable parameters of ``HGRN2ForCausalLM(config)`` (tied weights once)."""
    d, g, v, layers = config.hidden_size, config.glu_hidden_size, config.vocab_size, config.num_layers
    if config.norm not in _NORM_PARAMETERS:
        raise ValueError(f"unknown norm {config.norm!r}; expected one of {sorted(_NORM_PARAMETERS)}")
    norm = _NORM_PARAMETERS[config.norm] * d
    # W_q, W_f, W_i, W_o (+ biases) and the mixer's output norm; HGRU1 and HGRU2 share this shape
    mixer = 4 * d * d + (4 * d if config.bias else 0) + norm
    glu = 3 * d * g + (2 * g + d if config.bias else 0) + norm if g else 0
    block = norm + mixer + glu + d * config.short_conv
    embeddings = v * d * (1 if config.tie_embeddings else 2)
    lower_bounds = layers * d if config.lower_bound else 0
    return embeddings + layers * block + lower_bounds + norm


@dataclass
class LMOutput:
    """``logits [B, T, V]`` (None with ``return_logits=False``); ``loss``: mean cross-entropy over targets
    != -100 (None without labels); ``state``: one recurrent state per layer (``[B, H, K, V]`` or ``[B, D]``)
    when asked for."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    state: list[torch.Tensor] | None = None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token NLLs, number of targets) over ``labels != -100``; labels are already shifted.

    Half-precision logits are upcast to float32 (float64 stays float64).
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    nll = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (labels != IGNORE_INDEX).sum()


class HGRN2ForCausalLM(nn.Module):
    """Embedding → L pre-norm blocks (token mixer HGRU2/HGRU1 + GLU) → norm → LM head.

    ``labels[:, t]`` is the target of position t (already shifted); -100 is ignored.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(
                self._make_mixer(config),
                config.glu_hidden_size,
                norm=config.norm,
                glu_activation=config.glu_activation,
                bias=config.bias,
                dropout=config.dropout,
                short_conv=config.short_conv,
                fused=config.fused,
            )
            for _ in range(config.num_layers)
        )
        self.lower_bounds = LayerLowerBounds(config.num_layers, config.hidden_size) if config.lower_bound else None
        self.norm = make_norm(config.norm, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.eps = config.norm_eps
        if config.output_norm_eps is not None:
            for block in self.blocks:
                if isinstance(block.mixer.norm, RMSNorm):
                    block.mixer.norm.eps = config.output_norm_eps
        self.reset_parameters()

    @staticmethod
    def _make_mixer(config: LMConfig) -> nn.Module:
        common = dict(
            output_gate=config.output_gate,
            input_activation=config.input_activation,
            norm=config.norm,
            bias=config.bias,
            backend=config.backend,
            fused=config.fused,
        )
        if config.mixer == "hgru1":
            return HGRU1(config.hidden_size, **common)
        return HGRU2(
            config.hidden_size,
            expand_ratio=config.expand_ratio,
            norm_per_head=config.norm_per_head,
            scale=config.scale,
            precise_bound_grad=config.precise_bound_grad,
            **common,
        )

    def reset_parameters(self) -> None:
        """The standalone code's initialisation (see the module docstring)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers) if self.config.rescale_residual else std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith(("mixer.o_proj", "glu.down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_out else std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.lower_bounds is not None:
            nn.init.zeros_(self.lower_bounds.gamma)

    def num_parameters(self) -> int:
        """Trainable parameters, tied weights counted once (equals ``count_parameters(config)``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def layer_lower_bounds(self) -> list[torch.Tensor | None]:
        """β per layer, each ``[D]`` (None everywhere without lower bounds)."""
        if self.lower_bounds is None:
            return [None] * self.config.num_layers
        return list(self.lower_bounds().unbind(0))

    def uses_fused_kernels(self, device: torch.device) -> bool:
        """Whether the model runs on the fused kernels for inputs on ``device`` (see the module docstring)."""
        return self.config.fused and runs_fused_kernels(self.config.backend, device)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        state: Sequence[torch.Tensor | None] | None = None,
        output_state: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """input_ids ``[B, T]`` → (final-norm hidden states ``[B, T, D]``, per-layer final states or None)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {list(input_ids.shape)}")
        if state is not None and len(state) != self.config.num_layers:
            raise ValueError(f"state must hold one tensor per layer ({self.config.num_layers}), got {len(state)}")
        x = self.dropout(self.embed(input_ids))  # [B, T, D]
        x, pending, new_state = run_blocks(
            self.blocks, x, self.layer_lower_bounds(), checkpointing=self.config.gradient_checkpointing,
            states=state, output_final_state=output_state,
        )  # fmt: skip
        hidden, _ = add_and_norm(self.norm, x, pending, fused=self.uses_fused_kernels(input_ids.device))
        return hidden, (new_state if output_state else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        state: Sequence[torch.Tensor | None] | None = None,
        output_state: bool = False,
        return_logits: bool = True,
    ) -> LMOutput:
        """input_ids ``[B, T]`` (and labels ``[B, T]``) → ``LMOutput``; ``state`` continues a previous segment.

        ``return_logits=False`` (needs labels) computes the loss blockwise from the hidden states without
        forming the ``[B, T, V]`` logits: the training path.
        """
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {list(labels.shape)} must match input_ids {list(input_ids.shape)}")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False returns only the loss: pass labels (or keep return_logits=True)")
        hidden, new_state = self.hidden_states(input_ids, state, output_state)
        if not return_logits:
            loss, _ = fused_linear_cross_entropy(
                hidden.flatten(0, 1),
                self.lm_head.weight,
                labels.flatten(),
                ignore_index=IGNORE_INDEX,
                backend="triton" if self.uses_fused_kernels(input_ids.device) else "torch",
            )
            return LMOutput(logits=None, loss=loss, state=new_state)
        logits = self.lm_head(hidden)  # [B, T, V]
        loss = None
        if labels is not None:
            nll, count = lm_loss(logits, labels)
            loss = nll / count.clamp_min(1)
        return LMOutput(logits=logits, loss=loss, state=new_state)

    def step(
        self, token: torch.Tensor, state: Sequence[torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One decoding step: token ids ``[B]`` → (logits ``[B, V]``, new per-layer states)."""
        if token.dim() != 1:
            raise ValueError(f"token must have shape [B], got {list(token.shape)}")
        state = [None] * self.config.num_layers if state is None else state
        x = self.embed(token)  # [B, D]
        new_state = []
        for block, beta, layer_state in zip(self.blocks, self.layer_lower_bounds(), state):
            x, layer_state = block.step(x, layer_state, lower_bound=beta)
            new_state.append(layer_state)
        return self.lm_head(self.norm(x)), new_state

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Sequence[int] = (),
        seed: int | None = None,
        generator: torch.Generator | None = None,
        use_cuda_graph: bool | None = None,
    ) -> torch.Tensor:
        """Continue ``input_ids [B, T]`` by up to ``max_new_tokens``; returns ``[B, T + n]``.

        ``temperature=0`` is greedy decoding. Sampling draws from ``generator`` (or a fresh one seeded with
        ``seed``). A row that emits one of ``stop_tokens`` is finished and padded with that stop token;
        generation ends early once every row is finished. On CUDA each decoding step is replayed from a CUDA
        graph (``use_cuda_graph=False`` runs it eagerly); see ``hgrn2.models.decoding``.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {list(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if generator is None and seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            return generate_tokens(
                self, input_ids, max_new_tokens, temperature, top_k, top_p, list(stop_tokens), generator, use_cuda_graph
            )
        finally:
            self.train(was_training)

    # weights in and out: this project's folders (hgrn2.models.pretrained), fla's and the authors' (convert)
    save_pretrained = pretrained.save_pretrained
    from_pretrained = classmethod(pretrained.from_pretrained)
    from_fla = classmethod(convert.from_fla)
    from_authors = classmethod(convert.from_authors)
    to_fla = convert.to_fla

"""HGRN2 checkpoints of other code bases, in and out of ``HGRN2ForCausalLM``.

* flash-linear-attention's ``HGRN2ForCausalLM`` (a Hugging Face folder, ``model_type: hgrn2``): read with
  :func:`from_fla`, written with :func:`to_fla`, so a model trained here runs in fla and in ``transformers``
  with fla installed. Both of fla's MLP layouts are read: ``gate_proj`` and ``up_proj`` apart, or one fused
  ``gate_proj`` (gate rows first) as its early releases saved.
* the authors' ``Hgrn2ForCausalLM`` of Doraemonzzz/hgru2-pytorch (a Hugging Face folder whose config has
  ``decoder_embed_dim``): read with :func:`from_authors`. Its fused ``in_proj`` holds the rows of (i, o, f).

The parameters map one to one, through one table per layout (``FLA_NAMES``, ``AUTHORS_NAMES``: our module path
-> theirs) applied to the names of a model built here, and the config fields are set so that the converted
model computes what the source computes. fla's layer: o = swish(W_q x), log λ = logsigmoid(W_f x) lifted by the
layer's lower bound in log space, k = 1 − λ, value i = W_i x, scale K^-1/2 (``chunk_gla``'s default), output norm
``g_norm`` = RMSNorm with a weight over all D channels, then W_o; blocks: RMSNorm (weight, ``norm_eps``) before the
mixer and before a SwiGLU MLP. fla applies ``g_norm`` through ``rms_norm_linear`` without the layer's ε, so its ε is
that function's default, ``FLA_OUTPUT_NORM_EPS`` = 1e-5, whatever ``norm_eps`` says: imports set ``output_norm_eps``
to it, and an export of a model whose output norms use another ε warns. The authors' LM: o = ``out_act`` (SiLU), i =
``in_act`` (identity), λ = β + (1 − β) σ(f), scale 1, SimpleRMSNorm (ε 1e-6) or LayerNorm, GLU ``act(l1 x) ⊙ l2 x``
→ l3 with ``glu_act`` (identity). Both compute β = cumsum(softmax(Γ over layers)) − softmax(Γ)[0], as
``hgrn2.layers.lower_bound`` does, so β = 0 at layer 0 where fla skips the bound. What has no counterpart here
(fla's ``use_short_conv``, hybrid ``attn`` layers, ``elementwise_affine=false``; the authors' scaled embeddings,
``elu``-family activations) is a ValueError that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from hgrn2.models.pretrained import (
    CONFIG_FILE,
    FORMAT,
    WEIGHTS_FILE,
    load_pretrained,
    read_json,
    read_weights,
    resolve_folder,
    tied_aliases,
)

if TYPE_CHECKING:
    from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig

# A table row: (our module or parameter path, theirs, part); "{l}" is the layer index and part = (i, n) takes
# the i-th of n equal row blocks of a fused source matrix.
Row = tuple[str, str, "tuple[int, int] | None"]

FLA_NAMES: tuple[Row, ...] = (
    ("embed", "model.embeddings", None),
    ("blocks.{l}.mixer_norm", "model.layers.{l}.attn_norm", None),
    ("blocks.{l}.mixer.q_proj", "model.layers.{l}.attn.q_proj", None),
    ("blocks.{l}.mixer.f_proj", "model.layers.{l}.attn.f_proj", None),
    ("blocks.{l}.mixer.i_proj", "model.layers.{l}.attn.i_proj", None),
    ("blocks.{l}.mixer.norm", "model.layers.{l}.attn.g_norm", None),
    ("blocks.{l}.mixer.o_proj", "model.layers.{l}.attn.o_proj", None),
    ("blocks.{l}.glu_norm", "model.layers.{l}.mlp_norm", None),
    ("blocks.{l}.glu.gate_proj", "model.layers.{l}.mlp.gate_proj", None),
    ("blocks.{l}.glu.up_proj", "model.layers.{l}.mlp.up_proj", None),
    ("blocks.{l}.glu.down_proj", "model.layers.{l}.mlp.down_proj", None),
    ("lower_bounds.gamma", "model.lower_bounds", None),
    ("norm", "model.norm", None),
    ("lm_head", "lm_head", None),
)
# fla's early HGRN2MLP: one gate_proj [2·I, D] whose first half is the gate, the second the up projection.
FLA_FUSED_MLP_NAMES: tuple[Row, ...] = tuple(
    (ours, "model.layers.{l}.mlp.gate_proj", (0, 2) if ours.endswith("gate_proj") else (1, 2))
    if ours.endswith(("glu.gate_proj", "glu.up_proj"))
    else (ours, theirs, part)
    for ours, theirs, part in FLA_NAMES
)
AUTHORS_NAMES: tuple[Row, ...] = (
    ("embed", "model.embed_tokens", None),
    ("blocks.{l}.mixer_norm", "model.layers.{l}.token_norm", None),
    ("blocks.{l}.mixer.i_proj", "model.layers.{l}.token_mixer.in_proj", (0, 3)),
    ("blocks.{l}.mixer.q_proj", "model.layers.{l}.token_mixer.in_proj", (1, 3)),
    ("blocks.{l}.mixer.f_proj", "model.layers.{l}.token_mixer.in_proj", (2, 3)),
    ("blocks.{l}.mixer.norm", "model.layers.{l}.token_mixer.norm", None),
    ("blocks.{l}.mixer.o_proj", "model.layers.{l}.token_mixer.out_proj", None),
    ("blocks.{l}.glu_norm", "model.layers.{l}.channel_norm", None),
    ("blocks.{l}.glu.gate_proj", "model.layers.{l}.channel_mixer.l1", None),
    ("blocks.{l}.glu.up_proj", "model.layers.{l}.channel_mixer.l2", None),
    ("blocks.{l}.glu.down_proj", "model.layers.{l}.channel_mixer.l3", None),
    ("lower_bounds.gamma", "model.lower_bounds", None),
    ("norm", "model.final_norm", None),
    ("lm_head", "lm_head", None),
)

# The ε of fla's HGRN2 output norm (fla.layers.hgrn2 calls rms_norm_linear without its layer's ε: the default).
FLA_OUTPUT_NORM_EPS = 1e-5

# fla's HGRN2Config defaults, for fields a config.json leaves out.
FLA_DEFAULTS: dict[str, Any] = dict(
    hidden_size=2048, num_hidden_layers=24, expand_ratio=128, num_heads=None, use_short_conv=False,
    use_lower_bound=True, hidden_act="swish", elementwise_affine=True, norm_eps=1e-6, attn=None,
    tie_word_embeddings=False, vocab_size=32000, initializer_range=0.02,
)  # fmt: skip
# The authors' Hgrn2Config defaults (tie_word_embeddings: transformers' PretrainedConfig default).
AUTHORS_DEFAULTS: dict[str, Any] = dict(
    vocab_size=50272, decoder_embed_dim=1024, expand_ratio=2, decoder_layers=24, in_act="none", out_act="silu",
    causal=True, glu_act="none", glu_dim=2816, bias=False, norm_type="simplermsnorm", no_scale_embedding=True,
    tie_word_embeddings=True, init_std=0.02,
)  # fmt: skip
# The authors' get_activation_fn: these names map to ours, these have no counterpart, anything else is identity.
AUTHORS_ACTIVATIONS = {"silu": "silu", "sigmoid": "sigmoid", "relu": "relu", "gelu": "gelu"}
AUTHORS_UNMAPPABLE_ACTIVATIONS = ("elu", "exp", "leak", "1+elu", "2+elu")


# ------------------------------------------------------------------------------------------ names


def source_key(name: str, table: tuple[Row, ...]) -> tuple[str, tuple[int, int] | None]:
    """Our state-dict key ``name`` -> (the source's key, part) by ``table``; KeyError when no row covers it."""
    for ours, theirs, part in table:
        head, layered, tail = ours.partition("{l}")
        pattern = re.escape(head) + (r"(?P<l>\d+)" + re.escape(tail) if layered else "") + r"(?P<rest>\..+)?"
        match = re.fullmatch(pattern, name)
        if match:
            layer = match.groupdict().get("l") or ""
            return theirs.replace("{l}", layer) + (match["rest"] or ""), part
    raise KeyError(name)


def import_weights(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], table: tuple[Row, ...], source: str, ignore=()
) -> None:
    """Fill every parameter of ``model`` from the source ``weights`` (named by ``table``); a source tensor that is
    missing, mis-shaped or left over (other than ``ignore``) is a ValueError that names it."""
    state = model.state_dict()
    aliases = tied_aliases(state)
    converted, used, missing = {}, set(), []
    for name, target in state.items():
        if name in aliases:
            continue
        try:
            key, part = source_key(name, table)
        except KeyError:
            raise ValueError(f"{source}: this model's {name} has no counterpart in the source layout") from None
        if key not in weights:
            missing.append(key)
            continue
        value = weights[key]
        if part is not None:
            index, count = part
            if value.shape[0] % count:
                raise ValueError(f"{source}: {key} {list(value.shape)} does not split into {count} equal row blocks")
            value = value.chunk(count, dim=0)[index]
        if value.shape != target.shape:
            what = f"row block {part[0] + 1} of {part[1]} of {key}" if part else key
            raise ValueError(
                f"{source}: {what} has shape {list(value.shape)} where {name} needs {list(target.shape)}; "
                f"the weights and {CONFIG_FILE} disagree"
            )
        converted[name] = value
        used.add(key)
    if missing:
        raise ValueError(
            f"{source}: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}: the weights do not hold the layers "
            f"its {CONFIG_FILE} describes"
        )
    left_over = sorted(set(weights) - used - set(ignore))
    if left_over:
        raise ValueError(
            f"{source}: {left_over[:6]}{' ...' if len(left_over) > 6 else ''} have no place in the converted model "
            f"(a layer kind or option its {CONFIG_FILE} does not declare)"
        )
    model.load_state_dict({**state, **converted})


def _unmappable(source: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"{source} cannot be converted exactly: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------ fla


def lm_config_from_fla(fla: dict[str, Any], weights: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """``LMConfig`` fields that reproduce fla's ``HGRN2ForCausalLM`` with config ``fla`` (its config.json)."""
    get = lambda name: fla.get(name, FLA_DEFAULTS[name])
    if fla.get("model_type", "hgrn2") != "hgrn2":
        raise ValueError(f"{source}: model_type {fla['model_type']!r} is not fla's HGRN2 ('hgrn2')")
    problems = []
    if get("use_short_conv"):
        problems.append("use_short_conv=true (fla convolves q, f and i after their projections; no such option here)")
    if get("attn") is not None:
        problems.append(f"attn={get('attn')} (hybrid softmax-attention layers)")
    if get("elementwise_affine") is False:
        problems.append("elementwise_affine=false (an output norm without a weight beside block norms with one)")
    if get("hidden_act") not in ("swish", "silu"):
        problems.append(f"hidden_act={get('hidden_act')!r} (fla's MLP computes swish)")
    _unmappable(source, problems)
    hidden, heads, expand = get("hidden_size"), get("num_heads"), get("expand_ratio")
    if expand is None:
        if not heads:
            raise ValueError(f"{source}: neither expand_ratio nor num_heads is set")
        expand = hidden // heads
    if hidden % expand:
        raise ValueError(f"{source}: hidden_size {hidden} is not a multiple of expand_ratio {expand}")
    down = weights.get("model.layers.0.mlp.down_proj.weight")
    if down is None:
        raise ValueError(f"{source}: missing model.layers.0.mlp.down_proj.weight, which gives the MLP width")
    return dict(
        vocab_size=get("vocab_size"), hidden_size=hidden, num_layers=get("num_hidden_layers"), expand_ratio=expand,
        glu_hidden_size=down.shape[1], mixer="hgru2", output_gate="silu", input_activation="identity",
        glu_activation="silu", norm="rmsnorm", norm_per_head=False, scale=None, bias=False,
        lower_bound=bool(get("use_lower_bound")), tie_embeddings=bool(get("tie_word_embeddings")),
        init_std=get("initializer_range"), short_conv=0, norm_eps=float(get("norm_eps")),
        output_norm_eps=FLA_OUTPUT_NORM_EPS,
    )  # fmt: skip


def from_fla(cls: type[HGRN2ForCausalLM], source: str | Path, **overrides) -> HGRN2ForCausalLM:
    """``HGRN2ForCausalLM.from_fla(folder_or_hub_id)``: fla's ``HGRN2ForCausalLM`` checkpoint as our model (eval
    mode, CPU); ``overrides`` set further ``LMConfig`` fields (e.g. ``backend``)."""
    from hgrn2.models.lm import LMConfig

    folder = resolve_folder(source)
    fla = read_json(folder / CONFIG_FILE)
    weights = read_weights(folder)
    config = LMConfig(**{**lm_config_from_fla(fla, weights, str(folder)), **overrides})
    fused_mlp = "model.layers.0.mlp.up_proj.weight" not in weights
    model = cls(config)
    # transformers ties lm_head to the embeddings after loading when tie_word_embeddings is set
    ignore = ("lm_head.weight",) if config.tie_embeddings else ()
    import_weights(model, weights, FLA_FUSED_MLP_NAMES if fused_mlp else FLA_NAMES, str(folder), ignore)
    return model.eval()


def fla_export_problems(config: LMConfig) -> list[str]:
    """The fields of ``config`` that fla's HGRN2 cannot represent (empty when it can)."""
    expected_scale = config.expand_ratio**-0.5
    checks = [
        (config.mixer == "hgru2", f"mixer={config.mixer!r} (fla's HGRN2 layer is an HGRU2)"),
        (config.output_gate == "silu", f"output_gate={config.output_gate!r} (fla: swish)"),
        (config.input_activation == "identity", f"input_activation={config.input_activation!r} (fla: identity)"),
        (config.glu_hidden_size > 0, "glu_hidden_size=0 (every fla block has an MLP)"),
        (config.glu_activation in ("silu", "swish"), f"glu_activation={config.glu_activation!r} (fla: swish)"),
        (config.norm in ("rmsnorm", "simple_rmsnorm"), f"norm={config.norm!r} (fla: RMSNorm)"),
        (not config.norm_per_head, "norm_per_head=true (fla's output norm spans all channels)"),
        (not config.bias, "bias=true (fla's projections have no biases)"),
        (
            config.scale is None or math.isclose(config.scale, expected_scale, rel_tol=1e-12),
            f"scale={config.scale} (fla: K^-1/2 = {expected_scale:.6g}; scale=None)",
        ),
        (config.short_conv == 0, f"short_conv={config.short_conv} (fla's convolutions sit after the projections)"),
    ]
    return [problem for ok, problem in checks if not ok]


def _with_norm_weights(model: HGRN2ForCausalLM) -> HGRN2ForCausalLM:
    """A copy of a ``simple_rmsnorm`` model with ``rmsnorm`` norms whose weights are one: the same function."""
    twin = type(model)(dataclasses.replace(model.config, norm="rmsnorm"))
    result = twin.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.endswith("norm.weight") for k in result.missing_keys), result
    for name in result.missing_keys:
        twin.get_parameter(name).data.fill_(1.0)
    return twin


def to_fla(model: HGRN2ForCausalLM, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` as fla's ``HGRN2ForCausalLM`` folder (config.json, model.safetensors, tokenizer files):
    ``AutoModelForCausalLM.from_pretrained(folder)`` loads it once ``fla`` is imported. ``tokenizer`` is what
    :func:`hgrn2.models.pretrained.save_tokenizer` takes; the byte tokenizer has no Hugging Face form, so only its
    EOS id (256) is recorded."""
    from hgrn2.models.pretrained import save_tokenizer

    config = model.config
    _unmappable(f"{type(model).__name__} (LMConfig)", fla_export_problems(config))
    output_eps = config.norm_eps if config.output_norm_eps is None else config.output_norm_eps
    if output_eps != FLA_OUTPUT_NORM_EPS:
        warnings.warn(
            f"the token mixers' output norms use ε = {output_eps:g} (LMConfig.output_norm_eps, or norm_eps when it "
            f"is None); fla's HGRN2 layer always uses {FLA_OUTPUT_NORM_EPS:g} there, so the exported model's outputs "
            f"differ slightly from this one's (set output_norm_eps={FLA_OUTPUT_NORM_EPS:g} before training for an "
            "exact export)",
            stacklevel=2,
        )
    if config.norm == "simple_rmsnorm":
        model = _with_norm_weights(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    aliases = tied_aliases(state)
    kept = [(name, tensor) for name, tensor in state.items() if name not in aliases]
    tensors = {source_key(name, FLA_NAMES)[0]: tensor.detach().cpu().contiguous() for name, tensor in kept}
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    kind = save_tokenizer(tokenizer, folder)
    special = {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": None} if kind == "byte" else {}
    if kind == "hf":
        from transformers import AutoTokenizer

        saved = AutoTokenizer.from_pretrained(folder)
        special = {f"{n}_token_id": getattr(saved, f"{n}_token_id") for n in ("bos", "eos", "pad")}
    fla = dict(
        architectures=["HGRN2ForCausalLM"], model_type="hgrn2", attn_mode="chunk", hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_heads=config.num_heads, expand_ratio=config.expand_ratio,
        use_short_conv=False, use_lower_bound=config.lower_bound, intermediate_size=config.glu_hidden_size,
        hidden_act="swish", elementwise_affine=True, norm_eps=config.norm_eps, attn=None, use_cache=True,
        tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_std, vocab_size=config.vocab_size,
        **special,
    )  # fmt: skip
    (folder / CONFIG_FILE).write_text(json.dumps(fla, indent=2) + "\n")
    return folder


# ------------------------------------------------------------------------------------------ the authors


def lm_config_from_authors(authors: dict[str, Any], source: str) -> dict[str, Any]:
    """``LMConfig`` fields that reproduce the authors' ``Hgrn2ForCausalLM`` with config ``authors``."""
    get = lambda name: authors.get(name, AUTHORS_DEFAULTS[name])
    problems = []
    if not get("causal"):
        problems.append("causal=false (a bidirectional model, not a causal LM)")
    if not get("no_scale_embedding"):
        problems.append("no_scale_embedding=false (embeddings scaled by sqrt(D); this LM does not scale them)")
    activations = {}
    for field, ours in (("in_act", "input_activation"), ("out_act", "output_gate"), ("glu_act", "glu_activation")):
        name = get(field)
        if name in AUTHORS_UNMAPPABLE_ACTIVATIONS:
            problems.append(f"{field}={name!r} (no such activation here; these map: {sorted(AUTHORS_ACTIVATIONS)})")
        activations[ours] = AUTHORS_ACTIVATIONS.get(name, "identity")
    _unmappable(source, problems)
    return dict(
        vocab_size=get("vocab_size"), hidden_size=get("decoder_embed_dim"), num_layers=get("decoder_layers"),
        expand_ratio=get("expand_ratio"), glu_hidden_size=get("glu_dim"), mixer="hgru2",
        norm="simple_rmsnorm" if get("norm_type") == "simplermsnorm" else "layernorm", norm_per_head=False,
        scale=1.0, bias=bool(get("bias")), lower_bound=True, tie_embeddings=bool(get("tie_word_embeddings")),
        init_std=get("init_std"), short_conv=0, norm_eps=1e-6, **activations,
    )  # fmt: skip


def from_authors(cls: type[HGRN2ForCausalLM], source: str | Path, **overrides) -> HGRN2ForCausalLM:
    """``HGRN2ForCausalLM.from_authors(folder)``: a Doraemonzzz/hgru2-pytorch ``Hgrn2ForCausalLM`` folder
    (config.json with ``decoder_embed_dim``, plus its weights) as our model (eval mode, CPU)."""
    from hgrn2.models.lm import LMConfig

    folder = resolve_folder(source)
    config = LMConfig(**{**lm_config_from_authors(read_json(folder / CONFIG_FILE), str(folder)), **overrides})
    model = cls(config)
    ignore = ("lm_head.weight",) if config.tie_embeddings else ()
    import_weights(model, read_weights(folder), AUTHORS_NAMES, str(folder), ignore)
    return model.eval()


# ------------------------------------------------------------------------------------------ any of them


def folder_format(folder: Path) -> str:
    """``"hgrn2"`` (save_pretrained), ``"fla"`` or ``"authors"``, from a folder's config.json."""
    config = read_json(folder / CONFIG_FILE)
    if config.get("format") == FORMAT:
        return "hgrn2"
    if config.get("model_type") == "hgrn2":
        return "authors" if "decoder_embed_dim" in config else "fla"
    raise ValueError(
        f"{folder / CONFIG_FILE}: neither an hgrn2 folder (save_pretrained) nor an HGRN2 checkpoint of fla or the "
        f"authors (model_type 'hgrn2'); its model_type is {config.get('model_type')!r}"
    )


def load_lm(source: str | Path, **overrides) -> HGRN2ForCausalLM:
    """The language model of a folder (or Hub id) in any of the three layouts of :func:`folder_format`."""
    from hgrn2.models.lm import HGRN2ForCausalLM

    folder = resolve_folder(source)
    kind = folder_format(folder)
    if kind == "fla":
        return from_fla(HGRN2ForCausalLM, folder, **overrides)
    if kind == "authors":
        return from_authors(HGRN2ForCausalLM, folder, **overrides)
    return load_pretrained(folder, expected="HGRN2ForCausalLM", **overrides)

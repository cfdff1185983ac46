"""Checkpoints in fla's and the authors' layouts, built from their published parameter names and shapes, and
float64 step-by-step forwards of both models written from their math (neither library is imported).

fla (``fla/models/hgrn2``, ``fla/layers/hgrn2.py``): pre-norm blocks with RMSNorm (weight, ``norm_eps``); the
layer computes q = swish(W_q x), g = logsigmoid(W_f x), lifted by the layer's lower bound β from layer 1 on as
log(β + (1 − β) e^g), k = 1 − e^g, v = W_i x, S_t = diag(e^{g_t}) S_{t−1} + k_t v_tᵀ, o_t = K^-1/2 q_tᵀ S_t,
then g_norm (RMSNorm with weight) over all channels and W_o; the MLP is down(swish(gate x) ⊙ up x). fla 0.6 applies
g_norm through ``rms_norm_linear`` without passing the layer's ε, so that norm's ε is the function's default 1e-5
whatever ``norm_eps`` says.
The authors (hgru2-pytorch ``Hgrn2ForCausalLM``): in_proj rows (v, q, f), v = in_act, q = out_act, λ = β +
(1 − β) σ(f), k = 1 − λ, scale 1, SimpleRMSNorm or LayerNorm, GLU l3(glu_act(l1 x) ⊙ l2 x).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

FLA_OUTPUT_NORM_EPS = 1e-5  # fla's rms_norm_linear default: the ε of every fla HGRN2 layer's output norm


def fla_config(**overrides) -> dict:
    """A small fla ``HGRN2Config`` as its config.json holds it (norm_eps away from our default and from the 1e-5 of
    fla's output norm on purpose)."""
    config = dict(
        model_type="hgrn2", architectures=["HGRN2ForCausalLM"], hidden_size=32, num_hidden_layers=3,
        expand_ratio=8, num_heads=None, intermediate_size=48, hidden_act="swish", norm_eps=1e-3,
        use_short_conv=False, use_lower_bound=True, elementwise_affine=True, attn=None, vocab_size=50,
        tie_word_embeddings=False,
    )  # fmt: skip
    config.update(overrides)
    return config


def _linear(generator: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=generator) * cols**-0.5


def _norm_weight(generator: torch.Generator, dim: int) -> torch.Tensor:
    return 1.0 + 0.3 * torch.randn(dim, generator=generator)


def fla_weights(config: dict, fused_mlp: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under fla's names; ``fused_mlp``: the early layout with one gate_proj of 2·I rows."""
    g = torch.Generator().manual_seed(seed)
    d, n, v, i = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"], config["intermediate_size"]
    w = {"model.embeddings.weight": torch.randn(v, d, generator=g), "model.norm.weight": _norm_weight(g, d)}
    if config["use_lower_bound"]:
        w["model.lower_bounds"] = torch.randn(n, d, generator=g)
    for layer in range(n):
        p = f"model.layers.{layer}."
        w[p + "attn_norm.weight"] = _norm_weight(g, d)
        for name in ("q_proj", "f_proj", "i_proj", "o_proj"):
            w[p + f"attn.{name}.weight"] = _linear(g, d, d)
        w[p + "attn.g_norm.weight"] = _norm_weight(g, d)
        w[p + "mlp_norm.weight"] = _norm_weight(g, d)
        if fused_mlp:
            w[p + "mlp.gate_proj.weight"] = _linear(g, 2 * i, d)
        else:
            w[p + "mlp.gate_proj.weight"] = _linear(g, i, d)
            w[p + "mlp.up_proj.weight"] = _linear(g, i, d)
        w[p + "mlp.down_proj.weight"] = _linear(g, d, i)
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = _linear(g, v, d)
    return w


def write_folder(folder: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    """config.json + model.safetensors, as transformers' save_pretrained writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: t.contiguous() for k, t in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight


def gated_recurrence(q, k, v, log_decay, scale: float) -> torch.Tensor:
    """q, k, log_decay ``[B, T, H, K]``, v ``[B, T, H, V]`` -> o ``[B, T, H, V]``, one step at a time."""
    batch, length, heads, key_dim = q.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    out = []
    for t in range(length):
        state = log_decay[:, t].exp()[..., None] * state + k[:, t][..., None] * v[:, t][..., None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(out, dim=1)


def _lower_bounds(gamma: torch.Tensor) -> torch.Tensor:
    probs = gamma.softmax(dim=0)
    return probs.cumsum(dim=0) - probs[0]


def fla_logits(config: dict, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """fla's ``HGRN2ForCausalLM`` forward in float64: ids ``[B, T]`` -> logits ``[B, T, V]``."""
    w = {name: t.double() for name, t in weights.items()}
    eps, d = config["norm_eps"], config["hidden_size"]
    expand = config["expand_ratio"] or d // config["num_heads"]
    heads = lambda t: t.unflatten(-1, (d // expand, expand))
    bounds = _lower_bounds(w["model.lower_bounds"]) if config["use_lower_bound"] else None
    x = w["model.embeddings.weight"][ids]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "attn_norm.weight"], eps)
        q = F.silu(h @ w[p + "attn.q_proj.weight"].T)
        log_decay = F.logsigmoid(h @ w[p + "attn.f_proj.weight"].T)
        if bounds is not None and layer > 0:
            beta = bounds[layer]
            log_decay = torch.logaddexp(beta.log(), torch.log1p(-beta) + log_decay)
        k = 1 - log_decay.exp()
        v = h @ w[p + "attn.i_proj.weight"].T
        o = gated_recurrence(heads(q), heads(k), heads(v), heads(log_decay), expand**-0.5).flatten(-2)
        x = x + rms_norm(o, w[p + "attn.g_norm.weight"], FLA_OUTPUT_NORM_EPS) @ w[p + "attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "mlp_norm.weight"], eps)
        if p + "mlp.up_proj.weight" in w:
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        else:
            gate, up = (h @ w[p + "mlp.gate_proj.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embeddings.weight"] if config["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def authors_config(**overrides) -> dict:
    """A small hgru2-pytorch ``Hgrn2Config`` (its LM defaults: identity input and GLU, SiLU output gate)."""
    config = dict(
        model_type="hgrn2", decoder_embed_dim=24, decoder_layers=2, expand_ratio=6, glu_dim=40, vocab_size=30,
        in_act="none", out_act="silu", glu_act="none", norm_type="simplermsnorm", bias=False,
        no_scale_embedding=True, causal=True, tie_word_embeddings=True,
    )  # fmt: skip
    config.update(overrides)
    return config


def authors_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, n, v, i = config["decoder_embed_dim"], config["decoder_layers"], config["vocab_size"], config["glu_dim"]
    layer_norm = config["norm_type"] != "simplermsnorm"
    w = {
        "model.embed_tokens.weight": torch.randn(v, d, generator=g),
        "model.lower_bounds": torch.randn(n, d, generator=g),
    }

    def linear(name: str, rows: int, cols: int) -> None:
        w[name + ".weight"] = _linear(g, rows, cols)
        if config["bias"]:
            w[name + ".bias"] = 0.1 * torch.randn(rows, generator=g)

    def norm(name: str) -> None:
        if layer_norm:
            w[name + ".weight"], w[name + ".bias"] = _norm_weight(g, d), 0.1 * torch.randn(d, generator=g)

    for layer in range(n):
        p = f"model.layers.{layer}."
        norm(p + "token_norm")
        linear(p + "token_mixer.in_proj", 3 * d, d)
        norm(p + "token_mixer.norm")
        linear(p + "token_mixer.out_proj", d, d)
        norm(p + "channel_norm")
        linear(p + "channel_mixer.l1", i, d)
        linear(p + "channel_mixer.l2", i, d)
        linear(p + "channel_mixer.l3", d, i)
    norm("model.final_norm")
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = _linear(g, v, d)
    return w


_AUTHORS_ACT = {"silu": F.silu, "sigmoid": torch.sigmoid, "relu": F.relu, "gelu": F.gelu}


def authors_logits(config: dict, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The authors' ``Hgrn2ForCausalLM`` forward in float64: ids ``[B, T]`` -> logits ``[B, T, V]``."""
    w = {name: t.double() for name, t in weights.items()}
    d, e = config["decoder_embed_dim"], config["expand_ratio"]
    act = lambda name: _AUTHORS_ACT.get(config[name], lambda t: t)
    heads = lambda t: t.unflatten(-1, (d // e, e))

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    def norm(name: str, x: torch.Tensor) -> torch.Tensor:
        if config["norm_type"] == "simplermsnorm":
            return rms_norm(x, None, 1e-6)
        return F.layer_norm(x, (d,), w[name + ".weight"], w[name + ".bias"], 1e-5)

    bounds = _lower_bounds(w["model.lower_bounds"])
    x = w["model.embed_tokens.weight"][ids]
    for layer in range(config["decoder_layers"]):
        p = f"model.layers.{layer}."
        value, gate, forget = linear(p + "token_mixer.in_proj", norm(p + "token_norm", x)).chunk(3, dim=-1)
        decay = bounds[layer] + (1 - bounds[layer]) * torch.sigmoid(forget)  # λ
        o = gated_recurrence(heads(act("out_act")(gate)), heads(1 - decay), heads(act("in_act")(value)),
                             heads(decay.log()), 1.0)  # fmt: skip
        x = x + linear(p + "token_mixer.out_proj", norm(p + "token_mixer.norm", o.flatten(-2)))
        h = norm(p + "channel_norm", x)
        x = x + linear(
            p + "channel_mixer.l3",
            act("glu_act")(linear(p + "channel_mixer.l1", h)) * linear(p + "channel_mixer.l2", h),
        )
    x = norm("model.final_norm", x)
    head = w["model.embed_tokens.weight"] if config["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T

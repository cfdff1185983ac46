"""Gate activations shared by the layers and the fused op entries (plain PyTorch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hgrn2.ops.reference import accumulation_dtype

ACTIVATIONS = ("identity", "silu", "sigmoid", "swish", "relu", "gelu")


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the activation called ``name`` (one of ``ACTIVATIONS``)."""
    if name == "identity":
        return x
    if name in ("silu", "swish"):
        return F.silu(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def lower_bounded_log_forget(forget_proj: torch.Tensor, lower_bound: torch.Tensor | None) -> torch.Tensor:
    """log λ with λ = β + (1 - β) σ(f), computed in log space so that it stays finite for any f.

    log λ = logaddexp(log β, log1p(-β) + logsigmoid(f)). ``lower_bound`` (β, in [0, 1)) broadcasts
    against ``forget_proj`` (f); ``None`` means β = 0, i.e. log λ = logsigmoid(f).
    """
    acc = accumulation_dtype(forget_proj.dtype)
    log_sigmoid = F.logsigmoid(forget_proj.to(acc))
    if lower_bound is None:
        return log_sigmoid.to(forget_proj.dtype)
    beta = lower_bound.to(acc)
    # β = 0 exactly at the first layer: clamp so that log β is finite and its gradient is 0, not NaN.
    log_beta = torch.log(beta.clamp_min(torch.finfo(acc).tiny))
    log_forget = torch.logaddexp(log_beta, torch.log1p(-beta) + log_sigmoid)
    # logaddexp can round a hair above 0 when β is near 1; λ <= 1 holds exactly.
    return log_forget.clamp_max(0.0).to(forget_proj.dtype)

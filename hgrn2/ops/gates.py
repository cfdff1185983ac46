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

    Where λ > 1/2 the value is log1p(-(1 - β) σ(-f)) instead, which keeps 1 - λ to its relative precision: a
    saturated gate beside a lower bound near 1 puts λ within 1e-9 of 1, below the absolute rounding of logaddexp
    (~6e-8 in float32), and the key 1 - λ would be lost; logaddexp itself can round a hair above 0 there. The
    gradient is that of the logaddexp form, with no gradient through log β where β = 0 (the kernels do the same).
    """
    acc = accumulation_dtype(forget_proj.dtype)
    f = forget_proj.to(acc)
    log_sigmoid = F.logsigmoid(f)
    if lower_bound is None:
        return log_sigmoid.to(forget_proj.dtype)
    beta = lower_bound.to(acc)
    # β = 0 exactly at the first layer: clamp so that log β is finite and its gradient is 0, not NaN.
    log_beta = torch.log(beta.clamp_min(torch.finfo(acc).tiny))
    log1m_beta = torch.log1p(-beta)
    log_forget = torch.logaddexp(log_beta, log1m_beta + log_sigmoid)
    with torch.no_grad():
        key = torch.exp(log1m_beta + F.logsigmoid(-f))  # 1 - λ
        near_one = key < 0.5
        correction = torch.where(near_one, torch.log1p(-key.clamp_max(0.5)) - log_forget, 0.0)
    return (log_forget + correction).to(forget_proj.dtype)

"""Normalisations used inside HGRN2 layers and blocks, built by name from a config string, and the residual add
folded into the norm that follows it (one Triton kernel for the RMS norms, :func:`add_and_norm`)."""

from __future__ import annotations

import torch
from torch import nn

from hgrn2.ops import TRITON_BACKENDS, triton_available
from hgrn2.ops.reference import accumulation_dtype

NORMS = ("simple_rmsnorm", "rmsnorm", "layernorm", "batchnorm", "identity")


class RMSNorm(nn.Module):
    """x / rms(x), optionally times a learned weight; ``groups > 1`` normalises each group (head) alone.

    With ``affine=False`` this is the paper's SimpleRMSNorm. Statistics are in float32 (float64 for float64 input).
    """

    def __init__(self, dim: int, groups: int = 1, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % groups:
            raise ValueError(f"dim {dim} is not divisible into {groups} groups")
        self.dim, self.groups, self.eps = dim, groups, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x32 = x.to(accumulation_dtype(x.dtype)).reshape(*shape[:-1], self.groups, self.dim // self.groups)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        out = x32.reshape(shape)
        if self.weight is not None:
            out = out * self.weight.to(out.dtype)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, groups={self.groups}, affine={self.weight is not None}, eps={self.eps}"


class SequenceBatchNorm(nn.Module):
    """BatchNorm over the feature dim of ``[B, T, D]`` (statistics over batch and time).

    The BatchNorm1d is held, not inherited, so that ``SyncBatchNorm.convert_sync_batchnorm`` swaps only the
    inner module. It sees the positions as rows of ``[B·T, D]``: the same statistics as ``[B, D, T]``, without
    transposing the activations to and from that layout (features stay the contiguous dim).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def make_norm(name: str, dim: int, groups: int = 1) -> nn.Module:
    """Build the norm called ``name`` (one of ``NORMS``) over the last dim ``dim``.

    ``groups`` (heads) applies to the RMS norms only: each group is normalised on its own.
    """
    if name == "simple_rmsnorm":
        return RMSNorm(dim, groups=groups, affine=False)
    if name == "rmsnorm":
        return RMSNorm(dim, groups=groups, affine=True)
    if groups != 1:
        raise ValueError(f"per-head (grouped) normalisation is available for the RMS norms only, not {name!r}")
    if name == "layernorm":
        return nn.LayerNorm(dim)
    if name == "batchnorm":
        return SequenceBatchNorm(dim)
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"unknown norm {name!r}; expected one of {NORMS}")


def runs_fused_kernels(backend: str, device: torch.device) -> bool:
    """Whether a layer whose recurrence runs on ``backend`` takes its fused norm and GLU kernels for inputs on
    ``device``: always on the Triton backends (on the CPU through the interpreter), on a CUDA device with Triton
    for ``"auto"``, never on the PyTorch backends."""
    if backend in TRITON_BACKENDS:
        return True
    return backend == "auto" and device.type == "cuda" and triton_available(device)


def add_and_norm(
    norm: nn.Module,
    x: torch.Tensor,
    branch: torch.Tensor | None = None,
    *,
    fused: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(r), r)`` with ``r = x + branch`` (``r = x`` when branch is None).

    ``fused`` runs an :class:`RMSNorm` and the add as one Triton kernel
    (:func:`hgrn2.ops.fused_norm.fused_add_rmsnorm`), which keeps only r and 1/rms for the backward and writes the
    normalised output in the autocast dtype, the dtype the next projection reads (``out_dtype`` sets another);
    other norms, or ``fused=False``, run the module.
    """
    if fused and isinstance(norm, RMSNorm):
        from hgrn2.ops.fused_norm import fused_add_rmsnorm  # imports triton: only where the kernels run

        return fused_add_rmsnorm(
            x, branch, norm.weight, groups=norm.groups, eps=norm.eps, out_dtype=out_dtype, backend="triton"
        )
    residual = x if branch is None else x + branch
    normed = norm(residual)
    return (normed if out_dtype is None else normed.to(out_dtype)), residual

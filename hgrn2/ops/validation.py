"""Input checks for the public ops: every failure names the tensor, what was expected and what came."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {_shape(t)}")


def check_same_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        want = "[" + ", ".join(str(s) for s in expected) + "]"
        raise ValueError(f"{name} must have shape {layout} = {want}, got {_shape(t)}")


def check_log_forget(name: str, t: torch.Tensor) -> None:
    """log λ must be <= 0 and not NaN: λ = exp(log λ) in [0, 1], where -inf (λ = 0) is a full reset of the
    state. A positive value or +inf would make the state grow without bound; a NaN would spread through it."""
    if not t.numel() or float(t.detach().max()) <= 0:  # one reduction; max propagates NaN, failing the comparison
        return
    nan = torch.isnan(t)
    n_nan, n_positive = int(nan.sum()), int((t > 0).sum())
    found = []
    if n_positive:
        found.append(f"{n_positive} values above 0 (the largest value is {t[~nan].max().item():.4g})")
    if n_nan:
        found.append(f"{n_nan} NaN")
    raise ValueError(
        f"{name} holds log forget gates and must be <= 0 everywhere, and not NaN (λ = exp({name}) in [0, 1]; "
        f"-inf is λ = 0, a full reset); it holds {' and '.join(found)}. Compute it with logsigmoid() or the "
        "lower-bounded gate; check_values=False skips this check (a device sync) where the gates are known good."
    )


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> int:
    """Validate packed-sequence offsets and return the number of sequences N."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be an int64 (or int32) tensor of shape [N + 1], got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [N + 1] with N >= 1, got {_shape(cu_seqlens)}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along time), got B = {batch}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {offsets}")
    if offsets[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at T = {seq_len} (the packed length), got {offsets[-1]}")
    return len(offsets) - 1


def check_scan_order(seq_len: int, cu_seqlens, columns: int | None) -> None:
    """``columns=W`` (scan each sequence as the W columns of a row-major grid) needs whole grids: W divides T,
    and no packed sequences."""
    if columns is None:
        return
    if cu_seqlens is not None:
        raise ValueError("columns= scans the columns of whole grids; it takes no cu_seqlens (packed sequences)")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1 or seq_len % columns:
        raise ValueError(
            f"columns={columns!r} must be a positive divisor of the sequence length T = {seq_len} (T = h·W)"
        )


def check_lower_bound(lower_bound: torch.Tensor | None, heads: int, key_dim: int) -> None:
    """The gated entry's lower bound β broadcasts to [H, K] (or is None)."""
    if lower_bound is None:
        return
    try:
        fits = torch.broadcast_shapes(lower_bound.shape, (heads, key_dim)) == (heads, key_dim)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"lower_bound must broadcast to [H, K] = [{heads}, {key_dim}], got {_shape(lower_bound)}")


def check_hgrn2_inputs(q, v, log_forget, initial_state, cu_seqlens, columns: int | None = None) -> None:
    """Shapes, dtypes and orders of the HGRN2 ops' inputs; log λ's values are checked apart (``check_log_forget``,
    which the public ops run beside the scan)."""
    for name, t in (("q", q), ("v", v), ("log_forget", log_forget)):
        check_floating(name, t)
    check_rank("q", q, 4, "[B, T, H, K]")
    check_rank("v", v, 4, "[B, T, H, V]")
    check_same_shape("log_forget", log_forget, q.shape, "[B, T, H, K] (the shape of q)")
    batch, seq_len, heads, key_dim = q.shape
    if tuple(v.shape[:3]) != (batch, seq_len, heads):
        raise ValueError(f"v must have shape [B, T, H, V] = [{batch}, {seq_len}, {heads}, V], got {_shape(v)}")
    if v.dtype != q.dtype or log_forget.dtype != q.dtype:
        raise ValueError(f"q, v and log_forget must share one dtype, got {q.dtype}, {v.dtype} and {log_forget.dtype}")
    check_scan_order(seq_len, cu_seqlens, columns)
    n_states = batch if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch, seq_len)
    if initial_state is not None:
        check_floating("initial_state", initial_state)
        layout = "[B, H, K, V]" if cu_seqlens is None else "[N, H, K, V] (one state per packed sequence)"
        if columns is not None:
            n_states, layout = batch * columns, "[B·W, H, K, V] (one state per column)"
        check_same_shape("initial_state", initial_state, (n_states, heads, key_dim, v.shape[-1]), layout)


def check_hgrn1_inputs(x, log_forget, initial_state, cu_seqlens) -> None:
    """Shapes and dtypes of the HGRN1 op's inputs; log λ's values as for :func:`check_hgrn2_inputs`."""
    check_floating("x", x)
    check_floating("log_forget", log_forget)
    check_rank("x", x, 3, "[B, T, D]")
    check_same_shape("log_forget", log_forget, x.shape, "[B, T, D] (the shape of x)")
    if log_forget.dtype != x.dtype:
        raise ValueError(f"x and log_forget must share one dtype, got {x.dtype} and {log_forget.dtype}")
    batch, seq_len, dim = x.shape
    n_states = batch if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch, seq_len)
    if initial_state is not None:
        check_floating("initial_state", initial_state)
        layout = "[B, D]" if cu_seqlens is None else "[N, D] (one state per packed sequence)"
        check_same_shape("initial_state", initial_state, (n_states, dim), layout)

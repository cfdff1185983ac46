"""The HGRN2 and HGRN1 recurrences in plain PyTorch.

These are the oracles every kernel is tested against, and the ``backend="torch"`` path that runs
anywhere. Two forms of each op:

* ``*_naive``: the recurrence one step at a time, exactly as written in the paper. Slow, obviously
  correct, float64-capable.
* ``*_chunked``: the chunked parallel form the Triton kernels compute. Inside a chunk of ``C`` steps
  the decay from step s to step t >= s is ``exp(Σ_{s<r<=t} log λ_r)``, each span summed on its own (never
  as a difference ``b_t - b_s`` of running sums), so every exponent is ``<= 0``, nothing overflows whatever
  the gates, λ = 0 (``log_forget = -inf``) is an exact reset rather than ``-inf - (-inf) = NaN``, and a very
  negative gate (-1e20) does not swallow its neighbours' gates; across chunks the state is carried
  sequentially.

Symbols (paper -> code): λ_t = exp(log_forget_t); k_t = 1 - λ_t; o_t (output gate) = q_t;
i_t (input) = v_t. HGRN2, per head, with state S_t ∈ R^{K×V}:

    S_t = diag(λ_t) S_{t-1} + k_t ⊗ v_t,        o_t = scale · q_t^T S_t

HGRN1, element-wise: h_t = λ_t ⊙ h_{t-1} + (1 - λ_t) ⊙ x_t.

Inputs are assumed validated (see ``hgrn2.ops.validation``); all arithmetic runs in float32, or in
float64 when the inputs are float64. Outputs take the input dtype; states stay in the accumulation dtype.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64; everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a Linear fed a ``dtype`` tensor on ``device`` computes in: the autocast dtype when autocast
    is on there, else ``dtype`` itself."""
    if dtype.is_floating_point and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _split_packed(tensors, cu_seqlens):
    """Yield, for each packed sequence, the slices ``t[:, start:end]`` of every tensor (B must be 1)."""
    bounds = cu_seqlens.tolist()
    for n in range(len(bounds) - 1):
        yield n, [t[:, bounds[n] : bounds[n + 1]] for t in tensors]


def _run_packed(dense_fn, tensors, initial_state, output_final_state, cu_seqlens, **kwargs):
    """Run ``dense_fn`` on each packed sequence alone and stitch the outputs back together."""
    outputs, finals = [], []
    for n, pieces in _split_packed(tensors, cu_seqlens):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        out, final = dense_fn(*pieces, initial_state=h0, output_final_state=output_final_state, **kwargs)
        outputs.append(out)
        finals.append(final)
    final_state = torch.cat(finals, dim=0) if output_final_state else None
    return torch.cat(outputs, dim=1), final_state


# --------------------------------------------------------------------------------------------- HGRN2


def _hgrn2_naive_dense(q, v, log_forget, *, scale, initial_state, output_final_state):
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    q, v, log_forget = q.to(acc), v.to(acc), log_forget.to(acc)
    forget = log_forget.exp()  # λ
    key = -torch.expm1(log_forget)  # k = 1 - λ, accurate when λ is near 1
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.to(acc)
    outputs = []
    # unbound once: indexing step t would make autograd build a zero tensor of the whole sequence per step
    for q_t, v_t, forget_t, key_t in zip(q.unbind(1), v.unbind(1), forget.unbind(1), key.unbind(1)):
        # S_t = diag(λ_t) S_{t-1} + k_t ⊗ v_t                                  # [B, H, K, V]
        state = forget_t[..., None] * state + key_t[..., None] * v_t[:, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q_t, state))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, heads, value_dim)
    return o, (state if output_final_state else None)


def hgrn2_recurrence_naive(
    q: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 one step at a time. Shapes as in :func:`hgrn2.ops.hgrn2_recurrence`."""
    out_dtype = q.dtype
    if cu_seqlens is not None:
        o, final = _run_packed(
            _hgrn2_naive_dense, (q, v, log_forget), initial_state, output_final_state, cu_seqlens, scale=scale
        )
    else:
        o, final = _hgrn2_naive_dense(
            q,
            v,
            log_forget,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
    return o.to(out_dtype), final


def _pad_to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) to a multiple of ``chunk_size``.

    Zero is the neutral padding for every input: log_forget = 0 means λ = 1 and k = 0, so padded
    steps leave the state untouched, and q = 0 makes their outputs zero.
    """
    pad = (-x.shape[1]) % chunk_size
    if pad == 0:
        return x
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))


def _span_decay(log_forget: torch.Tensor) -> torch.Tensor:
    """exp(Σ_{s<r<=t} log λ_r), the decay from step s to step t, for t >= s and 0 for t < s; log_forget is
    ``[..., C, X]``, the result ``[..., C(s), C(t), X]``.

    Each span is its own cumulative sum over the steps after s: a difference of running sums would give
    ``-inf - (-inf) = NaN`` across a reset (λ = 0) and lose the small gates next to a gate of -1e20 in float32.
    """
    chunk = log_forget.shape[-2]
    steps = torch.arange(chunk, device=log_forget.device)
    after = steps[None, :] > steps[:, None]  # [C(s), C(r)]: step r comes after step s
    from_s = steps[None, :] >= steps[:, None]  # [C(s), C(t)]: step t is s or later
    spans = log_forget[..., None, :, :].masked_fill(~after[:, :, None], 0.0).cumsum(dim=-2)
    return spans.masked_fill(~from_s[:, :, None], float("-inf")).exp()


def _hgrn2_chunked_dense(q, v, log_forget, *, scale, initial_state, output_final_state, chunk_size):
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    q, v, log_forget = (_pad_to_chunks(x.to(acc), chunk_size) for x in (q, v, log_forget))
    key = -torch.expm1(log_forget)
    n_chunks = q.shape[1] // chunk_size

    def to_chunks(x):  # [B, N*C, H, X] -> [B, H, N, C, X]
        return x.reshape(batch, n_chunks, chunk_size, heads, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q, v, key, log_forget = map(to_chunks, (q, v, key, log_forget))
    decay = _span_decay(log_forget)  # [B, H, N, C(s), C(t), K]
    b = log_forget.cumsum(dim=-2)  # log decay from the chunk start, inclusive      # [B, H, N, C, K]

    # Inside each chunk: o_t += sum_{s<=t} (q_t ⊙ k_s · decay(s -> t)) v_s.
    scores = torch.einsum("bhnck,bhnsk,bhnsck->bhncs", q, key, decay)  # [B, H, N, C, C]
    o = scores @ v  # [B, H, N, C, V]

    # Across chunks: the state entering chunk n reaches step t decayed by exp(b_t), and each step's
    # contribution reaches the chunk end decayed by decay(s -> C). Both exponents are <= 0.
    q_decayed = q * b.exp()
    key_decayed = key * decay[..., -1, :]
    chunk_decay = b[..., -1, :].exp()  # [B, H, N, K]
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.to(acc)
    carried = []
    # unbound once: indexing chunk n would make autograd build a zero tensor of every chunk per chunk, which
    # made the backward quadratic in T
    for q_n, decay_n, key_n, v_n in zip(q_decayed.unbind(2), chunk_decay.unbind(2), key_decayed.unbind(2), v.unbind(2)):
        carried.append(q_n @ state)
        state = decay_n[..., None] * state + key_n.transpose(-1, -2) @ v_n
    o = o + torch.stack(carried, dim=2) if carried else o
    o = scale * o.permute(0, 2, 3, 1, 4).reshape(batch, n_chunks * chunk_size, heads, value_dim)
    return o[:, :seq_len], (state if output_final_state else None)


def hgrn2_recurrence_chunked(
    q: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 in chunked parallel form. Shapes as in :func:`hgrn2.ops.hgrn2_recurrence`.

    Memory grows as ``B · T · C · H · K`` (the pairwise decays), so keep ``chunk_size`` small.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    out_dtype = q.dtype
    kwargs = dict(scale=scale, chunk_size=chunk_size)
    if cu_seqlens is not None:
        o, final = _run_packed(
            _hgrn2_chunked_dense, (q, v, log_forget), initial_state, output_final_state, cu_seqlens, **kwargs
        )
    else:
        o, final = _hgrn2_chunked_dense(
            q, v, log_forget, initial_state=initial_state, output_final_state=output_final_state, **kwargs
        )
    return o.to(out_dtype), final


# --------------------------------------------------------------------------------------------- HGRN1


def _hgrn1_naive_dense(x, log_forget, *, initial_state, output_final_state):
    batch, seq_len, dim = x.shape
    acc = accumulation_dtype(x.dtype)
    x, log_forget = x.to(acc), log_forget.to(acc)
    forget = log_forget.exp()
    key = -torch.expm1(log_forget)
    hidden = x.new_zeros(batch, dim) if initial_state is None else initial_state.to(acc)
    outputs = []
    for x_t, forget_t, key_t in zip(x.unbind(1), forget.unbind(1), key.unbind(1)):  # unbound once, as above
        hidden = forget_t * hidden + key_t * x_t  # h_t = λ_t h_{t-1} + (1 - λ_t) x_t
        outputs.append(hidden)
    h = torch.stack(outputs, dim=1) if outputs else x.new_zeros(batch, 0, dim)
    return h, (hidden if output_final_state else None)


def hgrn1_recurrence_naive(
    x: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN1 one step at a time. Shapes as in :func:`hgrn2.ops.hgrn1_recurrence`."""
    out_dtype = x.dtype
    if cu_seqlens is not None:
        h, final = _run_packed(_hgrn1_naive_dense, (x, log_forget), initial_state, output_final_state, cu_seqlens)
    else:
        h, final = _hgrn1_naive_dense(x, log_forget, initial_state=initial_state, output_final_state=output_final_state)
    return h.to(out_dtype), final


def _hgrn1_chunked_dense(x, log_forget, *, initial_state, output_final_state, chunk_size):
    batch, seq_len, dim = x.shape
    acc = accumulation_dtype(x.dtype)
    x, log_forget = (_pad_to_chunks(t.to(acc), chunk_size) for t in (x, log_forget))
    n_chunks = x.shape[1] // chunk_size
    x, log_forget = (t.reshape(batch, n_chunks, chunk_size, dim) for t in (x, log_forget))
    key_input = -torch.expm1(log_forget) * x  # (1 - λ_s) x_s
    # Inside each chunk: h_t = sum_{s<=t} decay(s -> t) (1 - λ_s) x_s.
    h = torch.einsum("bnstd,bnsd->bntd", _span_decay(log_forget), key_input)  # [B, N, C, D]
    decay_from_start = log_forget.cumsum(dim=2).exp()
    hidden = x.new_zeros(batch, dim) if initial_state is None else initial_state.to(acc)
    outputs = []
    for h_n, decay_n in zip(h.unbind(1), decay_from_start.unbind(1)):  # unbound once, as in HGRN2
        h_n = h_n + decay_n * hidden[:, None]
        outputs.append(h_n)
        hidden = h_n[:, -1]
    h = torch.stack(outputs, dim=1).reshape(batch, n_chunks * chunk_size, dim) if outputs else x.reshape(batch, 0, dim)
    return h[:, :seq_len], (hidden if output_final_state else None)


def hgrn1_recurrence_chunked(
    x: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN1 in chunked parallel form. Shapes as in :func:`hgrn2.ops.hgrn1_recurrence`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    out_dtype = x.dtype
    if cu_seqlens is not None:
        h, final = _run_packed(
            _hgrn1_chunked_dense,
            (x, log_forget),
            initial_state,
            output_final_state,
            cu_seqlens,
            chunk_size=chunk_size,
        )
    else:
        h, final = _hgrn1_chunked_dense(
            x,
            log_forget,
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=chunk_size,
        )
    return h.to(out_dtype), final

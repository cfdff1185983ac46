"""The HGRN2 and HGRN1 recurrences, one public function per op, with backend dispatch.

``backend="auto"`` runs the Triton kernels on CUDA tensors (the step-by-step ones for HGRN2 states of at most
4 elements per head, where they are faster) and the PyTorch chunked form elsewhere (the step-by-step loop for
scans of at most 16 steps, where it is faster);
``"torch"`` forces the chunked PyTorch form, ``"naive"`` the step-by-step loop, ``"triton"`` the
kernels (on the CPU only under ``TRITON_INTERPRET=1``), and ``"recurrent"`` the step-by-step Triton kernels of
HGRN2 for small per-head states (``small_state.py``: K·V up to 1024, e.g. expand ratios 2 to 32 with
K = V); HGRN1's scan is step-by-step already, so there it is the same as ``"triton"``.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from hgrn2.ops import reference
from hgrn2.ops.gates import activation, lower_bounded_log_forget
from hgrn2.ops.validation import check_hgrn1_inputs, check_hgrn2_inputs, check_log_forget

BACKENDS = ("auto", "torch", "naive", "triton", "recurrent")
TRITON_BACKENDS = ("triton", "recurrent")  # the backends that run Triton kernels

__all__ = [
    "BACKENDS",
    "SMALL_STATE",
    "TRITON_BACKENDS",
    "auto_backend",
    "fuses_gates",
    "hgrn1_recurrence",
    "hgrn2_gated_recurrence",
    "hgrn2_recurrence",
    "hgrn2_step",
    "lower_bounded_log_forget",
    "triton_available",
]


_KERNEL_MODULES: dict[str, object] = {}


def _kernel_module(name: str):
    """Import ``hgrn2.ops.<name>`` (a Triton kernel module), or return None when Triton is unusable. Kept in a plain
    dict rather than behind ``functools.cache``, whose wrapper ``torch.compile`` warns about at every traced call."""
    if name not in _KERNEL_MODULES:
        try:
            _KERNEL_MODULES[name] = importlib.import_module(f"hgrn2.ops.{name}")
        except ImportError:
            _KERNEL_MODULES[name] = None
    return _KERNEL_MODULES[name]


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: a CUDA device, or the CPU under TRITON_INTERPRET=1."""
    device = torch.device(device)
    if _kernel_module("chunk") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# Up to this many steps the loop beats the chunked form on the CPU (no padding, no pairwise decay tensors), and on
# a GPU a scan that needs no gradient runs on the step-by-step kernel (one launch instead of the chunked four).
SHORT_SCAN = 16
# Up to this many state elements per head (K·V) the step-by-step kernels beat the chunked ones on the GPU, which
# pad every head to 16-wide tiles; above it the chunked ones win (timings: benchmarks/results/ops-notes.md,
# "Step-by-step kernels for small states").
SMALL_STATE = 4


def auto_backend(on_gpu: bool, seq_len: int | None = None, state_elements: int | None = None) -> str:
    """The backend ``"auto"`` stands for: Triton kernels on a GPU (the step-by-step ones for states of at most
    ``SMALL_STATE`` elements per head), else the PyTorch chunked form (the loop for scans of ``SHORT_SCAN`` steps
    or fewer)."""
    if on_gpu:
        return "recurrent" if state_elements is not None and state_elements <= SMALL_STATE else "triton"
    return "naive" if seq_len is not None and seq_len <= SHORT_SCAN else "torch"


def _resolve_backend(
    backend: str, tensor: torch.Tensor, seq_len: int | None = None, state_elements: int | None = None
) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return auto_backend(tensor.is_cuda and triton_available(tensor.device), seq_len, state_elements)
    if backend in TRITON_BACKENDS and not triton_available(tensor.device):
        if _kernel_module("chunk") is None:
            raise ValueError(f"backend={backend!r} needs the triton package; install it or use backend='torch'")
        raise ValueError(
            f"backend={backend!r} needs a CUDA tensor (got one on {tensor.device}); to run the kernels on the CPU "
            "set TRITON_INTERPRET=1 before triton is first imported, or use backend='torch'"
        )
    return backend


def fuses_gates(backend: str, q_proj: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`hgrn2_gated_recurrence` computes both gates inside its kernels for these inputs (the
    chunked and the step-by-step Triton kernels). Where it does not, the gates are elementwise PyTorch ops on the
    projections, which a caller that scans one sequence several ways (reversed, by columns) can compute once for
    all its scans."""
    resolved = _resolve_backend(backend, q_proj, None, _state_elements(q_proj, v))
    return resolved == "recurrent" or (resolved == "triton" and not _short_inference(q_proj.shape[1], q_proj, v))


def hgrn2_recurrence(
    q: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_values: bool = True,
    reverse: bool = False,
    columns: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The HGRN2 recurrence with outer-product state, per head::

        S_t = diag(λ_t) S_{t-1} + (1 - λ_t) ⊗ v_t,   o_t = scale · q_t^T S_t,   λ_t = exp(log_forget_t)

    Args:
        q: output gate (the query), ``[B, T, H, K]``, float16/bfloat16/float32/float64.
        v: input (the value), ``[B, T, H, V]``, same dtype.
        log_forget: log λ, ``[B, T, H, K]``, all ``<= 0`` and none NaN; ``-inf`` (λ = 0) resets the state
            (every backend gives the step-by-step loop's result there). The key ``1 - λ`` is derived from it.
        scale: output scale (1 in the paper; fla uses ``K ** -0.5``).
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``), or None for zeros.
        output_final_state: also return the state after the last step (float32, float64 for float64 input).
        cu_seqlens: int64 ``[N + 1]`` offsets of N sequences packed along T (then B must be 1); each
            starts from its own initial state and ends in its own final state.
        backend: ``"auto"``, ``"torch"``, ``"naive"``, ``"triton"`` or ``"recurrent"``.
        chunk_size: chunk length of the ``"torch"`` chunked form (default 16).
        check_values: check that log_forget is ``<= 0`` and not NaN, else raise ValueError (this reads the
            tensor back: on a GPU a device sync, made once the kernels are launched); False where it comes from
            :func:`lower_bounded_log_forget`, which guarantees it.
        reverse: scan each sequence from its last step to its first; outputs stay at their positions (the
            same as flipping the inputs along T, scanning and flipping the output back; with ``cu_seqlens``, each
            packed sequence within its own span).
        columns: W to take each of the B sequences of T = h·W steps as a row-major h × W grid and scan its W
            columns top to bottom (B·W sequences of h steps; initial and final states ``[B·W, H, K, V]``, grid by
            grid, column by column); outputs stay at their positions. Not with ``cu_seqlens``. The step-by-step
            kernels read both orders where the data lie, the chunked kernels a reversed one; the other backends
            scan reordered copies.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in the input dtype; final_state or None. Where B, T or H is
        0 these are empty (T = 0: the final state is the initial one).

    Example::

        >>> B, T, H, K, V = 2, 10, 4, 8, 8
        >>> q, v = torch.randn(B, T, H, K), torch.randn(B, T, H, V)
        >>> log_forget = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K))
        >>> o, state = hgrn2_recurrence(q, v, log_forget, output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([2, 10, 4, 8]), torch.Size([2, 4, 8, 8]))
    """
    check_hgrn2_inputs(q, v, log_forget, initial_state, cu_seqlens, columns=columns)
    kwargs = dict(
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens
    )
    resolved = _resolve_backend(backend, q, _scan_length(q, columns), _state_elements(q, v))
    if q.numel() == 0 or v.numel() == 0:
        return _empty_hgrn2(q, v, initial_state, output_final_state, cu_seqlens, columns)
    with _ValueCheck(check_values, log_forget, resolved):
        order = _ScanOrder(q.shape[0], reverse, columns, cu_seqlens)
        chunked = resolved == "triton" and not _short_inference(q.shape[1], q, v, log_forget, initial_state)
        if order.in_place(resolved, chunked):
            return _hgrn2_on(resolved, q, v, log_forget, reverse=reverse, columns=columns, **kwargs)
        o, final_state = _hgrn2_on(resolved, *order.copies(q, v, log_forget), chunk_size=chunk_size, **kwargs)
        return order.put_back(o), final_state


class _ValueCheck:
    """``check_values`` of the public ops: log λ must be <= 0 and not NaN (``check_log_forget``, which reads the
    tensor back). For the PyTorch backends the check runs before the scan. For the Triton kernels it runs once
    they are launched, so that on a GPU its device sync waits on them instead of leaving the GPU idle while the
    host launches them (a one-step scan: the launches are most of its time). The scan writes only tensors of its
    own, so raising then loses nothing."""

    def __init__(self, enabled: bool, log_forget: torch.Tensor, resolved: str):
        self.log_forget = log_forget if enabled else None
        self.after = resolved in TRITON_BACKENDS
        if self.log_forget is not None and not self.after:
            check_log_forget("log_forget", log_forget)

    def __enter__(self) -> None:
        return None

    def __exit__(self, error_type, error, traceback) -> bool:
        if error_type is None and self.log_forget is not None and self.after:
            check_log_forget("log_forget", self.log_forget)
        return False


class _ScanOrder:
    """``reverse`` and ``columns`` of a scan (see :func:`hgrn2_recurrence`): whether a backend reads them in place,
    else the reordered copies to scan and the output put back. Reversed packed sequences (``cu_seqlens``) are
    reversed each within its own span, so that each still starts from its own initial state."""

    def __init__(self, batch: int, reverse: bool, columns: int | None, cu_seqlens: torch.Tensor | None = None):
        self.batch, self.reverse, self.columns, self.cu_seqlens = batch, bool(reverse), columns, cu_seqlens

    def in_place(self, resolved: str, chunked: bool = False) -> bool:
        """Whether the backend reads this order where the data lie: the step-by-step kernels any order, the chunked
        kernels (``chunked``: the call runs on them) a reversed one, the others the plain order alone."""
        if resolved == "recurrent":
            return True
        return self.columns is None and (not self.reverse or chunked)

    @functools.cached_property
    def _packed_steps_reversed(self) -> torch.Tensor:
        """The packed steps, each sequence's in reversed order (their own inverse); formed only for copies."""
        bounds = self.cu_seqlens.tolist()
        spans = [torch.arange(end - 1, start - 1, -1) for start, end in zip(bounds, bounds[1:])]
        return torch.cat(spans).to(self.cu_seqlens.device)

    def _reversed(self, x: torch.Tensor) -> torch.Tensor:
        if self.cu_seqlens is None:
            return x.flip(1)
        return x.index_select(1, self._packed_steps_reversed)

    def copies(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for x in tensors:
            if self.columns is not None:  # [B, h·W, ...] -> [B·W, h, ...]
                x = x.unflatten(1, (x.shape[1] // self.columns, self.columns)).transpose(1, 2).flatten(0, 1)
            out.append(self._reversed(x) if self.reverse else x)
        return out

    def put_back(self, o: torch.Tensor) -> torch.Tensor:
        o = self._reversed(o) if self.reverse else o
        if self.columns is not None:  # [B·W, h, ...] -> [B, h·W, ...]
            o = o.unflatten(0, (self.batch, self.columns)).transpose(1, 2).flatten(1, 2)
        return o


def _initial_or_zeros(initial_state, shape, dtype, device) -> torch.Tensor:
    """The state a scan of no steps ends in: a copy of the initial state (in the accumulation dtype), or zeros."""
    if initial_state is not None:
        return initial_state.to(dtype=dtype, copy=True)
    return torch.zeros(shape, dtype=dtype, device=device)


def _empty_hgrn2(q, v, initial_state, output_final_state, cu_seqlens, columns=None):
    """HGRN2 where B, T, H, K or V is 0: nothing to scan, so zero outputs ([B, T, H, V], empty unless K = 0)
    and the initial state as the final one. The kernels would launch empty grids, which some reject."""
    batch, _, heads, key_dim = q.shape
    n_states = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    n_states = n_states if columns is None else batch * columns
    final_state = None
    if output_final_state:
        shape = (n_states, heads, key_dim, v.shape[-1])
        final_state = _initial_or_zeros(initial_state, shape, reference.accumulation_dtype(q.dtype), q.device)
    return v.new_zeros(v.shape), final_state


def _scan_length(q: torch.Tensor, columns: int | None) -> int:
    """Steps of each scan: T, or the h rows of each column when the scan runs down ``columns`` = W columns."""
    return q.shape[1] if columns is None else q.shape[1] // columns


def _state_elements(q: torch.Tensor, v: torch.Tensor) -> int:
    """State elements per head, K·V."""
    return q.shape[-1] * v.shape[-1]


def _short_inference(seq_len: int, *tensors: torch.Tensor | None) -> bool:
    """Whether scans of ``seq_len`` steps are at most ``SHORT_SCAN`` long and need no gradient: the step-by-step
    kernel then runs them in one launch, where the chunked kernels take several."""
    if seq_len > SHORT_SCAN:
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _hgrn2_on(resolved: str, q, v, log_forget, *, chunk_size: int | None = None, reverse=False, columns=None, **kwargs):
    """The HGRN2 recurrence on a resolved backend (not ``"auto"``), from q and log λ; ``reverse`` on the chunked and
    the step-by-step kernels, ``columns`` on the step-by-step ones (the others take reordered copies,
    :class:`_ScanOrder`)."""
    if resolved == "triton":
        if _short_inference(q.shape[1], q, v, log_forget, kwargs["initial_state"]):
            return _kernel_module("recurrent").fused_recurrent_hgrn2(q, v, log_forget, **kwargs)
        return _kernel_module("chunk").chunk_hgrn2(q, v, log_forget, reverse=reverse, **kwargs)
    if resolved == "recurrent":
        return _kernel_module("small_state").small_state_hgrn2(
            q, v, log_forget, reverse=reverse, columns=columns, **kwargs
        )
    if resolved == "naive":
        return reference.hgrn2_recurrence_naive(q, v, log_forget, **kwargs)
    return reference.hgrn2_recurrence_chunked(q, v, log_forget, chunk_size=chunk_size or 16, **kwargs)


def hgrn2_gated_recurrence(
    q_proj: torch.Tensor,
    v: torch.Tensor,
    forget_proj: torch.Tensor,
    lower_bound: torch.Tensor | None = None,
    *,
    output_gate: str = "silu",
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    precise_bound_grad: bool | None = None,
    reverse: bool = False,
    columns: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 from the raw projections: ``q = output_gate(q_proj)`` and
    ``log λ = logaddexp(log β, log1p(-β) + logsigmoid(forget_proj))`` with β = ``lower_bound``.

    Shapes as in :func:`hgrn2_recurrence`; ``lower_bound`` broadcasts to ``[H, K]`` (or is None for β = 0).
    The step-by-step kernels (``"recurrent"``) compute both gates inside, so neither q nor log λ is written to
    memory; the chunked kernels (``"triton"``) apply the output gate inside and read log λ from one elementwise
    Triton pass (float32, kept for the backward, ``hgrn2.ops.gate_pass``); the other
    backends compute both first with PyTorch. ``precise_bound_grad`` applies to the chunked Triton
    kernels (:func:`hgrn2.ops.chunk.chunk_hgrn2_gated`): None takes ``hgrn2.ops.chunk.PRECISE_BOUND_GRAD``.
    ``reverse`` and ``columns`` order the scan as in :func:`hgrn2_recurrence`.
    """
    check_hgrn2_inputs(q_proj, v, forget_proj, initial_state, cu_seqlens, columns=columns)
    kwargs = dict(
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens
    )
    steps = _scan_length(q_proj, columns)
    resolved = _resolve_backend(backend, q_proj, steps, _state_elements(q_proj, v))
    if q_proj.numel() == 0 or v.numel() == 0:
        return _empty_hgrn2(q_proj, v, initial_state, output_final_state, cu_seqlens, columns)
    if resolved == "recurrent":  # gates in the step kernels, which read either order in place
        return _kernel_module("small_state").small_state_hgrn2_gated(
            q_proj, v, forget_proj, lower_bound, output_gate=output_gate, reverse=reverse, columns=columns, **kwargs
        )
    order = _ScanOrder(q_proj.shape[0], reverse, columns, cu_seqlens)
    short = _short_inference(steps, q_proj, v, forget_proj, lower_bound, initial_state)
    if resolved == "triton" and not short:  # the chunked kernels, gates inside
        in_place = order.in_place(resolved, chunked=True)
        if not in_place:
            q_proj, v, forget_proj = order.copies(q_proj, v, forget_proj)
        o, final_state = _kernel_module("chunk").chunk_hgrn2_gated(
            q_proj, v, forget_proj, lower_bound, output_gate=output_gate, precise_bound_grad=precise_bound_grad,
            reverse=reverse and in_place, **kwargs,
        )  # fmt: skip
        return (o if in_place else order.put_back(o)), final_state
    q, log_forget = activation(q_proj, output_gate), lower_bounded_log_forget(forget_proj, lower_bound)
    if order.in_place(resolved):
        return _hgrn2_on(resolved, q, v, log_forget, reverse=reverse, columns=columns, **kwargs)
    o, final_state = _hgrn2_on(resolved, *order.copies(q, v, log_forget), **kwargs)
    return order.put_back(o), final_state


def hgrn2_step(
    q: torch.Tensor,
    v: torch.Tensor,
    log_forget: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of HGRN2: q and log_forget ``[B, H, K]``, v ``[B, H, V]``, state ``[B, H, K, V]``.

    Returns ``(o [B, H, V], new_state)``. The Triton backend updates ``state`` in place and returns it.
    """
    check_hgrn2_inputs(q[:, None], v[:, None], log_forget[:, None], state, None)
    resolved = _resolve_backend(backend, q)
    if q.numel() == 0 or v.numel() == 0:  # B, H, K or V is 0: the state is empty or, with K = 0, unchanged
        return v.new_zeros(v.shape), state
    recurrent = _kernel_module("recurrent")
    if resolved in TRITON_BACKENDS and recurrent is not None:
        return recurrent.fused_recurrent_hgrn2_step(q, v, log_forget, state, scale=scale)
    o, new_state = reference.hgrn2_recurrence_naive(
        q[:, None], v[:, None], log_forget[:, None], scale=scale, initial_state=state, output_final_state=True
    )
    return o[:, 0], new_state


def hgrn1_recurrence(
    x: torch.Tensor,
    log_forget: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The HGRN1 element-wise gated recurrence ``h_t = λ_t ⊙ h_{t-1} + (1 - λ_t) ⊙ x_t``.

    Args:
        x: input ``[B, T, D]``; log_forget: log λ ``[B, T, D]``, all ``<= 0`` (``-inf`` is λ = 0, a reset),
            same dtype.
        initial_state: ``[B, D]`` (``[N, D]`` with ``cu_seqlens``) or None for zeros.
        output_final_state, cu_seqlens, backend, chunk_size, check_values: as in :func:`hgrn2_recurrence`.

    Returns:
        ``(h, final_state)``: h ``[B, T, D]`` in the input dtype; final_state ``[B, D]`` or None.

    Example::

        >>> x = torch.randn(2, 16, 32)
        >>> h, _ = hgrn1_recurrence(x, torch.nn.functional.logsigmoid(torch.randn(2, 16, 32)))
        >>> h.shape
        torch.Size([2, 16, 32])
    """
    check_hgrn1_inputs(x, log_forget, initial_state, cu_seqlens)
    kwargs = dict(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    resolved = _resolve_backend(backend, x, x.shape[1])
    if x.numel() == 0:  # B, T or D is 0: nothing to scan
        n_states = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        acc = reference.accumulation_dtype(x.dtype)
        final_state = _initial_or_zeros(initial_state, (n_states, x.shape[2]), acc, x.device)
        return x.new_zeros(x.shape), (final_state if output_final_state else None)
    with _ValueCheck(check_values, log_forget, resolved):
        scan = _kernel_module("scan")
        if resolved in TRITON_BACKENDS and scan is not None:
            return scan.scan_hgrn1(x, log_forget, **kwargs)
        if resolved == "naive":
            return reference.hgrn1_recurrence_naive(x, log_forget, **kwargs)
        return reference.hgrn1_recurrence_chunked(x, log_forget, chunk_size=chunk_size or 16, **kwargs)

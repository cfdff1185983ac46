"""One case of a public recurrence op, run on one backend and compared with the float64 step-by-step loop.

A :class:`Case` names the op (``hgrn2``, ``gated``, ``step`` or ``hgrn1``), the backend, shapes, dtype, scale,
packed lengths, initial state and a distribution of gates; :func:`run_case` draws its inputs from its seed, runs
it, evaluates the same inputs in float64 through ``hgrn2.ops.reference``'s loops and compares outputs, final
states and every gradient twice: over the whole tensor and per channel. Per channel matters: a channel whose
gates are all within 1e-6 of 1 holds values a million times smaller than its neighbours, so an error that ruins
it (``1 - exp(g)`` for the key) vanishes in a norm over all channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from hgrn2.ops import hgrn1_recurrence, hgrn2_gated_recurrence, hgrn2_recurrence, hgrn2_step
from hgrn2.ops.gates import activation, lower_bounded_log_forget
from hgrn2.ops.reference import hgrn1_recurrence_naive, hgrn2_recurrence_naive

# Relative-error tolerances against float64, overall and per channel, by the dtype the op computes in.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# Errors are relative to a tensor's (or a channel's) norm, but never to less than this fraction of the case's
# root-mean-square output (for outputs) or gradient (for gradients) over as many elements. Rounding errors follow
# the size of the terms summed, not of the sum: a gradient that cancels to almost nothing (d log λ where every
# gate saturates) or a channel that is nearly zero must not be judged on noise alone. The fractions leave a
# channel of gates 1e-7 from 1 among channels of 1e-3 judged on its own values in float32.
FLOOR = {torch.float64: 1e-4, torch.float32: 1e-2, torch.bfloat16: 2.0, torch.float16: 2.0}

# one edge of log λ each: λ = 0 (a reset), λ = 1 (the state kept, nothing written), a very negative finite value
EDGE_GATES = {"lambda0": -math.inf, "lambda1": 0.0, "minus1e20": -1e20}
LOG_FORGET_GATES = ("logsigmoid", "uniform_log", "near_one", "mixed_channels", "resets", "edges")
FORGET_PROJ_GATES = ("normal", "saturated", "edges")
OUTPUT_GATES = ("silu", "sigmoid", "identity", "gelu")
BOUNDS = (None, "zeros", "mixed", "per_channel")


@dataclass(frozen=True)
class Case:
    op: str  # "hgrn2", "gated" (from the raw projections), "step" (hgrn2_step, one call per step), "hgrn1"
    backend: str
    dtype: torch.dtype
    batch: int
    seq_len: int
    heads: int  # hgrn1: 1
    key_dim: int  # hgrn1: the channels D
    value_dim: int  # hgrn1: the channels D
    gates: str
    seed: int
    lengths: tuple[int, ...] | None = None  # packed sequences along T (batch 1, seq_len their sum)
    scale: float = 1.0
    with_state: bool = True
    chunk_size: int | None = None  # the torch backend's chunk length
    output_gate: str = "silu"  # gated
    bound: str | None = None  # gated: the lower bound β, see BOUNDS
    precise_bound_grad: bool | None = None  # gated

    def __str__(self) -> str:
        shape = f"B{self.batch}T{self.seq_len}H{self.heads}K{self.key_dim}V{self.value_dim}"
        parts = [self.op, self.backend, str(self.dtype).removeprefix("torch."), shape, self.gates]
        if self.lengths is not None:
            parts.append("packed" + "+".join(map(str, self.lengths)))
        if self.scale != 1.0:
            parts.append(f"scale{self.scale:.3g}")
        parts.append("h0" if self.with_state else "zero-h0")
        if self.chunk_size is not None:
            parts.append(f"C{self.chunk_size}")
        if self.op == "gated":
            parts += [self.output_gate, f"bound-{self.bound}"]
            if self.precise_bound_grad is not None:
                parts.append(f"precise{self.precise_bound_grad}")
        return "-".join(parts) + f"-seed{self.seed}"

    @property
    def n_states(self) -> int:
        return self.batch if self.lengths is None else len(self.lengths)


# ------------------------------------------------------------------------------------------------ inputs


def log_forget_gates(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """log λ in float64 of ``shape`` (channels last) drawn from the distribution ``kind``."""
    channels = shape[-1]

    def rand(*s):
        return torch.rand(*s, generator=gen, dtype=torch.float64)

    natural = F.logsigmoid(2 * torch.randn(shape, generator=gen, dtype=torch.float64))
    if kind == "logsigmoid":
        return natural
    if kind == "uniform_log":  # λ from e^-30 to 1
        return -30 * rand(*shape)
    if kind == "near_one":  # each channel at its own distance 1e-7..1e-3 from λ = 1, where 1 - λ cancels
        level = 10 ** (-7 + 4 * rand(channels))
        return torch.log1p(-level * (0.5 + rand(*shape)))
    if kind == "mixed_channels":  # per channel: natural, near one, λ = 1, λ = 0, or down to e^-30
        choice = torch.randint(0, 5, (channels,), generator=gen)
        near_one = torch.log1p(-(10 ** (-7 + 2 * rand(*shape))))
        options = [natural, near_one, torch.zeros(shape, dtype=torch.float64), torch.full(shape, -math.inf)]
        options.append(-30 * rand(*shape))
        return torch.stack(options, dim=-1).gather(-1, choice.expand(*shape)[..., None])[..., 0]
    if kind == "resets":  # λ = 0 in every channel at some steps: document boundaries
        steps = rand(*shape[:2]) < 0.15
        return natural.masked_fill(steps.view(*shape[:2], *([1] * (len(shape) - 2))), -math.inf)
    if kind == "edges":  # single entries at λ = 0 (-inf), λ = 1 (0) and a very negative finite log λ
        u = rand(*shape)
        gates = natural.masked_fill(u < 0.1, -math.inf).masked_fill((u >= 0.1) & (u < 0.2), 0.0)
        return gates.masked_fill((u >= 0.2) & (u < 0.3), -1e20)
    if kind in EDGE_GATES:  # a quarter of the entries at one edge
        return natural.masked_fill(rand(*shape) < 0.25, EDGE_GATES[kind])
    raise ValueError(f"unknown gate distribution {kind!r}")


def forget_projections(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """The raw forget projection f of the gated entry (λ = β + (1 - β) σ(f)), float64."""
    normal = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "normal":
        return normal
    if kind == "saturated":  # σ(f) within e^-10..e^-30 of 0 or 1
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
        return sign * (10 + 20 * u)
    if kind == "edges":  # σ(f) = 0 or 1 exactly, and huge finite projections
        for low, value in ((0.0, -math.inf), (0.08, math.inf), (0.16, -1e20), (0.24, 1e20)):
            normal = normal.masked_fill((u >= low) & (u < low + 0.08), value)
        return normal
    if kind in ("minus_inf", "plus_inf"):  # a quarter of the entries at σ(f) = 0 (λ = β) or 1 (λ = 1)
        return normal.masked_fill(u < 0.25, -math.inf if kind == "minus_inf" else math.inf)
    raise ValueError(f"unknown forget projection distribution {kind!r}")


def lower_bound(kind: str | None, heads: int, key_dim: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "zeros":  # the first layer
        return torch.zeros(heads, key_dim, dtype=torch.float64)
    if kind == "per_channel":  # [K], broadcast over heads
        return torch.rand(key_dim, generator=gen, dtype=torch.float64)
    beta = torch.rand(heads, key_dim, generator=gen, dtype=torch.float64)
    beta[0, : key_dim // 3] = 0.0
    beta[-1, -(key_dim // 4) :] = 0.999
    return beta


# ------------------------------------------------------------------------------------------- comparison


def channel_view(t: torch.Tensor, channel_dims: tuple[int, ...]) -> torch.Tensor:
    """``t`` as ``[rest, channels]``: the dims in ``channel_dims`` moved last and flattened."""
    rest = [d for d in range(t.dim()) if d not in channel_dims]
    t = t.permute(*rest, *channel_dims)
    n_channels = math.prod(t.shape[len(rest) :])
    return t.reshape(-1, n_channels)


def errors(
    actual: torch.Tensor, expected: torch.Tensor, channel_dims: tuple[int, ...], floor: float | torch.Tensor
) -> tuple[float, float, int]:
    """(overall relative error, worst per-channel relative error, that channel's index), each relative to the
    norm of the expected values but at least ``floor`` per element (a number, or one per channel)."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    if expected.numel() == 0:
        return 0.0, 0.0, -1
    d, e = channel_view(actual - expected, channel_dims), channel_view(expected, channel_dims)
    floor = torch.as_tensor(floor, dtype=torch.float64).expand(e.shape[1]) * math.sqrt(e.shape[0])
    overall = d.norm().item() / max(e.norm().item(), floor.norm().item(), 1e-300)
    per_channel = d.norm(dim=0) / torch.maximum(e.norm(dim=0), floor).clamp_min(1e-300)
    worst = int(per_channel.argmax())
    return overall, per_channel[worst].item(), worst


def _rms(t: torch.Tensor) -> float:
    return t.detach().double().norm().item() / math.sqrt(max(1, t.numel()))


# ------------------------------------------------------------------------------------------------- runs


def _leaves(tensors: dict, dtype: torch.dtype, device, state_dtype: torch.dtype) -> dict:
    """Inputs as leaves of the op's dtype on ``device`` (states and lower bounds in ``state_dtype``)."""
    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        dt = state_dtype if name in ("initial_state", "lower_bound") else dtype
        out[name] = t.to(device=device, dtype=dt).requires_grad_()
    return out


def _float64(leaves: dict, device) -> dict:
    """The leaves as float64 leaves on ``device``: the exact values the op saw, for the reference."""
    return {n: None if t is None else t.detach().to(device, torch.float64).requires_grad_() for n, t in leaves.items()}


def _inputs(case: Case, gen: torch.Generator) -> dict:
    b, t, h, k, v = case.batch, case.seq_len, case.heads, case.key_dim, case.value_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if case.op == "hgrn1":
        x = {"x": randn(b, t, k), "log_forget": log_forget_gates(case.gates, (b, t, k), gen)}
        x["initial_state"] = randn(case.n_states, k) if case.with_state else None
        return x
    inputs = {"q": randn(b, t, h, k), "v": randn(b, t, h, v)}
    if case.op == "gated":
        inputs["forget_proj"] = forget_projections(case.gates, (b, t, h, k), gen)
        inputs["lower_bound"] = lower_bound(case.bound, h, k, gen)
    else:
        inputs["log_forget"] = log_forget_gates(case.gates, (b, t, h, k), gen)
    inputs["initial_state"] = randn(case.n_states, h, k, v) if case.with_state else None
    return inputs


def _cu_seqlens(case: Case, device) -> torch.Tensor | None:
    if case.lengths is None:
        return None
    return torch.tensor([0, *torch.tensor(case.lengths).cumsum(0).tolist()], dtype=torch.int64, device=device)


def _hgrn2_outputs(case: Case, x: dict, device, reference: bool):
    kwargs = dict(scale=case.scale, initial_state=x["initial_state"], output_final_state=True)
    kwargs["cu_seqlens"] = _cu_seqlens(case, device)
    if case.op == "gated":
        if reference:
            q = activation(x["q"], case.output_gate)
            log_forget = lower_bounded_log_forget(x["forget_proj"], x["lower_bound"])
            return hgrn2_recurrence_naive(q, x["v"], log_forget, **kwargs)
        return hgrn2_gated_recurrence(
            x["q"], x["v"], x["forget_proj"], x["lower_bound"], output_gate=case.output_gate, backend=case.backend,
            precise_bound_grad=case.precise_bound_grad, **kwargs,
        )  # fmt: skip
    if reference:
        return hgrn2_recurrence_naive(x["q"], x["v"], x["log_forget"], **kwargs)
    return hgrn2_recurrence(x["q"], x["v"], x["log_forget"], backend=case.backend, chunk_size=case.chunk_size, **kwargs)


def _hgrn1_outputs(case: Case, x: dict, device, reference: bool):
    kwargs = dict(initial_state=x["initial_state"], output_final_state=True, cu_seqlens=_cu_seqlens(case, device))
    if reference:
        return hgrn1_recurrence_naive(x["x"], x["log_forget"], **kwargs)
    return hgrn1_recurrence(x["x"], x["log_forget"], backend=case.backend, chunk_size=case.chunk_size, **kwargs)


def _step_outputs(case: Case, x: dict, device, reference: bool):
    """hgrn2_step once per step from the initial state (forward only: the Triton step has no backward)."""
    if reference:
        return hgrn2_recurrence_naive(
            x["q"], x["v"], x["log_forget"], scale=case.scale, initial_state=x["initial_state"], output_final_state=True
        )
    shape = (case.batch, case.heads, case.key_dim, case.value_dim)
    state = torch.zeros(shape, device=device) if x["initial_state"] is None else x["initial_state"].detach().clone()
    outputs = []
    with torch.no_grad():
        for t in range(case.seq_len):
            o, state = hgrn2_step(
                x["q"][:, t], x["v"][:, t], x["log_forget"][:, t], state, scale=case.scale, backend=case.backend
            )
            outputs.append(o)
    return torch.stack(outputs, dim=1), state


# name -> the dims that index a channel, per op
CHANNELS_HGRN2 = {
    "o": (2, 3), "final_state": (1, 2), "q": (2, 3), "v": (2, 3), "log_forget": (2, 3), "forget_proj": (2, 3),
    "initial_state": (1, 2), "lower_bound": None,
}  # fmt: skip
CHANNELS_HGRN1 = {"o": (2,), "final_state": (1,), "x": (2,), "log_forget": (2,), "initial_state": (1,)}


def run_case(case: Case, device: torch.device | str) -> dict[str, tuple[float, float, int]]:
    """Run ``case`` on ``device`` and its float64 loop; return per tensor (overall error, worst channel error,
    worst channel) for the outputs and the gradient of every input (prefixed ``d``)."""
    gen = torch.Generator().manual_seed(case.seed)
    inputs = _inputs(case, gen)
    state_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    leaves = _leaves(inputs, case.dtype, device, state_dtype)
    run = {"hgrn2": _hgrn2_outputs, "gated": _hgrn2_outputs, "step": _step_outputs, "hgrn1": _hgrn1_outputs}[case.op]
    out, final = run(case, leaves, device, reference=False)
    assert out.dtype == case.dtype, f"output dtype {out.dtype} != input dtype {case.dtype}"
    assert final.dtype == state_dtype, f"final state dtype {final.dtype} != {state_dtype}"
    ref_leaves = _float64(leaves, device)
    out_ref, final_ref = run(case, ref_leaves, device, reference=True)
    results = {"o": (out, out_ref), "final_state": (final, final_ref)}
    if case.op != "step":
        d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        d_final = torch.randn(final.shape, generator=gen, dtype=torch.float64)
        loss = (out.double() * d_out.to(device)).sum() + (final.double() * d_final.to(device)).sum()
        loss.backward()
        ref_loss = (out_ref * d_out.to(device)).sum() + (final_ref * d_final.to(device)).sum()
        ref_loss.backward()
        for name, leaf in leaves.items():
            if leaf is not None:
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                results["d" + name] = (grad, ref_leaves[name].grad)
    channels = CHANNELS_HGRN1 if case.op == "hgrn1" else CHANNELS_HGRN2
    # the scales of the case: its largest root-mean-square output and gradient (the lower bound's gradient, a sum
    # over every position, is measured against the gradient's scale times the square root of their number)
    outputs = max(_rms(results["o"][1]), _rms(results["final_state"][1]))
    grads = [e for n, (_, e) in results.items() if n.startswith("d") and n != "dlower_bound"]
    gradient = max(map(_rms, grads), default=0.0)
    # d log λ / d β = (1 - σ(f)) / λ <= 1 / β: the lower bound's gradient is d log λ summed over positions and
    # divided by up to β, so its rounding is too
    positions = math.sqrt(case.batch * case.seq_len)
    if case.op == "gated" and leaves["lower_bound"] is not None:
        beta = leaves["lower_bound"].detach().double().cpu().expand(case.heads, case.key_dim)
        positions = positions / torch.where(beta > 0, beta, 1.0).reshape(-1)
        if leaves["lower_bound"].dim() == 1:  # [K] shared by the heads: its gradient sums theirs
            positions = positions.view(case.heads, case.key_dim).norm(dim=0)
    found = {}
    for name, (actual, expected) in results.items():
        assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.isfinite(actual).all(), f"{name}: {int((~torch.isfinite(actual)).sum())} non-finite values"
        dims = channels[name.removeprefix("d")]
        dims = tuple(range(actual.dim())) if dims is None else dims
        scale = outputs if not name.startswith("d") else gradient * (positions if name == "dlower_bound" else 1)
        # below the smallest normal number of the output dtype (float16's 6e-5) values lose their relative precision
        tiny = torch.finfo(actual.dtype).tiny if actual.dtype == torch.float16 else 0.0
        floor = torch.as_tensor(FLOOR[case.dtype] * scale).clamp_min(tiny)
        found[name] = errors(actual, expected, dims, floor)
        if name == "dlower_bound" and found[name][1] > TOL[case.dtype]:  # (the terms cost a float64 loop more)
            terms = lower_bound_terms(case, leaves, device, d_out, d_final).abs().sum(dim=(0, 1))  # [H, K]
            if leaves["lower_bound"].dim() == 1:  # [K] shared by the heads
                terms = terms.sum(0)
            terms = terms.reshape(-1).cpu()
            found[name] = errors(actual, expected, dims, torch.maximum(floor, FLOOR[case.dtype] * terms))
    return found


def lower_bound_terms(case: Case, leaves: dict, device, d_out: torch.Tensor, d_final: torch.Tensor) -> torch.Tensor:
    """The terms the lower bound's gradient sums, ``[B, T, H, K]``: d log λ at every position times ∂ log λ / ∂ β
    there, from the float64 loop (their sum over B and T is the float64 loop's gradient).

    Where λ stays near 1 (β = 0.999) d log λ is large, and the parts from the outputs' and the final state's
    gradients can cancel to a sum far smaller than its terms (measured: -95.2 and +94.6 summed to -0.63), which
    float32 resolves only to ~1e-7 of the terms: the float32 step loop misses such a channel by 3.8e-4 of the sum.
    Such a channel is judged against the sum of its terms' magnitudes, Σ |terms| (the classical bound on the
    rounding of a sum), as the other tensors are against the case's gradients (FLOOR): the terms' own errors are
    not independent, since d log λ at neighbouring positions sums nearly the same pairs of steps (those spanning
    both), so they add up coherently. Measured in a bfloat16 case with β = 0.999 (T = 200): the kernels' error in
    such a channel was 14.2, against Σ |terms| = 2,876 (0.49%, about bfloat16's unit rounding of 0.39%) and their
    root sum of squares 324. With FLOOR the allowed error is ~10 units of rounding of Σ |terms| in every dtype
    (float32: 1e-4 × 1e-2; half: 2e-2 × 2)."""
    x = {n: None if t is None else t.detach() for n, t in _float64(leaves, device).items()}
    f, beta = x["forget_proj"], x["lower_bound"]
    log_forget = lower_bounded_log_forget(f, beta).requires_grad_()  # a leaf: the loop's d log λ
    plain = {"q": activation(x["q"], case.output_gate), "v": x["v"], "log_forget": log_forget}
    out, final = _hgrn2_outputs(replace(case, op="hgrn2"), plain | {"initial_state": x["initial_state"]}, device, True)
    loss = (out * d_out.to(device)).sum() + (final * d_final.to(device)).sum()
    (d_log_forget,) = torch.autograd.grad(loss, [log_forget])
    beta_each = beta.expand(f.shape).clone().requires_grad_()  # one β per position: its gradient is the terms
    (terms,) = torch.autograd.grad((d_log_forget * lower_bounded_log_forget(f, beta_each)).sum(), [beta_each])
    return terms


def tolerance(case: Case, name: str) -> float:
    """The relative error allowed for tensor ``name`` of ``case``, overall and per channel."""
    return TOL[case.dtype]


def check_case(case: Case, device: torch.device | str) -> dict[str, tuple[float, float, int]]:
    """:func:`run_case`, failing with every tensor that exceeds its tolerance overall or in a channel."""
    found = run_case(case, device)
    bad = []
    for name, (overall, channel, worst) in found.items():
        tol = tolerance(case, name)
        if overall > tol or channel > tol:
            bad.append(f"{name}: overall {overall:.2e}, channel {worst} {channel:.2e} (tolerance {tol:.0e})")
    assert not bad, f"{case}: " + "; ".join(bad)
    return found

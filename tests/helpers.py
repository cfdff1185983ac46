"""Assertion helpers shared by the tests."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from hgrn2.ops.reference import hgrn2_recurrence_naive

# Where the kernel tests run: the GPU when there is one, else the CPU through the Triton interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The kernels' relative-error tolerances against float64, by input dtype.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_experiment(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Load the script ``experiments/<name>.py`` (see :func:`load_script`)."""
    return load_script(EXPERIMENTS, name, monkeypatch)


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Load the script ``benchmarks/<name>.py`` (see :func:`load_script`)."""
    return load_script(BENCHMARKS, name, monkeypatch)


def load_script(folder: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """experiments/ and benchmarks/ are folders of scripts, not packages: load ``<folder>/<name>.py`` from its path,
    as module ``name`` (dataclasses look their module up in ``sys.modules``) with its neighbours importable, for one
    test."""
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def reversed_within(x: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Each packed sequence of x [1, T, ...] (``bounds``: cu_seqlens as a list) reversed within its own span."""
    return torch.cat([x[:, start:end].flip(1) for start, end in zip(bounds, bounds[1:])], 1)


def run_compiler_probe(probe: str, timeout: float = 600) -> dict:
    """Run ``probe`` (Python source that prints one JSON object on its last line) in a child process from the
    repository root, without the Triton interpreter that tests/conftest.py turns on (lowering a kernel needs
    Triton's compiler), and return that object; the child's errors, or its outlasting ``timeout`` seconds, fail the
    test."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (0 when both are zero)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff if denom == 0 else diff / denom


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "tensor") -> None:
    """Fail with the error found when the relative error exceeds ``tol``, or on any NaN/Inf or shape mismatch."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = relative_error(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def check_against_float64(run, reference, inputs, grad_names, tol, output_names=("o", "final_state")) -> None:
    """``run(*inputs) -> (out, final_state)``, a kernel, against ``reference`` evaluated on float64 CPU copies of
    the same inputs: the output (in the first input's dtype), the float32 final state, and the gradient of
    every input that is not None (named by ``grad_names``) for random cotangents of both outputs."""
    out, final = run(*inputs)
    assert out.dtype == inputs[0].dtype and final.dtype == torch.float32
    d_out, d_final = torch.randn_like(out), torch.randn_like(final)
    ((out.float() * d_out.float()).sum() + (final * d_final).sum()).backward()
    leaves = [None if x is None else x.detach().double().cpu().requires_grad_() for x in inputs]
    out_ref, final_ref = reference(*leaves)
    ((out_ref * d_out.double().cpu()).sum() + (final_ref * d_final.double().cpu()).sum()).backward()
    assert_rel_close(out.float(), out_ref, tol, output_names[0])
    assert_rel_close(final, final_ref, tol, output_names[1])
    for name, x, leaf in zip(grad_names, inputs, leaves):
        if x is not None:
            assert_rel_close(x.grad.float(), leaf.grad, tol, name)


def kernel_leaf(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a ``dtype`` leaf that requires grad, on the kernel tests' device."""
    return x.to(device=DEVICE, dtype=dtype).requires_grad_()


def gated_kernel_leaves(batch, seq_len, heads, key_dim, value_dim, dtype, forget_scale):
    """Leaves for the gated entry: q_proj, v, forget_proj (standard normal, forget_proj times ``forget_scale``)
    in ``dtype`` and a float32 lower bound ``[H, K]`` uniform in [0, 1) with the first head's exactly 0."""
    q_proj = kernel_leaf(torch.randn(batch, seq_len, heads, key_dim), dtype)
    v = kernel_leaf(torch.randn(batch, seq_len, heads, value_dim), dtype)
    forget_proj = kernel_leaf(forget_scale * torch.randn(batch, seq_len, heads, key_dim), dtype)
    beta = torch.rand(heads, key_dim)
    beta[0] = 0.0
    return q_proj, v, forget_proj, kernel_leaf(beta, torch.float32)


def recurrence_leaves(batch, seq_len, heads, dim, n_states, dtype=torch.float32):
    """Leaves for the plain entry with K = V = ``dim``: q, v (standard normal), log λ = logsigmoid of twice a
    standard normal, and an initial state per scanned sequence ``[n_states, H, K, V]``."""
    q = kernel_leaf(torch.randn(batch, seq_len, heads, dim), dtype)
    v = kernel_leaf(torch.randn(batch, seq_len, heads, dim), dtype)
    log_forget = kernel_leaf(F.logsigmoid(2 * torch.randn(batch, seq_len, heads, dim)), dtype)
    return q, v, log_forget, kernel_leaf(torch.randn(n_states, heads, dim, dim), torch.float32)


def check_hgrn2_kernel(op, q, v, log_forget, *, scale=1.0, initial_state=None, cu_seqlens=None, tol) -> None:
    """An HGRN2 kernel entry ``op(q, v, log_forget, ...)`` with the final state, against the float64 step loop."""
    cu_cpu = None if cu_seqlens is None else cu_seqlens.cpu()
    kwargs = dict(scale=scale, output_final_state=True)

    def run(q, v, g, h0):
        return op(q, v, g, initial_state=h0, cu_seqlens=cu_seqlens, **kwargs)

    def reference(q, v, g, h0):
        return hgrn2_recurrence_naive(q, v, g, initial_state=h0, cu_seqlens=cu_cpu, **kwargs)

    names = ("dq", "dv", "dlog_forget", "dinitial_state")
    check_against_float64(run, reference, [q, v, log_forget, initial_state], names, tol)


class LossRecorder(pl.Callback):
    """Records each training step's loss; ``stop_at`` ends the fit after that global step (an interruption)."""

    def __init__(self, stop_at: int | None = None):
        self.losses, self.stop_at = [], stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.item())
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True  # an interruption: the run ends here, its last checkpoint is at this step


@contextlib.contextmanager
def chunk_state_path(path: str):
    """Run the chunked kernels' states through one path of ``hgrn2.ops.chunk.LAUNCH``: "walk" (the deltas formed
    inside the walk over chunks) or "deltas" (every chunk's delta at once, then the elementwise walk)."""
    from hgrn2.ops import chunk

    settings = {
        "walk": dict(walk_programs_per_sm=0.0),
        "deltas": dict(walk_programs_per_sm=math.inf),
    }[path]
    saved = dict(chunk.LAUNCH)
    chunk.LAUNCH.update(settings)
    try:
        yield
    finally:
        chunk.LAUNCH.clear()
        chunk.LAUNCH.update(saved)

"""Correctness of the Triton kernels at full size on a CUDA GPU, against float64 references; writes a log.

    python benchmarks/gpu_check.py --out benchmarks/results

Every check draws fresh random inputs, runs the kernel forward and backward, and compares the output,
the final state and every gradient with the plain-PyTorch reference (hgrn2.ops.reference) evaluated in
float64 on the same inputs: relative error ‖kernel − reference‖ / ‖reference‖ against 1e-4 (float32,
TF32 off) or 2e-2 (bfloat16). Then a whole LRA Pathfinder encoder (both 2-D mixer modes) on the kernels in
float32 against the same weights on the PyTorch loop in float64 (``--only encoders`` runs just those). Exits with
status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.atomic import write_atomically
from hgrn2.models.lra import LRAClassifier, lra_config  # noqa: E402
from hgrn2.ops.chunk import chunk_hgrn2, chunk_hgrn2_gated  # noqa: E402
from hgrn2.ops.gates import lower_bounded_log_forget  # noqa: E402
from hgrn2.ops.recurrent import fused_recurrent_hgrn2, fused_recurrent_hgrn2_step  # noqa: E402
from hgrn2.ops.reference import (  # noqa: E402
    hgrn1_recurrence_chunked,
    hgrn2_recurrence_chunked,
    hgrn2_recurrence_naive,
)
from hgrn2.ops.scan import scan_hgrn1  # noqa: E402
from hgrn2.ops.small_state import small_state_hgrn2  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LINES: list[str] = []
FAILURES: list[str] = []
LOG_PATH: list[Path] = []  # set by main; the log is rewritten after every line, so a timeout loses nothing


def log(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)
    if LOG_PATH:
        text = "\n".join(LINES) + "\n"
        write_atomically(LOG_PATH[0], lambda file: file.write(text))


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def report(name: str, pairs: dict, tol: float, seconds: float) -> None:
    errors = {key: rel(a, b) for key, (a, b) in pairs.items()}
    ok = all(err <= tol for err in errors.values())
    if not ok:
        FAILURES.append(name)
    detail = " ".join(f"{key}={err:.2e}" for key, err in errors.items())
    log(f"{'PASS' if ok else 'FAIL'} {name} (tol {tol:.0e}, {seconds:.1f}s): {detail}")


def leaf(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).requires_grad_()


def reference_grads(fn, inputs, cotangents):
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    outputs = fn(*leaves)
    sum((out * g.double()).sum() for out, g in zip(outputs, cotangents)).backward()
    return [out.detach() for out in outputs], [None if x is None else x.grad for x in leaves]


def gates(kind: str, shape) -> torch.Tensor:
    if kind == "log-uniform[-30,0]":
        return -30 * torch.rand(shape, device="cuda")
    if kind == "1-1e-6":
        return torch.full(shape, math.log1p(-1e-6), device="cuda")
    if kind == "wide":  # some 16-step blocks decay past e^-60 (pairwise path), most do not (one matmul)
        return F.logsigmoid(4 * torch.randn(shape, device="cuda") - 2)
    return F.logsigmoid(torch.randn(shape, device="cuda") + 1.0)


def check_hgrn2(batch, seq_len, heads, dim, dtype, *, gate="logsigmoid", n_packed=0, op=chunk_hgrn2):
    """``op`` (the chunked kernels, or the step-by-step small-state ones) forward and backward against float64."""
    torch.manual_seed(seq_len + heads)
    cu_seqlens = None
    if n_packed:
        cuts = torch.randperm(seq_len - 1, device="cuda")[: n_packed - 1].sort().values + 1
        cu_seqlens = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), seq_len)])
    n_states = batch if cu_seqlens is None else n_packed
    q = leaf(torch.randn(batch, seq_len, heads, dim, device="cuda"), dtype)
    v = leaf(torch.randn(batch, seq_len, heads, dim, device="cuda"), dtype)
    log_forget = leaf(gates(gate, (batch, seq_len, heads, dim)), dtype)
    h0 = leaf(torch.randn(n_states, heads, dim, dim, device="cuda"), torch.float32)
    start = time.time()
    o, final = op(q, v, log_forget, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    do, d_final = torch.randn_like(o), torch.randn_like(final)
    ((o.float() * do.float()).sum() + (final * d_final).sum()).backward()
    torch.cuda.synchronize()
    seconds = time.time() - start
    (o_ref, final_ref), grads = reference_grads(
        lambda q, v, g, h0: hgrn2_recurrence_chunked(
            q, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens
        ),
        [q, v, log_forget, h0],
        [do, d_final],
    )
    pairs = {"o": (o, o_ref), "state": (final, final_ref), "dq": (q.grad, grads[0]), "dv": (v.grad, grads[1])}
    pairs |= {"dlog_forget": (log_forget.grad, grads[2]), "dh0": (h0.grad, grads[3])}
    packed = f", {n_packed} packed" if n_packed else ""
    name = f"{op.__name__} {str(dtype)[6:]} B={batch} T={seq_len} H={heads} K=V={dim} gates={gate}{packed}"
    report(name, pairs, TOL[dtype], seconds)


def check_gated(batch, seq_len, heads, dim, dtype):
    torch.manual_seed(1)
    q_proj = leaf(torch.randn(batch, seq_len, heads, dim, device="cuda"), dtype)
    v = leaf(torch.randn(batch, seq_len, heads, dim, device="cuda"), dtype)
    forget_proj = leaf(2 * torch.randn(batch, seq_len, heads, dim, device="cuda"), dtype)
    beta = torch.rand(heads, dim, device="cuda")
    beta[0] = 0.0  # the first layer's bound: exactly 0
    beta = leaf(beta, torch.float32)
    start = time.time()
    o, _ = chunk_hgrn2_gated(q_proj, v, forget_proj, beta, output_gate="silu")
    do = torch.randn_like(o)
    (o.float() * do.float()).sum().backward()
    torch.cuda.synchronize()
    seconds = time.time() - start
    (o_ref,), grads = reference_grads(
        lambda p, v, f, b: hgrn2_recurrence_chunked(F.silu(p), v, lower_bounded_log_forget(f, b))[:1],
        [q_proj, v, forget_proj, beta],
        [do],
    )
    pairs = {"o": (o, o_ref), "dq_proj": (q_proj.grad, grads[0]), "dv": (v.grad, grads[1])}
    pairs |= {"dforget_proj": (forget_proj.grad, grads[2]), "dlower_bound": (beta.grad, grads[3])}
    report(
        f"chunk_hgrn2_gated silu {str(dtype)[6:]} B={batch} T={seq_len} H={heads} K=V={dim}", pairs, TOL[dtype], seconds
    )


def check_hgrn1(batch, seq_len, dim, dtype, gate="logsigmoid"):
    torch.manual_seed(2)
    x = leaf(torch.randn(batch, seq_len, dim, device="cuda"), dtype)
    log_forget = leaf(gates(gate, (batch, seq_len, dim)), dtype)
    h0 = leaf(torch.randn(batch, dim, device="cuda"), torch.float32)
    start = time.time()
    h, final = scan_hgrn1(x, log_forget, initial_state=h0, output_final_state=True)
    dh, d_final = torch.randn_like(h), torch.randn_like(final)
    ((h.float() * dh.float()).sum() + (final * d_final).sum()).backward()
    torch.cuda.synchronize()
    seconds = time.time() - start
    (h_ref, final_ref), grads = reference_grads(
        lambda x, g, h0: hgrn1_recurrence_chunked(x, g, initial_state=h0, output_final_state=True),
        [x, log_forget, h0],
        [dh, d_final],
    )
    pairs = {"h": (h, h_ref), "state": (final, final_ref), "dx": (x.grad, grads[0])}
    pairs |= {"dlog_forget": (log_forget.grad, grads[1]), "dh0": (h0.grad, grads[2])}
    report(f"scan_hgrn1 {str(dtype)[6:]} B={batch} T={seq_len} D={dim} gates={gate}", pairs, TOL[dtype], seconds)


def check_decoding(batch, heads, dim, dtype, steps=4):
    torch.manual_seed(3)
    q = torch.randn(batch, steps, heads, dim, device="cuda").to(dtype)
    v = torch.randn(batch, steps, heads, dim, device="cuda").to(dtype)
    log_forget = gates("logsigmoid", q.shape).to(dtype)
    h0 = torch.randn(batch, heads, dim, dim, device="cuda")
    state = h0.clone()
    start = time.time()
    outputs = [fused_recurrent_hgrn2_step(q[:, t], v[:, t], log_forget[:, t], state)[0] for t in range(steps)]
    o_seq, _ = fused_recurrent_hgrn2(q, v, log_forget, initial_state=h0)
    torch.cuda.synchronize()
    seconds = time.time() - start
    o_ref, final_ref = hgrn2_recurrence_naive(
        q.double(), v.double(), log_forget.double(), initial_state=h0.double(), output_final_state=True
    )
    pairs = {"o_step": (torch.stack(outputs, 1), o_ref), "state": (state, final_ref), "o_seq": (o_seq, o_ref)}
    report(f"recurrent step {str(dtype)[6:]} B={batch} H={heads} K=V={dim} x{steps}", pairs, TOL[dtype], seconds)


def check_lra_encoder(preset: str, batch: int, **overrides) -> None:
    """A whole LRA encoder (training mode) on the kernels in float32 against the same weights on the PyTorch loop
    in float64: logits, the gradient of every parameter, and all the gradients as one vector.

    Per-parameter errors are reported for the tensors whose gradient holds at least 1e-3 of the whole gradient's
    norm: a bias added just before a BatchNorm has an exact gradient of zero, so its relative error would only
    measure rounding."""
    torch.manual_seed(4)
    kernels = LRAClassifier(lra_config(preset, backend="auto", **overrides)).cuda()
    loop = LRAClassifier(lra_config(preset, backend="naive", **overrides)).cuda().double()
    loop.load_state_dict(kernels.state_dict())
    length = math.prod(kernels.config.grid_size or (1024,))
    pixels = torch.randint(0, 256, (batch, length), device="cuda", dtype=torch.uint8)
    cotangent = torch.randn(batch, kernels.config.num_classes, device="cuda")
    start = time.time()
    logits = kernels(pixels)
    (logits * cotangent).sum().backward()
    torch.cuda.synchronize()
    seconds = time.time() - start
    logits_ref = loop(pixels)
    (logits_ref * cotangent.double()).sum().backward()
    grads = {name: p.grad for name, p in kernels.named_parameters()}
    grads_ref = {name: p.grad for name, p in loop.named_parameters()}
    whole = torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in grads_ref.values()])
    floor = 1e-3 * whole[1].norm()
    pairs = {"logits": (logits, logits_ref), "all_grads": whole}
    worst = max((name for name in grads if grads_ref[name].norm() >= floor), key=lambda n: rel(grads[n], grads_ref[n]))
    pairs[f"worst_param[{worst}]"] = (grads[worst], grads_ref[worst])
    small = sum(1 for name in grads if grads_ref[name].norm() < floor)
    settings = " ".join(f"{key}={value}" for key, value in overrides.items())
    name = f"LRA {preset} {settings} encoder, float32 kernels vs float64 loop, B={batch} ({small} tiny skipped)"
    report(name, pairs, TOL[torch.float32], seconds)


def check_kernels() -> None:
    check_hgrn2(8, 2048, 8, 128, torch.bfloat16)  # 16K tokens
    check_hgrn2(8, 2048, 8, 128, torch.bfloat16, gate="wide")
    check_hgrn2(1, 65536, 4, 128, torch.bfloat16)  # 64K tokens, one sequence
    check_hgrn2(1, 32768, 8, 128, torch.bfloat16, n_packed=37)
    check_hgrn2(1, 8192, 8, 128, torch.float32, n_packed=11)
    for gate in ("log-uniform[-30,0]", "1-1e-6"):
        check_hgrn2(1, 65536, 2, 128, torch.bfloat16, gate=gate)
        check_hgrn1(1, 65536, 1024, torch.bfloat16, gate=gate)
    check_hgrn1(8, 2048, 1024, torch.bfloat16)
    check_hgrn1(2, 8192, 1024, torch.float32)
    check_decoding(64, 8, 128, torch.bfloat16)
    check_decoding(64, 8, 128, torch.float32)
    check_hgrn2(1792, 14, 96, 2, torch.bfloat16, op=small_state_hgrn2)  # hgrn2_vit_tiny's row scans at B = 128
    check_hgrn2(32, 2000, 16, 4, torch.bfloat16, gate="log-uniform[-30,0]", op=small_state_hgrn2)  # ListOps
    check_hgrn2(4096, 32, 64, 2, torch.bfloat16, op=small_state_hgrn2)  # Pathfinder's row scans at B = 128
    check_hgrn2(16, 197, 24, 8, torch.float32, op=small_state_hgrn2)
    check_gated(4, 4096, 8, 128, torch.bfloat16)
    check_gated(2, 1000, 4, 96, torch.float32)  # ragged T, K = V = 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for <gpu>-gpu-check.log")
    parser.add_argument("--only", choices=["encoders"], default=None, help="run only these checks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    import triton

    props = torch.cuda.get_device_properties(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    LOG_PATH.append(out / f"{props.name.replace(' ', '-')}-gpu-check.log")
    log(f"device: {props.name}, torch {torch.__version__}, triton {triton.__version__}")
    if args.only != "encoders":
        check_kernels()
    check_lra_encoder("pathfinder", 8)
    check_lra_encoder("pathfinder", 8, grid_scan="series")
    log(f"{len(FAILURES)} of the checks failed" + (": " + "; ".join(FAILURES) if FAILURES else ""))
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()

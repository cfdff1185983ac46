"""Benchmark of the HGRN2/HGRN1 Triton kernels on one CUDA GPU, side by side with fla and PyTorch SDPA.

    python benchmarks/ops.py --out benchmarks/results           # writes <gpu>-ops.json, prints a table
    python benchmarks/ops.py --decode-only                      # the decoding step alone: <gpu>-ops-decode.json

bf16, H = 8, K = V = 128; 16K and 64K tokens per launch as B x T with T in {1K, 2K, 4K, 8K, 16K}; each time
is the median of ``triton.testing.do_bench`` (L2 flushed between runs). Compared with fla's ``chunk_gla``
(given k = 1 - λ precomputed, which the HGRN2 kernels derive themselves), PyTorch SDPA causal attention
(head dim 128), and the byte floor: the bytes the op must read and write (forward: q, v, log λ, o;
backward: q, v, log λ, do, dq, dv, d log λ) over the measured device-to-device copy bandwidth. Also the
decoding step (B = 1 and 64), the HGRN1 scan (D = 1024) against fla's ``chunk_hgrn``, the step-by-step
small-state kernels against the chunked ones on the image and ListOps models' shapes (heads of 2 x 2 to
16 x 16), and the first call of each kernel with an empty Triton cache (compilation included). fla is skipped
when it is not installed.
"""

from __future__ import annotations

import os
import tempfile

# Our first calls are timed with an empty Triton cache: point it at a fresh folder before triton loads. fla then
# goes back to the cache the caller set (gpu_suite.sh carries one, autotuning results included, between calls).
_CALLERS_CACHE = os.environ.get("TRITON_CACHE_DIR")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="hgrn2-triton-cache-")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_info import triton_cache_state  # noqa: E402

from datamodules.atomic import write_json_atomically  # noqa: E402
from hgrn2.ops import hgrn2_recurrence  # noqa: E402
from hgrn2.ops.chunk import chunk_hgrn2, chunk_hgrn2_gated  # noqa: E402
from hgrn2.ops.gates import lower_bounded_log_forget  # noqa: E402
from hgrn2.ops.recurrent import fused_recurrent_hgrn2_step  # noqa: E402
from hgrn2.ops.scan import scan_hgrn1  # noqa: E402
from hgrn2.ops.small_state import small_state_hgrn2  # noqa: E402

try:
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
    from fla.ops.hgrn import chunk_hgrn
except ImportError:
    chunk_gla = fused_recurrent_gla = chunk_hgrn = None

HEADS, DIM = 8, 128
SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
TOKENS = (16384, 65536)


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def first_call(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (ms(lambda: dst.copy_(src)) * 1e-3)


def grads_of(fn, inputs):
    """A closure running fn forward and backward (gradients returned, not accumulated)."""

    def run():
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def hgrn2_inputs(batch, seq_len, heads=HEADS, dim=DIM):
    shape = (batch, seq_len, heads, dim)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = F.logsigmoid(torch.randn(shape, device="cuda") + 2).to(torch.bfloat16).requires_grad_()
    return q, v, g


def time_hgrn2_row(tokens, seq_len, bandwidth):
    batch = tokens // seq_len
    q, v, g = hgrn2_inputs(batch, seq_len)
    row = {"tokens": tokens, "T": seq_len, "B": batch}
    row["ours_fwd"] = ms(lambda: chunk_hgrn2(q, v, g))
    row["ours_fwdbwd"] = ms(grads_of(lambda: chunk_hgrn2(q, v, g)[0], [q, v, g]))
    sq, sk, sv = (torch.randn(batch, HEADS, seq_len, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sq.requires_grad_(), sk.requires_grad_(), sv.requires_grad_()
    attention = lambda: F.scaled_dot_product_attention(sq, sk, sv, is_causal=True)  # noqa: E731
    row["sdpa_fwd"] = ms(attention)
    row["sdpa_fwdbwd"] = ms(grads_of(attention, [sq, sk, sv]))
    elements = tokens * HEADS * DIM
    row["floor_fwd"] = 4 * elements * 2 / bandwidth * 1e3
    row["floor_fwdbwd"] = 11 * elements * 2 / bandwidth * 1e3
    return row


def time_fla_row(row):
    q, v, g = hgrn2_inputs(row["B"], row["T"])
    k = (-torch.expm1(g.float())).to(torch.bfloat16).detach().requires_grad_()
    row["fla_fwd"] = ms(lambda: chunk_gla(q, k, v, g, scale=1.0))
    row["fla_fwdbwd"] = ms(grads_of(lambda: chunk_gla(q, k, v, g, scale=1.0)[0], [q, k, v, g]))


def time_gated(tokens, seq_len):
    """The fused gated entry (default settings) against torch gates followed by the plain kernels (same math), and
    the fused entry with float32 states and TF32 matmuls for the lower bound's gradient (``precise_bound_grad``)."""
    batch = tokens // seq_len
    q_proj, v, f = hgrn2_inputs(batch, seq_len)
    beta = torch.rand(HEADS, DIM, device="cuda", requires_grad=True)
    fused = lambda: chunk_hgrn2_gated(q_proj, v, f, beta, output_gate="silu")[0]  # noqa: E731
    unfused = lambda: chunk_hgrn2(F.silu(q_proj), v, lower_bounded_log_forget(f, beta))[0]  # noqa: E731
    row = {
        "tokens": tokens, "T": seq_len, "B": batch,
        "fused_fwd": ms(fused), "fused_fwdbwd": ms(grads_of(fused, [q_proj, v, f, beta])),
        "unfused_fwd": ms(unfused), "unfused_fwdbwd": ms(grads_of(unfused, [q_proj, v, f, beta])),
    }  # fmt: skip
    precise = lambda: chunk_hgrn2_gated(q_proj, v, f, beta, output_gate="silu", precise_bound_grad=True)[0]  # noqa: E731
    row["fused_fwdbwd_precise"] = ms(grads_of(precise, [q_proj, v, f, beta]))
    return row


def time_decode(batch, with_fla=False):
    q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(batch, HEADS, DIM, device="cuda") + 2).to(torch.bfloat16)
    state = torch.zeros(batch, HEADS, DIM, DIM, device="cuda")
    row = {"B": batch, "ours_us": 1e3 * ms(lambda: fused_recurrent_hgrn2_step(q, v, g, state))}
    # the public op with T = 1, state in and out: what a caller that does not know the decoding step pays
    with torch.no_grad():
        one_step = lambda: hgrn2_recurrence(  # noqa: E731
            q[:, None], v[:, None], g[:, None], initial_state=state, output_final_state=True
        )
        row["public_op_T1_us"] = 1e3 * ms(one_step)
        unchecked = lambda: hgrn2_recurrence(  # noqa: E731
            q[:, None], v[:, None], g[:, None], initial_state=state, output_final_state=True, check_values=False
        )
        row["public_op_T1_unchecked_us"] = 1e3 * ms(unchecked)  # no value check, so no device sync
    if with_fla:
        k = (-torch.expm1(g.float())).to(torch.bfloat16)
        step = lambda: fused_recurrent_gla(  # noqa: E731
            q[:, None], k[:, None], v[:, None], gk=g[:, None], scale=1.0, initial_state=state,
            output_final_state=True,
        )  # fmt: skip
        row["fla_us"] = 1e3 * ms(step)
    return row


def time_hgrn1(batch, seq_len, dim=1024, with_fla=False):
    x = torch.randn(batch, seq_len, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = F.logsigmoid(torch.randn(batch, seq_len, dim, device="cuda") + 2).to(torch.bfloat16).requires_grad_()
    row = {"B": batch, "T": seq_len, "D": dim}
    row["ours_fwd"] = ms(lambda: scan_hgrn1(x, g))
    row["ours_fwdbwd"] = ms(grads_of(lambda: scan_hgrn1(x, g)[0], [x, g]))
    if with_fla:  # fla takes the gated input (1 - λ) x precomputed
        x_in = ((-torch.expm1(g.float())) * x.float()).to(torch.bfloat16).detach().requires_grad_()
        row["fla_fwd"] = ms(lambda: chunk_hgrn(x_in, g))
        row["fla_fwdbwd"] = ms(grads_of(lambda: chunk_hgrn(x_in, g)[0], [x_in, g]))
    return row


# (B, T, H, K = V): hgrn2_vit_tiny's row scans at batch 128, the ListOps encoder at batch 32, an MQAR model
SMALL_STATE_SHAPES = ((1792, 14, 96, 2), (32, 2000, 16, 4), (64, 512, 8, 16))


def time_small_state(batch, seq_len, heads, dim):
    """bf16 forward and forward+backward of the chunked and the step-by-step kernels on one shape, ms."""
    q, v, g = hgrn2_inputs(batch, seq_len, heads, dim)
    row = {"B": batch, "T": seq_len, "H": heads, "K": dim, "V": dim}
    for name, op in (("chunk", chunk_hgrn2), ("steps", small_state_hgrn2)):
        row[f"{name}_fwd"] = ms(lambda op=op: op(q, v, g))
        row[f"{name}_fwdbwd"] = ms(grads_of(lambda op=op: op(q, v, g)[0], [q, v, g]))
    return row


def first_calls():
    """Seconds of each kernel's first forward+backward call with an empty Triton cache."""
    q, v, g = hgrn2_inputs(16, 1024)
    beta = torch.rand(HEADS, DIM, device="cuda", requires_grad=True)
    x = torch.randn(8, 2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xg = F.logsigmoid(torch.randn_like(x, dtype=torch.float32)).to(torch.bfloat16).requires_grad_()
    state = torch.zeros(1, HEADS, DIM, DIM, device="cuda")
    out = {
        "chunk_hgrn2 fwd+bwd": first_call(grads_of(lambda: chunk_hgrn2(q, v, g)[0], [q, v, g])),
        "chunk_hgrn2_gated fwd+bwd": first_call(grads_of(lambda: chunk_hgrn2_gated(q, v, g, beta)[0], [q, v, g, beta])),
        "scan_hgrn1 fwd+bwd": first_call(grads_of(lambda: scan_hgrn1(x, xg)[0], [x, xg])),
        "decode step": first_call(lambda: fused_recurrent_hgrn2_step(q[:1, 0], v[:1, 0], g[:1, 0], state)),
    }
    small = [t[..., :4].contiguous().detach().requires_grad_() for t in (q, v, g)]
    out["small_state_hgrn2 fwd+bwd"] = first_call(grads_of(lambda: small_state_hgrn2(*small)[0], small))
    return out


def fla_first_call():
    q, v, g = hgrn2_inputs(16, 1024)
    k = (-torch.expm1(g.float())).to(torch.bfloat16).detach().requires_grad_()
    return first_call(grads_of(lambda: chunk_gla(q, k, v, g, scale=1.0)[0], [q, k, v, g]))


def ratio(a, b):
    return f"{a / b:5.2f}" if a is not None and b else "   - "


def print_gated(result):
    print("\nfused gates vs torch gates + kernels, ms (/fla: against chunk_gla's f+b at the same shape)")
    for r in result["gated"]:
        fla = next((h for h in result.get("hgrn2", []) if h["tokens"] == r["tokens"] and h["T"] == r["T"]), {})
        ratios = ""
        if "fla_fwdbwd" in fla:
            fused, precise = r["fused_fwdbwd"] / fla["fla_fwdbwd"], r["fused_fwdbwd_precise"] / fla["fla_fwdbwd"]
            ratios = f" | /fla {fused:.2f}, precise {precise:.2f}"
        print(
            f"{r['tokens']:6d} {r['T']:5d} {r['B']:3d} | fused {r['fused_fwd']:.3f} / {r['fused_fwdbwd']:.3f} | "
            f"unfused {r['unfused_fwd']:.3f} / {r['unfused_fwdbwd']:.3f} | f+b with float32 states for the lower "
            f"bound's gradient {r['fused_fwdbwd_precise']:.3f}{ratios}"
        )


def print_tables(result):
    print(f"\n{result['device']} | torch {result['torch']} | triton {result['triton']} | fla {result['fla']}")
    print(f"copy bandwidth {result['copy_GBps']:.0f} GB/s (read + write)")
    print("\nHGRN2 bf16 H=8 K=V=128, ms (median)")
    head = (
        "tokens     T   B | ours fwd  f+b | fla fwd  f+b | sdpa fwd  f+b | floor fwd  f+b | /fla fwd f+b | /floor f+b"
    )
    print(head)
    for r in result["hgrn2"]:
        fla_f, fla_fb = r.get("fla_fwd"), r.get("fla_fwdbwd")
        print(
            f"{r['tokens']:6d} {r['T']:5d} {r['B']:3d} | {r['ours_fwd']:7.3f} {r['ours_fwdbwd']:6.3f} | "
            f"{fla_f or 0:6.3f} {fla_fb or 0:6.3f} | {r['sdpa_fwd']:7.3f} {r['sdpa_fwdbwd']:6.3f} | "
            f"{r['floor_fwd']:8.3f} {r['floor_fwdbwd']:6.3f} | {ratio(r['ours_fwd'], fla_f)} "
            f"{ratio(r['ours_fwdbwd'], fla_fb)} | {ratio(r['ours_fwdbwd'], r['floor_fwdbwd'])}"
        )
    print_gated(result)
    print_decode(result)
    print("\nHGRN1 scan bf16, ms")
    for r in result["hgrn1"]:
        print(
            f"{r['B']}x{r['T']} D={r['D']} | ours {r['ours_fwd']:.3f} / {r['ours_fwdbwd']:.3f} | "
            f"fla {r.get('fla_fwd', 0):.3f} / {r.get('fla_fwdbwd', 0):.3f} | "
            f"{ratio(r['ours_fwd'], r.get('fla_fwd'))} {ratio(r['ours_fwdbwd'], r.get('fla_fwdbwd'))}"
        )
    print("\nsmall states, bf16, ms: chunked kernels vs step-by-step kernels")
    for r in result.get("small_state", []):
        print(
            f"B={r['B']:5d} T={r['T']:5d} H={r['H']:3d} K=V={r['K']:3d} | chunk {r['chunk_fwd']:7.3f} / "
            f"{r['chunk_fwdbwd']:7.3f} | steps {r['steps_fwd']:7.3f} / {r['steps_fwdbwd']:7.3f} | "
            f"{ratio(r['steps_fwd'], r['chunk_fwd'])} {ratio(r['steps_fwdbwd'], r['chunk_fwdbwd'])}"
        )
    print("\nfirst call (empty Triton cache), s")
    for name, seconds in result["first_call_s"].items():
        print(f"{name:28s} {seconds:7.1f}")


def print_decode(result: dict) -> None:
    print("\ndecode step (one layer's recurrence), us")
    for r in result["decode"]:
        print(
            f"B={r['B']:3d} ours {r['ours_us']:7.1f} (hgrn2_recurrence, T = 1: {r['public_op_T1_us']:7.1f}, "
            f"check_values=False: {r['public_op_T1_unchecked_us']:7.1f}) | fla {r.get('fla_us', 0):7.1f} | "
            f"{ratio(r['ours_us'], r.get('fla_us'))} {ratio(r['public_op_T1_us'], r.get('fla_us'))}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for <gpu>-ops.json")
    parser.add_argument("--no-fla", action="store_true", help="leave fla out even when installed")
    parser.add_argument("--gated-only", action="store_true", help="time the gated entry alone: <gpu>-ops-gated.json")
    parser.add_argument(
        "--decode-only", action="store_true", help="time the decoding step alone: <gpu>-ops-decode.json"
    )
    parser.add_argument(
        "--fla-budget-s", type=float, default=300.0, help="stop timing fla rows this long after fla's first call"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ops.py needs a CUDA device")
    global chunk_gla, fused_recurrent_gla, chunk_hgrn
    if args.no_fla:
        chunk_gla = fused_recurrent_gla = chunk_hgrn = None
    torch.manual_seed(0)
    device = torch.cuda.get_device_name(0)
    fla_version = None
    if chunk_gla is not None:
        import fla

        fla_version = fla.__version__
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version}
    suffix = "-gated" if args.gated_only else "-decode" if args.decode_only else ""
    path = Path(args.out) / f"{device.replace(' ', '-')}-ops{suffix}.json"
    if args.decode_only:
        result["decode"] = [time_decode(1, chunk_gla is not None), time_decode(64, chunk_gla is not None)]
        save(result, path)
        print_decode(result)
        print(f"\nwrote {path}")
        return
    if args.gated_only:
        result["gated"] = [time_gated(16384, 2048), time_gated(65536, 4096)]
        save(result, path)
        print(f"\n{result['device']} | torch {result['torch']} | triton {result['triton']}")
        print_gated(result)
        print(f"\nwrote {path}")
        return
    result["first_call_s"] = first_calls()
    result["copy_GBps"] = copy_bandwidth() / 1e9
    bandwidth = result["copy_GBps"] * 1e9
    result["hgrn2"] = [time_hgrn2_row(tokens, t, bandwidth) for tokens in TOKENS for t in SEQ_LENS]
    result["gated"] = [time_gated(16384, 2048), time_gated(65536, 4096)]
    result["decode"] = [time_decode(1), time_decode(64)]
    result["hgrn1"] = [time_hgrn1(8, 2048), time_hgrn1(2, 8192)]
    save(result, path)
    result["small_state"] = [time_small_state(*shape) for shape in SMALL_STATE_SHAPES]
    save(result, path)
    if chunk_gla is not None:  # fla last: its first call autotunes for minutes; results are saved as they come
        if _CALLERS_CACHE:
            os.environ["TRITON_CACHE_DIR"] = _CALLERS_CACHE
        else:
            os.environ.pop("TRITON_CACHE_DIR")
        result["fla_triton_cache"] = triton_cache_state()  # files > 0: fla's first call found compiled kernels
        try:
            time_fla(result, path, args.fla_budget_s)
        except Exception as error:  # report what fla could not do, keep everything measured
            print(f"fla failed: {type(error).__name__}: {error}")
            result["fla_error"] = f"{type(error).__name__}: {error}"
            save(result, path)
    print_tables(result)
    print(f"\nwrote {path}")


def time_fla(result: dict, path: Path, budget_s: float) -> None:
    result["first_call_s"]["fla chunk_gla fwd+bwd"] = fla_first_call()  # minutes of autotuning: not in the budget
    save(result, path)
    start = time.perf_counter()
    for row in result["hgrn2"]:
        if time.perf_counter() - start > budget_s:
            print(f"fla budget of {budget_s} s spent: remaining fla rows skipped")
            break
        time_fla_row(row)
        save(result, path)
    result["decode"] = [time_decode(1, with_fla=True), time_decode(64, with_fla=True)]
    save(result, path)
    result["hgrn1"] = [time_hgrn1(8, 2048, with_fla=True), time_hgrn1(2, 8192, with_fla=True)]
    save(result, path)


def save(result: dict, path: Path) -> None:
    write_json_atomically(path, result, indent=1)


if __name__ == "__main__":
    main()

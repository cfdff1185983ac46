"""Parity with flash-linear-attention's ``HGRN2ForCausalLM``: converted checkpoints compute the same function.

For each shape (``small``, ``small-tied``, and ``340m``: fla's hgrn2-340M layout, 24 × 1024, expand ratio 128,
vocabulary 32000) two directions are checked:

* fla -> ours: a randomly initialised fla ``HGRN2ForCausalLM`` (its lower bounds and norm weights randomised
  too, so that a mix-up of those shows) is saved with ``save_pretrained`` and read with
  ``HGRN2ForCausalLM.from_fla``;
* ours -> fla: a random ``HGRN2ForCausalLM`` of the same config is written with ``to_fla`` and read back with
  transformers' ``AutoModelForCausalLM`` (fla registers its HGRN2 there).

In float32 (TF32 off for PyTorch's matmuls) the script compares the logits of ``--batch`` × ``--seq-len``
random tokens (relative error, ‖ours − fla‖ / ‖fla‖, at most ``--tolerance``; both are also measured against
our model run in float64 on the PyTorch backend) and the greedy continuation of ``--new-tokens`` tokens from a
``--prompt-len``-token prompt (ours: ``generate(temperature=0)``; fla: its recurrent cache, one token at a
time). Two continuations may part only at a tie within float32 error: where the reference's logits for the
two candidate tokens are closer than twice the largest logit error the logits comparison measured; the report
says where and by how much, and ``--strict`` fails any parting. The JSON report goes to ``--out`` after every
case; the exit status is 1 when any check failed and 2 when fla or the device is missing. On a GPU machine, with
fla's wheels on the path::

    PYTHONPATH=/tmp/site:$PWD python benchmarks/fla_parity.py --out benchmarks/results/H100-fla-parity.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from datamodules.atomic import write_json_atomically
from hgrn2.models.lm import HGRN2ForCausalLM

# fla HGRN2Config fields per shape; "340m" leaves the MLP width to fla's own rule (2816 for D = 1024).
SHAPES: dict[str, dict] = {
    "small": dict(hidden_size=256, num_hidden_layers=4, expand_ratio=128, intermediate_size=512, vocab_size=4096),
    "small-tied": dict(hidden_size=256, num_hidden_layers=4, expand_ratio=128, intermediate_size=512,
                       vocab_size=4096, tie_word_embeddings=True),
    "340m": dict(hidden_size=1024, num_hidden_layers=24, expand_ratio=128, vocab_size=32000),
}  # fmt: skip


@dataclass
class FlaApi:
    """What the script needs of fla: a random model of a config, and its save and load."""

    version: str
    random_model: Callable[[dict, int], nn.Module]
    save: Callable[[nn.Module, Path], None]
    load: Callable[[Path], nn.Module]


def randomise_(model: nn.Module, seed: int) -> nn.Module:
    """Lower-bound logits ~ N(0, 1) and norm weights ~ 1 + N(0, 0.2²), in fla's naming and in ours; the linear
    weights keep the model's own initialisation (N(0, 0.02²) in both)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("lower_bounds", "lower_bounds.gamma")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            elif name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def fla_api(attn_mode: str = "chunk") -> FlaApi:
    """The real fla, its HGRN2 layers in ``attn_mode`` ("chunk": its chunked kernels, fla's default;
    "fused_recurrent": its step-by-step kernel); a missing install ends the script with status 2 (never a silent
    pass)."""
    try:
        import fla  # noqa: F401  (registers HGRN2 with transformers' Auto classes)
        from fla.models import HGRN2Config
        from fla.models import HGRN2ForCausalLM as FlaHGRN2
        from transformers import AutoModelForCausalLM
    except ImportError as error:
        print(f"FAIL: cannot import fla and transformers ({error}); put fla's wheels on PYTHONPATH", file=sys.stderr)
        sys.exit(2)

    def random_model(shape: dict, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return randomise_(FlaHGRN2(HGRN2Config(**shape, attn_mode=attn_mode)), seed)

    return FlaApi(
        version=getattr(fla, "__version__", "unknown"),
        random_model=random_model,
        save=lambda model, folder: model.save_pretrained(folder),
        load=lambda folder: AutoModelForCausalLM.from_pretrained(folder, attn_mode=attn_mode),
    )


# ------------------------------------------------------------------------------------------ checks


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


@torch.no_grad()
def reference_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def reference_greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """fla's greedy continuation of ``prompt [1, T]`` through its recurrent cache: ``[new_tokens]``."""
    out = model(input_ids=prompt, use_cache=True)
    tokens = []
    for step in range(new_tokens):
        token = out.logits[:, -1].argmax(dim=-1)  # [1]
        tokens.append(token)
        if step + 1 < new_tokens:
            out = model(input_ids=token[:, None], past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens)


def float64_twin(ours: HGRN2ForCausalLM) -> HGRN2ForCausalLM:
    """Our model on the PyTorch backend in float64: the yardstick of both float32 runs."""
    twin = HGRN2ForCausalLM(dataclasses.replace(ours.config, backend="torch", fused=False))
    twin.load_state_dict(ours.state_dict())
    return twin.to(device=next(ours.parameters()).device, dtype=torch.float64).eval()


@torch.no_grad()
def logits_report(ours: HGRN2ForCausalLM, reference: nn.Module, ids: torch.Tensor, tolerance: float) -> dict:
    ref = reference_logits(reference, ids)
    mine = ours(ids).logits.float()
    exact = float64_twin(ours)(ids).logits
    error = relative_error(mine, ref)
    finite = bool(torch.isfinite(mine).all() and torch.isfinite(ref).all())
    return {
        "relative_error": error,
        "max_abs_error": (mine - ref).abs().max().item(),
        "ours_vs_float64": relative_error(mine, exact),
        "reference_vs_float64": relative_error(ref, exact),
        "passed": finite and error <= tolerance,
    }


@torch.no_grad()
def greedy_report(
    ours: HGRN2ForCausalLM, reference: nn.Module, prompt: torch.Tensor, new_tokens: int, strict: bool, error: float
) -> dict:
    mine = ours.generate(prompt, new_tokens, temperature=0.0)[0, prompt.shape[1] :]
    ref = reference_greedy(reference, prompt, new_tokens)
    report = {"identical": bool(torch.equal(mine, ref)), "ours": mine.tolist(), "reference": ref.tolist()}
    return {**report, **tie_check(ours, reference, prompt, mine, ref, strict, error)}


@torch.no_grad()
def tie_check(ours, reference, prompt, mine: torch.Tensor, ref: torch.Tensor, strict: bool, error: float) -> dict:
    """Where two greedy continuations part: whether the reference's logits for the two tokens are within
    ``2 · error`` (the largest logit error measured elsewhere) of each other, a tie that float32 need not break
    the same way: it passes unless ``strict``. (The logits at the parting itself cannot decide this: whichever
    token each model chose, its own logits there are always within twice their difference.)"""
    if torch.equal(mine, ref):
        return {"passed": True}
    step = int((mine != ref).nonzero()[0, 0])
    prefix = torch.cat([prompt, ref[None, :step]], dim=1)  # the common prefix
    ref_last = reference_logits(reference, prefix)[0, -1].double()
    our_last = ours(prefix).logits[0, -1].double()
    gap = (ref_last[ref[step]] - ref_last[mine[step]]).item()
    tie = gap <= 2 * error
    return {"first_difference": step, "reference_gap": gap, "allowed_error": error,
            "logit_error_there": (our_last - ref_last).abs().max().item(), "tie_within_error": tie,
            "passed": tie and not strict}  # fmt: skip


# ------------------------------------------------------------------------------------------ the run


def fla_numerics_model(config, seed: int) -> HGRN2ForCausalLM:
    torch.manual_seed(seed)
    return randomise_(HGRN2ForCausalLM(config), seed)


def check_pair(ours, reference, args, device) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator).to(device)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=generator).to(device)
    logits = logits_report(ours, reference, ids, args.tolerance)
    greedy = greedy_report(ours, reference, prompt, args.new_tokens, args.strict, logits["max_abs_error"])
    return {"logits": logits, "greedy": greedy, "passed": logits["passed"] and greedy["passed"]}


def run_shape(name: str, shape: dict, api: FlaApi, args, device: str, work: Path) -> list[dict]:
    """Both directions for one shape; an exception fails its case with the traceback in the report."""
    results, config = [], None
    for direction in ("fla->ours", "ours->fla"):
        start = time.perf_counter()
        case = {"shape": name, "direction": direction, "fla_config": shape}
        try:
            if direction == "ours->fla" and config is None:
                raise RuntimeError("not run: it builds the config that fla->ours converted, and that case failed")
            if direction == "fla->ours":
                api.save(api.random_model(shape, args.seed), work / f"{name}-fla")
                ours = HGRN2ForCausalLM.from_fla(work / f"{name}-fla")
                config = ours.config
                reference = api.load(work / f"{name}-fla")
            else:
                ours = fla_numerics_model(config, args.seed + 1)
                ours.to_fla(work / f"{name}-export")
                reference = api.load(work / f"{name}-export")
            ours, reference = ours.to(device).float().eval(), reference.to(device).float().eval()
            case["lm_config"] = dataclasses.asdict(ours.config)
            case.update(check_pair(ours, reference, args, device))
        except Exception as error:  # recorded and failed, never skipped
            case.update(passed=False, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        case["seconds"] = time.perf_counter() - start
        results.append(case)
        print(summary_line(case), flush=True)
    return results


def summary_line(case: dict) -> str:
    verdict = "PASS" if case["passed"] else "FAIL"
    if "error" in case:
        return f"{verdict} {case['shape']} {case['direction']}: {case['error']}"
    logits, greedy = case["logits"], case["greedy"]
    parted = (
        "" if greedy["identical"] else f", parts at {greedy['first_difference']} (tie: {greedy['tie_within_error']})"
    )
    return (
        f"{verdict} {case['shape']} {case['direction']}: logits rel err {logits['relative_error']:.2e} "
        f"(ours vs float64 {logits['ours_vs_float64']:.2e}, fla vs float64 {logits['reference_vs_float64']:.2e}), "
        f"greedy {len(greedy['ours'])} tokens identical: {greedy['identical']}{parted}"
    )


def run_parity(args, api: FlaApi, shapes: dict[str, dict] | None = None) -> dict:
    shapes = shapes or {name: SHAPES[name] for name in args.shapes.split(",")}
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("FAIL: --device cuda but no CUDA device is visible", file=sys.stderr)
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "torch": torch.__version__,
        "fla": api.version,
        "tolerance": args.tolerance,
        "strict_greedy": args.strict,
        "settings": {k: getattr(args, k) for k in ("batch", "seq_len", "prompt_len", "new_tokens", "seed")},
        "results": [],
    }
    with tempfile.TemporaryDirectory() as work:
        for name, shape in shapes.items():
            report["results"] += run_shape(name, shape, api, args, device, Path(work))
            report["passed"] = all(case["passed"] for case in report["results"])
            if args.out:
                write_json_atomically(args.out, report)
    expected_cases = 2 * len(shapes)
    report["passed"] = len(report["results"]) == expected_cases and all(c["passed"] for c in report["results"])
    if args.out:
        write_json_atomically(args.out, report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--shapes", default="small,small-tied,340m", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--strict", action="store_true", help="greedy continuations must be identical (no ties)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fla-attn-mode", default="chunk", choices=("chunk", "fused_recurrent"), help="fla's HGRN2 kernels"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.shapes.split(",")) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; expected some of {sorted(SHAPES)}")
    if not math.isfinite(args.tolerance) or args.tolerance <= 0:
        parser.error(f"--tolerance must be a positive number, got {args.tolerance}")
    return args


def main(argv: list[str] | None = None, api: FlaApi | None = None, shapes: dict[str, dict] | None = None) -> int:
    args = parse_args(argv)
    report = run_parity(args, api or fla_api(args.fla_attn_mode), shapes)
    failed = sum(not case["passed"] for case in report["results"])
    verdict = "PASSED" if report["passed"] else "FAILED"
    print(f"{verdict}: {failed} of {len(report['results'])} cases failed; report in {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput of the 374m LM: hgrn2 vs fla's HGRN2ForCausalLM vs a transformers Llama with SDPA.

Each model trains for a few steps with bf16 autocast and fused AdamW on random tokens of one shape; we report
tokens/s (median step time over the timed steps), peak memory, the time of the first step (compilation and
autotuning included) and MFU: 6 · N · tokens/s over the GPU's dense bf16 peak, N the parameters that take part
in matmuls (all but the input embedding; attention's T² FLOPs are not counted). All models use the same
vocabulary (fla's default, 32000) so that the heads cost the same. ``hgrn2`` trains on the fused kernels and
the blockwise loss (``return_logits=False``); ``hgrn2-unfused`` is the same model on the plain modules with
full logits, for reference; ``hgrn2-precise`` is ``hgrn2`` with float32 chunk states and TF32 matmuls
where the lower bound's gradient is formed (``precise_bound_grad=True``; the default keeps half-precision
states). A name may carry launch settings of the chunked kernels (``hgrn2.ops.chunk.LAUNCH``) after ``+``, e.g.
``hgrn2+half_deltas=true``: that model runs with them, the others with the defaults, so that one run times
both. ``--profile`` adds a torch.profiler table of one step of each HGRN2 model. Run on a GPU::

    PYTHONPATH=$PWD python benchmarks/train.py --out benchmarks/results

fla and transformers are optional: a model whose package is missing is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from gpu_info import gpu_name, triton_cache_state

from datamodules.atomic import write_json_atomically

TRITON_CACHE_AT_START = triton_cache_state()  # before any kernel compiles: 0 files means a cold start

VOCAB = 32000
DENSE_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12}  # FLOP/s, dense, SXM datasheets


def build_hgrn2(args, fused=True, **overrides):
    from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig

    config = LMConfig.from_name(
        "374m", vocab_size=VOCAB, gradient_checkpointing=args.checkpointing, fused=fused, **overrides
    )
    model = HGRN2ForCausalLM(config)
    if args.compile:
        for block in model.blocks:
            block.compile()

    def loss_fn(input_ids, labels):
        return model(input_ids, labels=labels, return_logits=not fused).loss

    return model, loss_fn, model.embed.weight.numel()


def build_hgrn2_unfused(args):
    return build_hgrn2(args, fused=False)


def build_hgrn2_precise(args):
    """hgrn2 with the float32 states and TF32 matmuls that the chunk kernels can use for the lower bound's
    gradient (``LMConfig.precise_bound_grad=True``): what that accuracy costs per step."""
    return build_hgrn2(args, precise_bound_grad=True)


def build_fla(args):
    from fla.models import HGRN2Config
    from fla.models import HGRN2ForCausalLM as FlaHGRN2

    config = HGRN2Config(hidden_size=1024, num_hidden_layers=24, expand_ratio=128, vocab_size=VOCAB, use_cache=False)
    model = FlaHGRN2(config)

    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss  # fla shifts the labels

    return model, loss_fn, model.get_input_embeddings().weight.numel()


def build_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=VOCAB,
        max_position_embeddings=max(args.shapes_max_len, 2048),
        attn_implementation="sdpa",
        use_cache=False,
    )
    model = LlamaForCausalLM(config)

    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss

    return model, loss_fn, model.get_input_embeddings().weight.numel()


BUILDERS = {
    "hgrn2": build_hgrn2,
    "hgrn2-unfused": build_hgrn2_unfused,
    "hgrn2-precise": build_hgrn2_precise,
    "fla": build_fla,
    "llama": build_llama,
}

# kernel-name fragments → what they are, for the profile summary (first match wins)
KERNEL_GROUPS = [
    (
        "recurrence (hgrn2 chunk kernels)",
        ("state_walk", "state_scan", "chunk_delta", "output_fwd", "dqk_bwd", "dv_bwd", "log_forget", "gate_grad"),
    ),
    ("recurrence (fla)", ("chunk_", "fused_recurrent", "gla")),
    ("cross-entropy", ("ce_rows", "cross_entropy", "log_softmax", "nll_loss", "logsumexp")),
    ("add + rmsnorm (fused)", ("add_rmsnorm",)),
    ("glu product (fused)", ("glu_product",)),
    ("norm (fla/unfused)", ("layer_norm", "rms_norm", "rmsnorm", "norm_fwd", "norm_bwd")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")),
    ("optimizer", ("adam", "multi_tensor")),
]


def profile_step(step, name, seq_len, batch, out: Path) -> dict:
    """One step under torch.profiler: the top kernels and the time per kernel group, written to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in kernels) or 1.0
    groups = defaultdict(float)
    for e in kernels:
        group = next((g for g, keys in KERNEL_GROUPS if any(k in e.key.lower() for k in keys)), "other elementwise")
        groups[group] += e.device_time_total
    lines = [f"profile {name} T={seq_len} B={batch}: {total / 1e3:.1f} ms of kernel time in one step", ""]
    lines += [f"{ms / 1e3:9.2f} ms {ms / total:6.1%}  {g}" for g, ms in sorted(groups.items(), key=lambda x: -x[1])]
    lines += ["", f"{'ms':>9} {'share':>6} {'calls':>6}  kernel"]
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:25]:
        lines.append(f"{e.device_time_total / 1e3:9.2f} {e.device_time_total / total:6.1%} {e.count:6d}  {e.key[:110]}")
    text = "\n".join(lines)
    print(text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-{name}-{seq_len}x{batch}.txt").write_text(text + "\n")
    return {g: ms / 1e3 for g, ms in groups.items()}


def model_spec(spec: str) -> tuple[str, dict]:
    """``"hgrn2+key=value+..."`` as the builder's name and its launch settings (``hgrn2.ops.chunk.LAUNCH``
    entries, typed as their defaults). Raises ``ValueError`` naming an unknown model or setting."""
    name, *settings = spec.split("+")
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r} in {spec!r}; choose from {sorted(BUILDERS)}")
    if not settings:
        return name, {}
    from hgrn2.ops.chunk import launch_setting

    return name, dict(launch_setting(text) for text in settings)


@contextlib.contextmanager
def launch_settings(settings: dict):
    """The chunked kernels' launch settings changed for the duration, then restored."""
    if not settings:
        yield
        return
    from hgrn2.ops import chunk

    saved = dict(chunk.LAUNCH)
    chunk.LAUNCH.update(settings)
    try:
        yield
    finally:
        chunk.LAUNCH.clear()
        chunk.LAUNCH.update(saved)


def measure(spec, args, seq_len, batch):
    name, settings = model_spec(spec)
    with launch_settings(settings):
        result = measure_model(name, args, seq_len, batch)
    return {**result, "model": spec, **({"launch": settings} if settings else {})}


def measure_model(name, args, seq_len, batch):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        model, loss_fn, embedding_params = BUILDERS[name](args)
    except ImportError as error:
        return {"model": name, "skipped": f"{type(error).__name__}: {error}"}
    model = model.cuda()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator(device="cuda").manual_seed(0)

    def step():
        input_ids = torch.randint(0, VOCAB, (batch, seq_len), device="cuda", generator=generator)
        labels = input_ids.roll(-1, dims=1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(input_ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    torch.cuda.synchronize()
    start = time.perf_counter()
    first_loss = step().item()
    torch.cuda.synchronize()
    first_step = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    step_time = statistics.median(times)
    tokens_per_s = batch * seq_len / step_time
    peak = torch.cuda.max_memory_allocated() / 2**30
    result = {
        "model": name,
        "seq_len": seq_len,
        "batch": batch,
        "parameters": params,
        "tokens_per_s": tokens_per_s,
        "step_time_s": step_time,
        "step_time_spread_s": [min(times), max(times)],
        "peak_memory_gib": peak,
        "first_step_s": first_step,
        "first_loss": first_loss,
        "mfu": 6 * (params - embedding_params) * tokens_per_s / DENSE_BF16_PEAK.get(gpu_name(), float("nan")),
    }
    if args.profile and name in args.profile.split(","):
        result["profile_ms"] = profile_step(step, name, seq_len, batch, args.out)
    return result


def print_table(results):
    print(f"\n{'model':>17} {'T':>5} {'B':>2} {'tokens/s':>10} {'peak GiB':>9} {'first s':>8} {'MFU':>6} {'vs fla':>7}")
    for r in results:
        if "tokens_per_s" not in r:
            print(
                f"{r['model']:>17} {r.get('seq_len', ''):>5} {r.get('batch', ''):>2} {r.get('skipped', r.get('error'))}"
            )
            continue
        fla = next((f for f in results if f["model"] == "fla" and f.get("seq_len") == r["seq_len"]), None)
        ratio = r["tokens_per_s"] / fla["tokens_per_s"] if fla and "tokens_per_s" in fla else float("nan")
        print(
            f"{r['model']:>17} {r['seq_len']:>5} {r['batch']:>2} {r['tokens_per_s']:>10.0f} "
            f"{r['peak_memory_gib']:>9.1f} {r['first_step_s']:>8.1f} {r['mfu']:>6.1%} {ratio:>7.2f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        default="hgrn2,fla,llama",
        help=f"comma-separated, from {sorted(BUILDERS)}, each with optional +KEY=VALUE launch settings",
    )
    parser.add_argument("--shapes", default="2048x8,8192x2", help="comma-separated TxB")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block (hgrn2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each hgrn2 block")
    parser.add_argument("--profile", default="", help="comma-separated models to profile for one step per shape")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    for spec in args.models.split(","):
        try:
            model_spec(spec)
        except ValueError as error:
            parser.error(str(error))
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    args.shapes_max_len = max(t for t, _ in shapes)
    results = []
    for seq_len, batch in shapes:
        for name in args.models.split(","):
            try:
                result = measure(name, args, seq_len, batch)
            except torch.OutOfMemoryError as error:
                result = {"model": name, "seq_len": seq_len, "batch": batch, "error": f"out of memory: {error}"[:300]}
            results.append(result)
            print(json.dumps(result), flush=True)
            path = write_results(args, results)  # after every model, so that a cut-off run keeps what it measured
    print_table(results)
    print(f"wrote {path}")


def write_results(args, results) -> Path:
    path = args.out / f"{gpu_name()}-train.json"
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    meta["arguments"] = {k: str(v) for k, v in vars(args).items()}
    meta["triton_cache_at_start"] = TRITON_CACHE_AT_START
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    write_json_atomically(path, {"meta": meta, "results": results})
    return path


if __name__ == "__main__":
    main()

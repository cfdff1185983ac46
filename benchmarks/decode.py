"""Generation speed of the 374m LM: hgrn2's ``generate`` (CUDA-graph decoding) vs fla's HF ``generate``.

Both models are random-initialised with the same shape (hidden 1024, 24 layers, expand_ratio 128, vocab
32000), held in bfloat16, and continue a random 512-token prompt by 512 tokens greedily at each batch size
(fla with ``use_cache=True``, ``min_new_tokens`` so that no end-of-sequence token stops it early). Each
model generates once untimed (compilation, autotuning and, for hgrn2, the graph capture) and then once timed.
Reported: total time, tokens/s (B · 512 over the total, prefill included), the prefill time (one forward over
the prompt, timed apart) and the per-token latency (total minus prefill over the 511 decoding steps). hgrn2's
graph-decoded tokens are checked against its eager decoding. Run on a GPU::

    PYTHONPATH=$PWD python benchmarks/decode.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from gpu_info import gpu_name, triton_cache_state

from datamodules.atomic import write_json_atomically

TRITON_CACHE_AT_START = triton_cache_state()  # before any kernel compiles: 0 files means a cold start

VOCAB = 32000


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Median wall time of ``fn()`` (synchronised) over ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def hgrn2_runner():
    from hgrn2.models.lm import HGRN2ForCausalLM, LMConfig

    model = HGRN2ForCausalLM(LMConfig.from_name("374m", vocab_size=VOCAB)).cuda().to(torch.bfloat16).eval()

    def generate(prompt, n, **kwargs):
        return model.generate(prompt, n, temperature=0.0, **kwargs)

    def prefill(prompt):
        with torch.no_grad():
            hidden, state = model.hidden_states(prompt, output_state=True)
            return model.lm_head(hidden[:, -1])

    return model, generate, prefill


def fla_runner():
    from fla.models import HGRN2Config
    from fla.models import HGRN2ForCausalLM as FlaHGRN2

    config = HGRN2Config(hidden_size=1024, num_hidden_layers=24, expand_ratio=128, vocab_size=VOCAB)
    model = FlaHGRN2(config).cuda().to(torch.bfloat16).eval()

    def generate(prompt, n):
        mask = torch.ones_like(prompt)
        return model.generate(
            prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True
        )

    def prefill(prompt):
        with torch.no_grad():
            return model(input_ids=prompt, use_cache=True).logits[:, -1]

    return model, generate, prefill


RUNNERS = {"hgrn2": hgrn2_runner, "fla": fla_runner}


def measure(name: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    try:
        model, generate, prefill = RUNNERS[name]()
    except ImportError as error:
        return {"model": name, "batch": batch, "skipped": f"{type(error).__name__}: {error}"}
    prompt = torch.randint(
        0, VOCAB, (batch, prompt_len), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    first_call, _ = timed(lambda: generate(prompt, 8))
    total, out = timed(lambda: generate(prompt, new_tokens))
    prefill_s, _ = timed(lambda: prefill(prompt), repeats=3)
    generated = out.shape[1] - prompt_len
    steps = max(generated - 1, 1)
    result = {
        "model": name,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": generated,
        "total_s": total,
        "tokens_per_s": batch * generated / total,
        "prefill_s": prefill_s,
        "per_token_ms": (total - prefill_s) / steps * 1e3,
        "decode_tokens_per_s": batch * steps / (total - prefill_s),
        "first_call_8_tokens_s": first_call,
    }
    if name == "hgrn2":
        check = min(64, new_tokens)
        eager = generate(prompt, check, use_cuda_graph=False)
        result["graph_equals_eager_first_tokens"] = bool(torch.equal(eager, out[:, : prompt_len + check]))
    del model
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="hgrn2,fla")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name in args.models.split(","):
            result = measure(name, batch, args.prompt_len, args.new_tokens)
            results.append(result)
            print(json.dumps(result), flush=True)
            path = write_results(args.out, results)  # after every run, so that a cut-off run keeps what it measured
    print_table(results)
    print(f"wrote {path}")


def print_table(results):
    print(f"\n{'model':>6} {'B':>3} {'tokens/s':>10} {'ms/token':>9} {'prefill ms':>11} {'total s':>8} {'vs fla':>7}")
    for r in results:
        if "skipped" in r:
            print(f"{r['model']:>6} {r['batch']:>3} skipped: {r['skipped']}")
            continue
        fla = next((f for f in results if f["model"] == "fla" and f["batch"] == r["batch"] and "total_s" in f), None)
        ratio = r["tokens_per_s"] / fla["tokens_per_s"] if fla else float("nan")
        print(
            f"{r['model']:>6} {r['batch']:>3} {r['tokens_per_s']:>10.1f} {r['per_token_ms']:>9.2f} "
            f"{r['prefill_s'] * 1e3:>11.1f} {r['total_s']:>8.2f} {ratio:>7.2f}"
        )


def write_results(out: Path, results) -> Path:
    path = out / f"{gpu_name()}-decode.json"
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    meta["triton_cache_at_start"] = TRITON_CACHE_AT_START
    write_json_atomically(path, {"meta": meta, "results": results})
    return path


if __name__ == "__main__":
    main()

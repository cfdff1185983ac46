"""Training steps of the small-state models with their blocks through ``torch.compile`` against the same steps
uncompiled, from one initialisation and one batch: the loss of every step, the largest gradient difference after
the first, where a non-finite value first appears, and the graphs and graph breaks TorchDynamo makes of the first
block.

Models: ``listops`` and ``pathfinder`` (the LightningModules of ``configs/lra/<name>.yaml``, as
``benchmarks/small_state_throughput.py`` builds them) and ``vision`` (``hgrn2_vit_tiny_patch16_224``). Each runs
eagerly, then with every block compiled by each ``--backends`` entry (``inductor``; ``aot_eager`` traces the same
graph without Inductor's code generation, which tells a tracing problem from a code-generation one). bf16 autocast,
AdamW; a forward hook on every block records the first block whose output is not finite.

    PYTHONPATH=$PWD:benchmarks python experiments/compile_parity.py --models vision listops --out parity.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import timm  # noqa: E402
from small_state_throughput import (  # noqa: E402
    LRA_CONFIGS,
    build_lra_module,
    load_lra_config,
    lra_input_shape,
    random_lra_batch,
)

import hgrn2.models  # noqa: E402,F401  (registers the timm models)


def build(name: str, batch_size: int, device: torch.device, seq_len: int | None = None):
    """``(backbone with .blocks, loss function of the backbone, batch)`` for one model."""
    torch.manual_seed(0)
    if name == "vision":
        model = timm.create_model("hgrn2_vit_tiny_patch16_224", num_classes=1000).to(device).train()
        images = torch.randn(batch_size, 3, 224, 224, device=device)
        labels = torch.randint(0, 1000, (batch_size,), device=device)
        return model, lambda m: F.cross_entropy(m(images).float(), labels)
    model_section, data_section = load_lra_config(LRA_CONFIGS[name])
    module = build_lra_module(model_section, {}).to(device).train()
    config = module.config
    length, _, _ = lra_input_shape(config, data_section["init_args"], seq_len)
    batch = random_lra_batch(config, batch_size, length, device)
    labels = batch.pop("labels")
    return module.model, lambda m: F.cross_entropy(m(**batch).float(), labels)


def block_graphs(model, loss_fn, dtype) -> dict:
    """What TorchDynamo makes of the first block: its graphs, graph breaks and their reasons, traced on the inputs
    the block gets in one forward pass of the model (each break is a return to Python, and more launches)."""
    model = copy.deepcopy(model)
    captured = {}

    def keep(_module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = model.blocks[0].register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad(), torch.autocast(next(model.parameters()).device.type, dtype=dtype):
        loss_fn(model)
        handle.remove()
        args, kwargs = captured["call"]
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.blocks[0])(*args, **kwargs)
    return {
        "graphs": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
        "reasons": [str(reason.reason)[:300] for reason in explanation.break_reasons[:5]],
    }


def run(model, loss_fn, steps: int, backend: str | None, dtype) -> dict:
    """``steps`` AdamW steps; losses, the gradients after the first, the first non-finite block output."""
    model = copy.deepcopy(model)
    if backend is not None:
        for block in model.blocks:
            block.compile(backend=backend)
    first_bad: list[str] = []

    def hook(name):
        def check(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if not first_bad and torch.is_tensor(out) and not torch.isfinite(out).all():
                first_bad.append(name)

        return check

    handles = [block.register_forward_hook(hook(f"blocks.{i}")) for i, block in enumerate(model.blocks)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses, grads = [], None
    for step in range(steps):
        with torch.autocast(next(model.parameters()).device.type, dtype=dtype):
            loss = loss_fn(model)
        loss.backward()
        if step == 0:
            grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for handle in handles:
        handle.remove()
    return {"losses": losses, "first_non_finite_block": first_bad[0] if first_bad else None, "grads": grads}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vision", "listops", "pathfinder"])
    parser.add_argument("--backends", nargs="+", default=["inductor", "aot_eager"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=None, help="ListOps length (default: the config's, 2000)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "models": {}}
    for name in args.models:
        model, loss_fn = build(name, args.batch_size, device, args.seq_len)
        eager = run(model, loss_fn, args.steps, None, torch.bfloat16)
        rows = {"eager": {k: v for k, v in eager.items() if k != "grads"}}
        try:
            rows["first_block_graphs"] = block_graphs(model, loss_fn, torch.bfloat16)
        except Exception as error:  # noqa: BLE001  (recorded, the comparison still runs)
            rows["first_block_graphs"] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        for backend in args.backends:
            try:
                result = run(model, loss_fn, args.steps, backend, torch.bfloat16)
            except Exception as error:  # noqa: BLE001  (recorded, the next backend still runs)
                rows[backend] = {"error": f"{type(error).__name__}: {error}"[:2000]}
                continue
            worst = max(
                (((result["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item(), n)
                for n, g in eager["grads"].items()
            )
            rows[backend] = {k: v for k, v in result.items() if k != "grads"}
            rows[backend]["worst_relative_grad_difference"] = {"value": worst[0], "param": worst[1]}
        report["models"][name] = rows
        print(name, json.dumps(rows, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()

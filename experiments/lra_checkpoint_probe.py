"""What an LRA classifier checkpoint computes: does its prediction depend on the input, and how large are its
blocks' outputs? Runs the checkpoint forward on the CPU on the first test images of a Pathfinder folder.

    PYTHONPATH=$PWD python experiments/lra_checkpoint_probe.py runs/lra_learning/ckpt/pathfinder-c6.ckpt \
        --data-dir runs/lra_learning/pathfinder-c6-100000-s0/pathfinder32 --difficulty curv_baseline

Prints, in training mode (batch statistics) and in evaluation mode (running statistics): the mean and the spread
across images of the logit difference (class 1 minus class 0) and its correlation with the labels; in training
mode, each block's mixer and GLU output standard deviation and largest magnitude; and the layers' mean lower
bounds. Returns the same as a dict.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from datamodules.lra.pathfinder import DIFFICULTY, PathfinderDataModule
from lightning_modules.sequence_classifier import SequenceClassifier


def load_classifier(checkpoint: Path) -> tuple[SequenceClassifier, int]:
    """The checkpoint's SequenceClassifier on the PyTorch path (any machine), and its training step."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    hparams = state["hyper_parameters"]
    overrides = {**(hparams.get("overrides") or {}), "backend": "naive"}
    module = SequenceClassifier(hparams["preset"], overrides=overrides)
    module.load_state_dict(state["state_dict"])
    return module, int(state.get("global_step", -1))


def probe(module: SequenceClassifier, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    model = module.model
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            outputs[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.mixer.register_forward_hook(keep(f"mixer{i}")))
        handles.append(block.glu.register_forward_hook(keep(f"glu{i}")))
    result = {}
    try:
        for mode in ("eval", "train"):  # eval first: a training-mode pass updates BatchNorm's running statistics
            model.train(mode == "train")
            with torch.no_grad():
                logits = model(pixels).double()
            diff = (logits[:, 1] - logits[:, 0]).numpy()
            corr = float(np.corrcoef(diff, labels.numpy())[0, 1]) if diff.std() > 0 else float("nan")
            result[mode] = {"logit_diff_mean": float(diff.mean()), "logit_diff_std": float(diff.std()), "corr": corr}
            if mode == "train":
                result["blocks"] = {
                    name: {"std": float(out.float().std()), "max": float(out.float().abs().max())}
                    for name, out in outputs.items()
                }
    finally:
        for handle in handles:
            handle.remove()
    if model.lower_bounds is not None:
        result["lower_bounds"] = [round(v, 3) for v in model.lower_bounds().detach().mean(1).tolist()]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True, help="the pathfinder32 folder")
    parser.add_argument("--difficulty", default=DIFFICULTY)
    parser.add_argument("--images", type=int, default=48, help="first test images to run")
    args = parser.parse_args(argv)
    module, step = load_classifier(args.checkpoint)
    data = PathfinderDataModule(str(args.data_dir), difficulty=args.difficulty)
    data.setup("fit")
    test = data.splits["test"]
    count = min(args.images, len(test))
    pixels = torch.from_numpy(np.stack([test[i][0] for i in range(count)]))
    labels = torch.tensor([test[i][1] for i in range(count)])
    result = {"checkpoint": str(args.checkpoint), "step": step, "images": count, **probe(module, pixels, labels)}
    for mode in ("train", "eval"):
        r = result[mode]
        print(
            f"{mode}: logit difference {r['logit_diff_mean']:.4g} ± {r['logit_diff_std']:.4g} across {count} images, "
            f"correlation with the labels {r['corr']:.3f}"
        )
    for name, stats in result["blocks"].items():
        print(f"  {name}: std {stats['std']:.3g}, max |x| {stats['max']:.3g}")
    if "lower_bounds" in result:
        print(f"mean lower bound per layer: {result['lower_bounds']} (step {step})")
    return result


if __name__ == "__main__":
    main()

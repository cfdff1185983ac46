"""Pathfinder-32 ablations: which part of the LRA encoder decides whether it leaves chance?

    PYTHONPATH=$PWD python experiments/pathfinder_ablation.py \
        --data-dir runs/lra_learning/pathfinder-c6-100000-s0/pathfinder32 --difficulty curv_baseline \
        --variants 'paper:{}' 'conv:{"mixer": "dilated_conv"}' \
                   'conv-relu:{"mixer": "dilated_conv", "pre_pool": "relu"}' \
        --steps 3000 --out experiments/results/pathfinder-ablation.json

Each variant is the Pathfinder encoder of :func:`hgrn2.models.lra.lra_config` (``"pathfinder"``) with a JSON
object of changes: any :class:`~hgrn2.models.lra.LRAConfig` field, plus the ablation keys of
:data:`ABLATION_KEYS`:

* ``mixer``: ``"hgrn2"`` (the config's mixer) or ``"dilated_conv"`` (a depthwise 3×3 convolution with dilation
  1, 2, 4, 8, 16, 1, ... over the layers, GELU, then a pointwise projection): the same blocks, norms, GLU and
  head around a mixer that a plain CNN is known to learn these images with;
* ``stem``: ``"embedding"`` (the config's per-pixel embedding) or ``"conv3"`` (a 3×3 convolution of the pixels);
* ``pre_pool``: ``"none"``, ``"relu"`` or ``"gelu"``: an activation on the final features before pooling;
* ``pool``: ``"mean"`` or ``"max"`` over the positions;
* ``short_conv``: 0 (none) or an odd kernel size k: a depthwise k×k convolution and SiLU on the mixer's input
  (inside the residual branch), so that the mixer reads local shape as well as its scans; ``short_conv_dilated``
  (true/false) dilates it as ``mixer: "dilated_conv"`` does. These set the config's ``grid_conv`` and
  ``grid_conv_dilations``, which may also be given directly;
* ``lr``, ``batch_size``: the optimiser's peak learning rate and the batch.

``"cnn"`` as ``mixer`` trains the plain six-layer CNN instead (3×3 stem, per layer a depthwise dilated 3×3
convolution, a pointwise one, BatchNorm and ReLU, no residual; mean pooling), the control.

The variants train side by side, one process each, on the same images (the datamodule's seeded 80/10/10 split,
loaded once and shared through a cached tensor file), with AdamW (no weight decay), linear warm-up over
``--warmup`` steps then a constant rate, gradient clipping at 1, bf16 autocast on a GPU. The validation accuracy
on ``--val-images`` images is measured every ``--eval-every`` steps, the test accuracy at the end; the report
is rewritten after every measurement, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from pathfinder_cnn_control import load_split, scale  # noqa: E402

from datamodules.atomic import write_atomically, write_json_atomically  # noqa: E402
from datamodules.lra.pathfinder import DIFFICULTY, PathfinderDataModule  # noqa: E402
from hgrn2.models.lra import LRAClassifier, lra_config  # noqa: E402

ABLATION_KEYS = {
    "mixer": ("hgrn2", "dilated_conv", "cnn"),
    "stem": ("embedding", "conv3"),
    "pre_pool": ("none", "relu", "gelu"),
    "pool": ("mean", "max"),
}
DILATIONS = (1, 2, 4, 8, 16, 1)


class DilatedConvMixer(nn.Module):
    """A token mixer for ``[B, h·w, D]`` grids: depthwise 3×3 convolution (dilated), GELU, pointwise projection."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.hidden_size = dim
        self.spatial = nn.Conv2d(dim, dim, 3, padding=dilation, dilation=dilation, groups=dim)
        self.pointwise = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, lower_bound=None, grid_size=None) -> tuple[torch.Tensor, None]:
        batch, length, dim = x.shape
        height, width = grid_size
        image = x.transpose(1, 2).reshape(batch, dim, height, width)
        y = self.spatial(image).reshape(batch, dim, length).transpose(1, 2)
        return self.pointwise(F.gelu(y)), None


class ControlCNN(nn.Module):
    """Six depthwise-separable dilated 3×3 convolutions with BatchNorm and ReLU, mean pooling, a linear head."""

    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.layers = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(width, width, 3, padding=d, dilation=d, groups=width),
                    nn.Conv2d(width, width, 1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                )
                for d in DILATIONS
            )
        )
        self.head = nn.Linear(width, 2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        side = int(round(pixels.shape[1] ** 0.5))
        return self.head(self.layers(self.stem(scale(pixels.reshape(-1, side, side)))).mean((2, 3)))


class AblatedEncoder(nn.Module):
    """The LRA encoder with the ablation keys applied; takes pixel levels ``[B, T]`` (uint8), returns logits."""

    def __init__(self, changes: dict):
        super().__init__()
        settings = {key: changes.get(key, choices[0]) for key, choices in ABLATION_KEYS.items()}
        for key, value in settings.items():
            if value not in ABLATION_KEYS[key]:
                raise ValueError(f"{key} must be one of {ABLATION_KEYS[key]}, got {value!r}")
        self.settings = settings
        script_keys = ("lr", "batch_size", "short_conv", "short_conv_dilated")
        fields = {k: v for k, v in changes.items() if k not in ABLATION_KEYS and k not in script_keys}
        if changes.get("short_conv"):
            fields["grid_conv"] = changes["short_conv"]
            if changes.get("short_conv_dilated"):
                fields["grid_conv_dilations"] = DILATIONS
        self.config = lra_config("pathfinder", **fields)
        self.net = LRAClassifier(self.config)
        width = self.config.hidden_size
        if settings["mixer"] == "dilated_conv":
            for i, block in enumerate(self.net.blocks):
                block.mixer = DilatedConvMixer(width, DILATIONS[i % len(DILATIONS)])
        self.stem = nn.Conv2d(1, width, 3, padding=1) if settings["stem"] == "conv3" else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        side = int(round(pixels.shape[1] ** 0.5))
        if self.stem is not None:
            x = self.stem(scale(pixels.reshape(-1, side, side))).flatten(2).transpose(1, 2)
        else:
            x = self.net.embed_inputs(pixels)
        x = self.net.hidden_states(x, grid_size=(side, side))
        if self.settings["pre_pool"] != "none":
            x = getattr(F, self.settings["pre_pool"])(x)
        return self.net.head(x.amax(1) if self.settings["pool"] == "max" else x.mean(1))


def build(changes: dict) -> nn.Module:
    if changes.get("mixer") == "cnn":
        return ControlCNN(changes.get("hidden_size", 32))
    return AblatedEncoder(changes)


def parse_variant(text: str) -> tuple[str, dict]:
    tag, sep, body = text.partition(":")
    if not sep or not tag:
        raise argparse.ArgumentTypeError(f"a variant is TAG:JSON, got {text!r}")
    try:
        changes = json.loads(body or "{}")
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"variant {tag!r}: its changes are not JSON ({error})") from None
    if not isinstance(changes, dict):
        raise argparse.ArgumentTypeError(f"variant {tag!r}: the changes must be a JSON object, got {body!r}")
    build(changes)  # fails here, before any training, on an unknown field or value
    return tag, changes


def accuracy(net: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    net.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(labels), 500):
            logits = net(pixels[i : i + 500].to(device))
            correct += int((logits.argmax(1).cpu() == labels[i : i + 500]).sum())
    net.train()
    return correct / len(labels)


def train_variant(tag: str, changes: dict, splits: Path, args, out: Path) -> dict:
    """Trains one variant; writes its report to ``out`` after every measurement and returns it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    data = torch.load(splits)
    train_x, train_y = data["train"]
    train_x = train_x.flatten(1).to(device)
    train_y = train_y.to(device)
    val_x, val_y = (t[: args.val_images] for t in data["val"])
    val_x = val_x.flatten(1)
    test_x, test_y = (t[: args.test_images or None] for t in data["test"])
    test_x = test_x.flatten(1)
    net = build(changes).to(device)
    lr, batch = changes.get("lr", args.lr), changes.get("batch_size", args.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    report = {
        "tag": tag,
        "changes": changes,
        "lr": lr,
        "batch_size": batch,
        "parameters": sum(p.numel() for p in net.parameters()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "curve": [],
    }
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start, loss_sum, losses_since = time.perf_counter(), torch.zeros((), device=device), 0
    deadline = start + 60 * args.minutes if args.minutes else float("inf")
    step = 0
    while step < args.steps and time.perf_counter() < deadline:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / args.warmup)
        index = torch.randint(0, len(train_y), (batch,), device=device, generator=generator)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(net(train_x[index]).float(), train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        loss_sum += loss.detach()
        losses_since += 1
        if step % args.eval_every == 0:
            point = {
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "train_loss": round(float(loss_sum) / losses_since, 4),
                "val_acc": round(100 * accuracy(net, val_x, val_y, device), 2),
            }
            loss_sum.zero_()
            losses_since = 0
            report["curve"].append(point)
            print(tag, " ".join(f"{k} {v}" for k, v in point.items()), flush=True)
            write_json_atomically(out, report)
    report["steps"] = step
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["test_acc"] = round(100 * accuracy(net, test_x, test_y, device), 2)
    print(tag, f"test_acc {report['test_acc']} after {step} steps, {report['seconds']} s", flush=True)
    write_json_atomically(out, report)
    return report


def cache_splits(args) -> Path:
    """Loads the datamodule's train/val/test images once into one tensor file beside the data."""
    path = args.data_dir / f"{args.difficulty}-splits-s{args.seed}.pt"
    if not path.exists():
        data = PathfinderDataModule(str(args.data_dir), difficulty=args.difficulty, seed=args.seed)
        data.setup("fit")
        data.setup("test")
        splits = {name: load_split(data.splits[name], args.workers) for name in ("train", "val", "test")}
        write_atomically(path, lambda file: torch.save(splits, file), binary=True)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the pathfinder32 folder")
    parser.add_argument("--difficulty", default=DIFFICULTY, help="curv_contour_length_14, or curv_baseline, ...")
    parser.add_argument("--variants", type=parse_variant, nargs="+", required=True, help="TAG:JSON each")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=0.0, help="stop each variant after this long (0: no limit)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per variant")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-loading processes")
    parser.add_argument("--out", type=Path, required=True, help="the report (JSON)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: train this one variant
    args = parser.parse_args(argv)
    if min(args.steps, args.eval_every, args.batch_size, args.warmup, args.threads) < 1 or args.lr <= 0:
        parser.error("--steps, --eval-every, --batch-size, --warmup, --threads and --lr must be positive")
    tags = [tag for tag, _ in args.variants]
    if len(set(tags)) != len(tags):
        parser.error(f"variant tags must differ: {tags}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.out.with_suffix("")
    if args.only is not None:
        changes = dict(args.variants)[args.only]
        return train_variant(args.only, changes, cache_splits(args), args, parts / f"{args.only}.json")
    start = time.perf_counter()
    splits = cache_splits(args)
    print(f"splits ready in {time.perf_counter() - start:.0f} s: {splits}", flush=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    children = [subprocess.Popen([sys.executable, __file__, *argv, "--only", tag]) for tag, _ in args.variants]
    codes = [child.wait() for child in children]
    report = {
        "difficulty": args.difficulty,
        "data_dir": str(args.data_dir),
        "settings": {k: v for k, v in vars(args).items() if k not in ("variants", "data_dir", "out", "only")},
        "runs": [],
    }
    for (tag, changes), code in zip(args.variants, codes):
        part = parts / f"{tag}.json"
        run = json.loads(part.read_text()) if part.exists() else {"tag": tag, "changes": changes}
        run["exit_code"] = code
        report["runs"].append(run)
    write_json_atomically(args.out, report)
    return report


if __name__ == "__main__":
    main()

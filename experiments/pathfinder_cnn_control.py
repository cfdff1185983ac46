"""A control for the Pathfinder data: can a small convolutional network learn them? Runs on the CPU.

    PYTHONPATH=$PWD python experiments/pathfinder_cnn_control.py \
        --data-dir runs/lra_learning/pathfinder-c6-100000-s0/pathfinder32 --difficulty curv_baseline \
        --steps 6000 --out experiments/results/pathfinder-cnn-control.json

The images and the train/test split are the Pathfinder datamodule's (the same seeded 80/10/10 split the HGRN2
runs of ``lra_learning.py`` use). The network is six 3×3 convolutions (24, 24, 48, 48, 48, 48 channels, each
with BatchNorm and ReLU; max pooling after every second one) and a two-layer head on the 4×4 map, 177,146
parameters; AdamW (weight decay 0.01) at a constant learning rate, batch 128, float32. It is *not* translation
invariant at its head, unlike the mean-pooled LRA encoders. The test accuracy is measured every
``--eval-every`` steps and written, with the loss curve, to ``--out`` after each measurement (an interrupted run
keeps what it measured).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from datamodules.atomic import write_json_atomically
from datamodules.lra.pathfinder import DIFFICULTY, PathfinderDataModule


def control_network(width: int = 24, side: int = 32) -> nn.Sequential:
    """Six 3×3 convolutions with BatchNorm and ReLU, max pooling after every pair, then a two-layer head."""

    def conv(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    layers = [*conv(1, width), *conv(width, width), nn.MaxPool2d(2)]
    layers += [*conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2)]
    layers += [*conv(2 * width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2)]
    cells = (side // 8) ** 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(2 * width * cells, 128), nn.ReLU(), nn.Linear(128, 2))


def load_split(dataset, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as ``uint8 [N, side, side]`` and their labels."""
    loader = DataLoader(dataset, batch_size=1000, num_workers=workers, collate_fn=lambda b: b)
    pixels, labels = [], []
    for batch in loader:
        pixels.extend(p for p, _ in batch)
        labels.extend(label for _, label in batch)
    side = int(round(len(pixels[0]) ** 0.5))
    return torch.from_numpy(np.stack(pixels)).reshape(-1, side, side), torch.tensor(labels)


def scale(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 127.5 - 1.0).unsqueeze(1)  # levels 0..255 -> [-1, 1], one channel


def accuracy(net: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        correct = sum(
            int((net(scale(pixels[i : i + 1000])).argmax(1) == labels[i : i + 1000]).sum())
            for i in range(0, len(labels), 1000)
        )
    net.train()
    return correct / len(labels)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the pathfinder32 folder")
    parser.add_argument("--difficulty", default=DIFFICULTY, help="curv_contour_length_14, or curv_baseline, ...")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-loading processes")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the curve and the settings")
    args = parser.parse_args(argv)
    if min(args.steps, args.eval_every, args.batch_size) < 1 or args.lr <= 0:
        parser.error("--steps, --eval-every, --batch-size and --lr must be positive")
    torch.manual_seed(args.seed)
    data = PathfinderDataModule(str(args.data_dir), difficulty=args.difficulty, seed=args.seed)
    data.setup("fit")
    start = time.perf_counter()
    train_x, train_y = load_split(data.splits["train"], args.workers)
    test_x, test_y = load_split(data.splits["test"], args.workers)
    print(f"loaded {len(train_y)} training and {len(test_y)} test images in {time.perf_counter() - start:.0f} s")
    net = control_network(side=train_x.shape[-1])
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    report = {
        "data_dir": str(args.data_dir),
        "difficulty": args.difficulty,
        "split_sizes": {"train": len(train_y), "test": len(test_y)},
        "test_majority_class_acc": round(100 * max(float(test_y.float().mean()), 1 - float(test_y.float().mean())), 2),
        "parameters": sum(p.numel() for p in net.parameters()),
        "settings": {k: v for k, v in vars(args).items() if k not in ("data_dir", "out", "workers")},
        "torch_threads": torch.get_num_threads(),
        "curve": [],
    }
    generator = torch.Generator().manual_seed(args.seed)
    order, cursor, loss_sum, start = torch.randperm(len(train_y), generator=generator), 0, 0.0, time.perf_counter()
    for step in range(1, args.steps + 1):
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(train_y), generator=generator), 0
        index = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        loss = nn.functional.cross_entropy(net(scale(train_x[index])), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach())
        if step % args.eval_every == 0 or step == args.steps:
            since = step - (report["curve"][-1]["step"] if report["curve"] else 0)
            point = {
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "train_loss": round(loss_sum / since, 4),
                "test_acc": round(100 * accuracy(net, test_x, test_y), 2),
            }
            report["curve"].append(point)
            loss_sum = 0.0
            print(" ".join(f"{k} {v}" for k, v in point.items()), flush=True)
            if args.out is not None:
                write_json_atomically(args.out, report)
    return report


if __name__ == "__main__":
    main()

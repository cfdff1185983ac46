"""Toy data in the IMDB (``aclImdb``), AAN (``tsv_data``) and CIFAR-10 (``cifar-10-batches-py``) layouts.

For smoke tests and the ``configs/lra/*_tiny.yaml`` runs only: these are *not* the benchmarks (those
need the real downloads). Each class carries a planted signal that a small model picks up in a few
hundred steps, so a run that learns nothing is a bug:

* text: random lowercase words, plus ``great``/``awful`` words for positive/negative reviews;
* retrieval: two random documents that share a random 12-letter "topic" word when they are linked;
* image: noise around a class-specific brightness ramp.

``python -m datamodules.lra.synthetic --task text --out data/lra/toy_imdb`` writes one of them.
"""

from __future__ import annotations

import argparse
import pickle
import string
from pathlib import Path

import numpy as np

from datamodules.atomic import write_atomically

TASKS = ("text", "retrieval", "image")


def _write(path: Path, data: bytes) -> None:
    write_atomically(path, lambda file: file.write(data), binary=True)


def _words(rng: np.random.Generator, count: int) -> list[str]:
    letters = np.array(list(string.ascii_lowercase))
    return ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(count)]


def write_toy_imdb(root: str | Path, per_class: int = 100, words: int = 60, seed: int = 0) -> Path:
    """``root/{train,test}/{pos,neg}/<i>_<rating>.txt``; returns ``root``."""
    rng, root = np.random.default_rng(seed), Path(root)
    for split in ("train", "test"):
        for name, cue, rating in (("neg", "awful", 2), ("pos", "great", 9)):
            for i in range(per_class):
                text = _words(rng, words)
                for position in rng.integers(0, len(text), size=3):
                    text.insert(int(position), cue)
                _write(root / split / name / f"{i}_{rating}.txt", (" ".join(text) + " <br /><br />").encode())
    return root


def write_toy_aan(root: str | Path, pairs: int = 200, words: int = 50, seed: int = 0) -> Path:
    """``root/new_aan_pairs.{train,eval,test}.tsv`` with linked (1.0) and unlinked (0.0) pairs."""
    rng, root = np.random.default_rng(seed), Path(root)
    for split, count in (("train", pairs), ("eval", max(pairs // 4, 2)), ("test", max(pairs // 4, 2))):
        lines = []
        for i in range(count):
            label = i % 2
            topic = lambda: "".join(rng.choice(list(string.ascii_lowercase), size=12))  # noqa: E731
            topics = [topic()] * 2 if label else [topic(), topic()]
            docs = []
            for topic in topics:
                text = _words(rng, words)
                text.insert(int(rng.integers(0, len(text))), topic)
                docs.append(" ".join(text))
            lines.append(f"{label:.1f}\tdoc{2 * i}\tdoc{2 * i + 1}\t{docs[0]}\t{docs[1]}\n")
        _write(root / f"new_aan_pairs.{split}.tsv", "".join(lines).encode())
    return root


def write_toy_cifar10(root: str | Path, per_batch: int = 100, seed: int = 0) -> Path:
    """``root/data_batch_{1..5}`` and ``root/test_batch`` (pickled dicts of uint8 ``[N, 3072]``)."""
    rng, root = np.random.default_rng(seed), Path(root)
    ramp = np.linspace(0.0, 1.0, 32)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, size=per_batch)
        base = 40 + 18 * labels[:, None, None] * (ramp[None, :, None] + ramp[None, None, :]) / 2  # [N, 32, 32]
        planes = base[:, None] + rng.normal(0, 12, size=(per_batch, 3, 32, 32))
        data = np.clip(planes, 0, 255).astype(np.uint8).reshape(per_batch, 3072)
        batch = {b"data": data, b"labels": labels.tolist(), b"batch_label": name.encode()}
        _write(root / name, pickle.dumps(batch))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=None, help="examples per class / pairs / images per batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    writer = {"text": write_toy_imdb, "retrieval": write_toy_aan, "image": write_toy_cifar10}[args.task]
    kwargs = {} if args.size is None else {("per_class", "pairs", "per_batch")[TASKS.index(args.task)]: args.size}
    writer(args.out, seed=args.seed, **kwargs)


if __name__ == "__main__":
    main()

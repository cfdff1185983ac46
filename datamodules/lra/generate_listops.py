"""Generate ListOps in the Long Range Arena layout: ``basic_{train,val,test}.tsv`` with ``Source``/``Target``.

The algorithm is the LRA benchmark's own (Tay et al. 2021, ``lra_benchmarks/data/listops.py``):

* a node at depth ``< max_depth`` is an operator with probability 0.25, else a digit 0-9; at ``max_depth``
  it is always a digit. An operator (MIN, MAX, MED, SUM_MOD) takes 2..``max_args`` arguments, each a node
  one level deeper; the root is at depth 1.
* a tree's length counts its tokens: 1 per digit, 2 per operator (its ``[OP`` and its ``]``);
  trees with ``min_length < length < max_length`` are kept, duplicates dropped.
* the label evaluates the tree: MIN, MAX, MED (``int`` of the median, so the lower middle value is
  truncated toward zero for an even count), SUM_MOD (sum mod 10).
* the source string is the official fully parenthesised left-nested form, e.g. ``[MAX 2 9 ]`` is written
  ``( ( ( [MAX 2 ) 9 ) ] )``.

Run ``python -m datamodules.lra.generate_listops --out DIR --train 96000 --val 2000 --test 2000`` for the
official sizes (the defaults), or smaller numbers and ``--min-length``/``--max-length`` for quick data.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from datamodules.atomic import write_atomically
from datamodules.lra.common import map_jobs

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
OPERATOR_PROBABILITY = 0.25
SPLITS = ("train", "val", "test")

# A tree is a digit (int) or a pair (operator token, list of argument trees).
Tree = int | tuple[str, list]


@dataclass(frozen=True)
class ListOpsSpec:
    """Tree and length limits; the defaults are the LRA release's."""

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000

    def validate(self) -> None:
        if self.max_depth < 2:
            raise ValueError(f"max_depth must be >= 2 (depth 1 is the root), got {self.max_depth}")
        if self.max_args < 2:
            raise ValueError(f"max_args must be >= 2 (an operator takes at least two arguments), got {self.max_args}")
        if not 0 <= self.min_length < self.max_length - 1:
            raise ValueError(
                f"need 0 <= min_length < max_length - 1 (lengths strictly between them are kept), "
                f"got min_length={self.min_length}, max_length={self.max_length}"
            )


def random_tree(rng: random.Random, depth: int, spec: ListOpsSpec) -> tuple[Tree, int]:
    """A random tree rooted at ``depth`` and its length in tokens."""
    if depth >= spec.max_depth or rng.random() > OPERATOR_PROBABILITY:
        return rng.randrange(10), 1
    num_args = rng.randint(2, spec.max_args)
    args, length = [], 2
    for _ in range(num_args):
        child, child_length = random_tree(rng, depth + 1, spec)
        args.append(child)
        length += child_length
    return (rng.choice(OPERATORS), args), length


def to_source(tree: Tree) -> str:
    """The official string form: every application of the operator to the next argument is a ``( .. )``."""
    if isinstance(tree, int):
        return str(tree)
    operator, args = tree
    text = operator
    for arg in args:
        text = f"( {text} {to_source(arg)} )"
    return f"( {text} {END} )"


def evaluate(tree: Tree) -> int:
    """The value of a tree, a digit 0-9."""
    if isinstance(tree, int):
        return tree
    operator, args = tree
    values = [evaluate(arg) for arg in args]
    if operator == "[MIN":
        return min(values)
    if operator == "[MAX":
        return max(values)
    if operator == "[MED":
        return int(statistics.median(values))
    if operator == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {operator!r}; expected one of {OPERATORS}")


def sample_examples(spec: ListOpsSpec, count: int, seed: int) -> list[tuple[str, int]]:
    """``count`` distinct ``(source, target)`` pairs whose lengths lie strictly inside the spec's bounds."""
    spec.validate()
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    while len(seen) < count:
        tree, length = random_tree(rng, 1, spec)
        if spec.min_length < length < spec.max_length:
            source = to_source(tree)
            if source not in seen:
                seen[source] = evaluate(tree)
    return list(seen.items())


CHUNK_EXAMPLES = 1000  # examples per generation job; a process per 1,000 examples pays for its start-up


def _sample_chunk(job: tuple[ListOpsSpec, int, int]) -> list[tuple[str, int]]:
    spec, count, seed = job
    return sample_examples(spec, count, seed)


def generate(
    spec: ListOpsSpec, sizes: dict[str, int], seed: int = 0, workers: int = 1
) -> dict[str, list[tuple[str, int]]]:
    """Distinct examples for each split (no source appears twice, across splits either)."""
    for split, size in sizes.items():
        if size < 1:
            raise ValueError(f"the {split} split needs at least one example, got {size}")
    total = sum(sizes.values())
    examples: dict[str, int] = {}
    round_index = 0
    while len(examples) < total:
        missing = total - len(examples)
        # Jobs of a fixed size, each seeded by its index: the data depend on the seed, never on ``workers``.
        chunks = -(-missing // CHUNK_EXAMPLES)
        sizes_left = [min(CHUNK_EXAMPLES, missing - i * CHUNK_EXAMPLES) for i in range(chunks)]
        jobs = [(spec, size, seed * 1_000_003 + round_index * 1009 + i) for i, size in enumerate(sizes_left)]
        results = map_jobs(_sample_chunk, jobs, workers, "ListOps expressions", sizes_left, unit=" expressions")
        for chunk in results:
            for source, target in chunk:
                examples.setdefault(source, target)
        round_index += 1
    items = list(examples.items())[:total]
    random.Random(seed).shuffle(items)
    out, start = {}, 0
    for split, size in sizes.items():
        out[split] = items[start : start + size]
        start += size
    return out


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    """Write ``Source\\tTarget`` rows with a header, atomically (temp file, then rename)."""

    def write(file) -> None:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(["Source", "Target"])
        writer.writerows(rows)

    write_atomically(path, write, newline="")


def write_listops(
    out_dir: str | Path,
    train: int = 96_000,
    val: int = 2_000,
    test: int = 2_000,
    spec: ListOpsSpec | None = None,
    seed: int = 0,
    workers: int = 1,
    task: str = "basic",
) -> dict[str, Path]:
    """Generate the three splits and write ``{task}_{split}.tsv`` under ``out_dir``; returns the paths."""
    spec = spec or ListOpsSpec()
    data = generate(spec, {"train": train, "val": val, "test": test}, seed=seed, workers=workers)
    paths = {split: Path(out_dir) / f"{task}_{split}.tsv" for split in SPLITS}
    for split in SPLITS:
        write_tsv(paths[split], data[split])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (gets basic_{train,val,test}.tsv)")
    parser.add_argument("--train", type=int, default=96_000)
    parser.add_argument("--val", type=int, default=2_000)
    parser.add_argument("--test", type=int, default=2_000)
    parser.add_argument("--max-depth", type=int, default=10)
    parser.add_argument("--max-args", type=int, default=10)
    parser.add_argument("--min-length", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes that sample trees in parallel")
    parser.add_argument("--task", default="basic", help="file prefix, as in the release (basic_train.tsv)")
    args = parser.parse_args(argv)
    spec = ListOpsSpec(args.max_depth, args.max_args, args.min_length, args.max_length)
    spec.validate()
    paths = write_listops(args.out, args.train, args.val, args.test, spec, args.seed, args.workers, args.task)
    for split, path in paths.items():
        print(f"{split}: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

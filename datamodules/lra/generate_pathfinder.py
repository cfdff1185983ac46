"""Generate Pathfinder / Path-X images in the LRA release layout.

``python -m datamodules.lra.generate_pathfinder --out ROOT --resolution 32 --images 20000`` writes::

    ROOT/pathfinder32/curv_contour_length_14/
        imgs/<batch>/sample_<i>.png          grayscale, resolution × resolution
        metadata/<batch>.npy                 text, one line per image (the release's format, despite the name):
                                             "imgs/<batch> sample_<i>.png <i> <label> <continuity> <contour_length>
                                              <distractor_length> <paddle_length> <paddle_thickness> <margin>
                                              <number of paddle contrasts>"

with ``--images-per-batch`` images per batch (1,000 in the release). Point the Pathfinder datamodule's
``data_dir`` at ``ROOT/pathfinder32`` (``ROOT/pathfinder128`` for Path-X). The drawing algorithm and the
settings of each resolution are in :mod:`datamodules.lra.pathfinder_snakes`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.lra.pathfinder_snakes import PRESETS, PathfinderParams, PathfinderSample, make_sample

DIFFICULTY = "curv_contour_length_14"


def metadata_line(batch: int, index: int, sample: PathfinderSample, params: PathfinderParams) -> str:
    """One metadata record; fields 0, 1 and 3 (directory, file, label) are what loaders read."""
    fields = [
        f"imgs/{batch}",
        f"sample_{index}.png",
        index,
        sample.label,
        params.continuity,
        params.contour_length,
        params.distractor_length,
        params.paddle_length,
        params.paddle_thickness,
        sample.margin,
        len(params.paddle_contrasts),
    ]
    return " ".join(str(field) for field in fields)


def _atomic_write(path: Path, write) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_batch(root: Path, batch: int, count: int, params: PathfinderParams, seed: int) -> list[int]:
    """Draw ``count`` images into ``root/imgs/<batch>`` and their metadata into ``root/metadata/<batch>.npy``.

    The metadata file is written last, so a batch with metadata is complete. Returns the labels."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, batch]))
    image_dir = root / "imgs" / str(batch)
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    lines, labels = [], []
    for index in range(count):
        sample = make_sample(params, rng)
        png = Image.fromarray(sample.image)
        _atomic_write(image_dir / f"sample_{index}.png", lambda tmp, png=png: png.save(tmp, format="PNG"))
        lines.append(metadata_line(batch, index, sample, params))
        labels.append(sample.label)
    text = "".join(line + "\n" for line in lines)
    _atomic_write(root / "metadata" / f"{batch}.npy", lambda tmp: Path(tmp).write_text(text))
    return labels


def _write_batch_job(job) -> list[int]:
    return write_batch(*job)


def write_pathfinder(
    out_root: str | Path,
    resolution: int = 32,
    images: int = 200_000,
    images_per_batch: int = 1000,
    seed: int = 0,
    workers: int = 1,
    params: PathfinderParams | None = None,
) -> Path:
    """Generate ``images`` images; returns the ``pathfinder<resolution>`` directory to load from.

    Batches are independent (each seeded by ``(seed, batch)``), so the result does not depend on
    ``workers``."""
    if params is None:
        if resolution not in PRESETS:
            raise ValueError(f"resolution must be one of {sorted(PRESETS)} (or pass params), got {resolution}")
        params = PRESETS[resolution]
    params.validate()
    if images < 1 or images_per_batch < 1:
        raise ValueError(f"images and images_per_batch must be >= 1, got {images} and {images_per_batch}")
    data_dir = Path(out_root) / f"pathfinder{params.window_size}"
    root = data_dir / DIFFICULTY
    counts = [min(images_per_batch, images - start) for start in range(0, images, images_per_batch)]
    jobs = [(root, batch, count, params, seed) for batch, count in enumerate(counts)]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            pool.map(_write_batch_job, jobs, chunksize=1)
    else:
        for job in jobs:
            _write_batch_job(job)
    return data_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="root directory; gets pathfinder<resolution>/...")
    parser.add_argument("--resolution", type=int, default=32, choices=sorted(PRESETS))
    parser.add_argument("--images", type=int, default=200_000, help="total number of images (the release has 200k)")
    parser.add_argument("--images-per-batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes drawing batches in parallel")
    args = parser.parse_args(argv)
    data_dir = write_pathfinder(args.out, args.resolution, args.images, args.images_per_batch, args.seed, args.workers)
    print(f"wrote {args.images} images to {data_dir / DIFFICULTY}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Generate Pathfinder / Path-X images in the LRA release layout.

``python -m datamodules.lra.generate_pathfinder --out ROOT --resolution 32 --images 20000`` writes::

    ROOT/pathfinder32/curv_contour_length_14/
        imgs/<batch>/sample_<i>.png          grayscale, resolution × resolution
        metadata/<batch>.npy                 text, one line per image (the release's format, despite the name):
                                             "imgs/<batch> sample_<i>.png <i> <label> <continuity> <contour_length>
                                              <distractor_length> <paddle_length> <paddle_thickness> <margin>
                                              <number of paddle contrasts>"

with ``--images-per-batch`` images per batch (1,000 in the release). ``--contour-length 6`` (or 9) draws the
release's easier difficulties into ``curv_baseline`` (``curv_contour_length_9``). Point the Pathfinder datamodule's
``data_dir`` at ``ROOT/pathfinder32`` (``ROOT/pathfinder128`` for Path-X).

A picture (:func:`make_sample`, after Linsley et al.'s ``snakes2.py``): two target snakes start
``seed_distance`` apart near the centre and grow ``contour_length`` dashes each, alternately; distractor snakes
of ``distractor_length`` dashes are then scattered wherever there is room; markers go on the start of one
target and on the end of either the same target (label 1, connected) or the other one (label 0); the image is
scaled so that its brightest pixel is 255. Dashes, the occupancy map and the settings of each resolution are in
:mod:`datamodules.lra.pathfinder_snakes`. One deliberate departure, on the side of correct labels: the last dash
of *both* target snakes enters the occupancy map before the distractors are drawn (the original adds only the
second snake's, so a distractor could touch the first snake's end marker).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.atomic import write_atomically
from datamodules.lra.common import map_jobs
from datamodules.lra.pathfinder_snakes import (
    FREE_LIMIT,
    MIN_AVAILABILITY,
    PRESETS,
    Canvas,
    PathfinderParams,
    Snake,
    difficulty_folder,
    with_contour_length,
)


@dataclass
class PathfinderSample:
    """One image and how it was made. ``paths`` holds every snake drawn (the two targets first) as the
    points its dashes run through, in order along the snake: ``[(y, x), ...]``."""

    image: np.ndarray  # [W, W] uint8
    label: int
    margin: int
    markers: tuple[tuple[int, int], tuple[int, int]]
    paths: list[list[tuple[float, float]]] = field(default_factory=list)


def _seed_pair(canvas: Canvas, contrasts: list[float]) -> list[Snake] | None:
    """The first dashes of the two target snakes, ``seed_distance`` apart, the first near the centre."""
    p, rng = canvas.p, canvas.rng
    band = 2 * p.seed_distance
    central = canvas.occupancy.copy()
    central[:band], central[-band:], central[:, :band], central[:, -band:] = 1, 1, 1, 1
    first = None
    for _ in range(p.max_paddle_retrial + 1):
        angle = canvas.random_angle()
        starts = canvas.free_starts(central, angle)
        if len(starts) == 0:
            return None
        start = tuple(int(v) for v in starts[rng.integers(len(starts))])
        first = canvas.seed_dash(start, angle, canvas.choose(p.paddle_contrasts) * contrasts[0])
        if first is not None:
            break
    if first is None:
        return None
    for _ in range(p.max_paddle_retrial + 1):
        angle, direction = canvas.random_angle(), float(rng.integers(0, 360)) * math.pi / 180
        dy, dx = p.seed_distance * math.sin(direction), p.seed_distance * math.cos(direction)
        second_start = (int(np.round(start[0] + dy)), int(np.round(start[1] + dx)))
        if canvas.in_image(second_start):
            second = canvas.seed_dash(second_start, angle, canvas.choose(p.paddle_contrasts) * contrasts[1])
            if second is not None:
                return [first, second]
    return None


def _target_pair(canvas: Canvas) -> list[Snake] | None:
    """Grow the two target snakes dash by dash, alternating; None when either gets stuck."""
    p = canvas.p
    contrasts = list(p.snake_contrasts) * 2
    canvas.rng.shuffle(contrasts)
    snakes = _seed_pair(canvas, contrasts[:2])
    if snakes is None:
        return None
    for _ in range(p.contour_length - 1):
        paddle_contrast = canvas.choose(p.paddle_contrasts)
        for snake, contrast in zip(snakes, contrasts):
            if not canvas.extend(snake, paddle_contrast * contrast):
                return None
    for snake in snakes:
        canvas.commit(snake.last_mask)
    return snakes


def _distractor(canvas: Canvas) -> Snake | None:
    """One short snake placed wherever there is room; the canvas is left untouched when it fails."""
    p, rng = canvas.p, canvas.rng
    saved = canvas.image.copy(), canvas.occupancy.copy()
    lined = canvas.occupancy.copy()
    lined[0], lined[-1], lined[:, 0], lined[:, -1] = 1, 1, 1, 1
    snake = None
    for _ in range(p.max_paddle_retrial + 1):
        if (canvas.occupancy <= FREE_LIMIT).mean() < MIN_AVAILABILITY:
            return None
        angle = canvas.random_angle()
        starts = canvas.free_starts(lined, angle)
        if len(starts) == 0:
            return None
        start = tuple(int(v) for v in starts[rng.integers(len(starts))])
        snake = canvas.seed_dash(start, angle, canvas.choose(p.snake_contrasts))
        if snake is not None:
            break
    if snake is None:
        return None
    for _ in range(int(p.distractor_length) - 1):
        if not canvas.extend(snake, canvas.choose(p.snake_contrasts)):
            canvas.image, canvas.occupancy = saved
            return None
    canvas.commit(snake.last_mask)
    return snake


def marker_disk(size: int, centre, radius: float, scale: int) -> np.ndarray:
    """A disk of ``radius`` pixels at ``centre``, drawn ``scale`` times larger and Lanczos-downsampled."""
    y, x = np.ogrid[-centre[0] * scale : (size - centre[0]) * scale, -centre[1] * scale : (size - centre[1]) * scale]
    big = ((x**2 + y**2 <= (radius * scale) ** 2) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(big, mode="L").resize((size, size), Image.LANCZOS)).astype(np.float64) / 255


def make_sample(params: PathfinderParams, rng: np.random.Generator) -> PathfinderSample:
    """Draw one Pathfinder image with a random label (1: the markers are the two ends of one snake)."""
    label = int(rng.integers(0, 2))
    margin = int(params.paddle_margins[int(rng.integers(len(params.paddle_margins)))])
    for _ in range(params.max_target_attempts):
        canvas = Canvas(params, margin, rng)
        targets = _target_pair(canvas)
        if targets is not None:
            break
    else:
        raise RuntimeError(f"could not place two target snakes in {params.max_target_attempts} attempts: {params}")
    distractors = []
    for _ in range(math.ceil(params.num_distractor_snakes)):
        for _ in range(params.max_distractor_retrial + 1):
            snake = _distractor(canvas)
            if snake is not None:
                distractors.append(snake)
                break
    origin = int(rng.integers(0, 2))
    terminal = origin if label == 1 else 1 - origin
    start = tuple(int(v) for v in targets[origin].path[0])
    end = targets[terminal].end
    size, scale = params.window_size, params.antialias_scale
    radius = params.marker_radius
    markers = np.maximum(marker_disk(size, start, radius, scale), marker_disk(size, end, radius, scale))
    image = np.maximum(canvas.image, markers)
    image = np.round(255 * image / image.max()).astype(np.uint8)
    paths = [snake.path for snake in targets + distractors]
    return PathfinderSample(image=image, label=label, margin=margin, markers=(start, end), paths=paths)


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
        write_atomically(image_dir / f"sample_{index}.png", lambda file, png=png: png.save(file, format="PNG"), True)
        lines.append(metadata_line(batch, index, sample, params))
        labels.append(sample.label)
    text = "".join(line + "\n" for line in lines)
    write_atomically(root / "metadata" / f"{batch}.npy", lambda file: file.write(text))
    return labels


def _complete(root: Path, batch: int, count: int) -> bool:
    """Whether batch ``batch`` was written whole before (its metadata, written last, lists ``count`` images)."""
    metadata = root / "metadata" / f"{batch}.npy"
    return metadata.exists() and len(metadata.read_text().splitlines()) == count


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
    contour_length: int | None = None,
) -> Path:
    """Generate ``images`` images; returns the ``pathfinder<resolution>`` directory to load from.

    They go in the folder of their difficulty (:func:`difficulty_folder`): ``curv_contour_length_14`` with the
    preset's settings, ``curv_baseline`` with ``contour_length=6`` (the release's easiest).

    Batches are independent (each seeded by ``(seed, batch)``), so the result does not depend on
    ``workers``. A batch whose metadata file already lists its images is complete and is not drawn again: an
    interrupted run picks up where it stopped, and a larger set of the same seed extends a smaller one."""
    if params is None:
        if resolution not in PRESETS:
            raise ValueError(f"resolution must be one of {sorted(PRESETS)} (or pass params), got {resolution}")
        params = PRESETS[resolution]
    if contour_length is not None:
        params = with_contour_length(params, contour_length)
    params.validate()
    if images < 1 or images_per_batch < 1:
        raise ValueError(f"images and images_per_batch must be >= 1, got {images} and {images_per_batch}")
    data_dir = Path(out_root) / f"pathfinder{params.window_size}"
    root = data_dir / difficulty_folder(params.contour_length)
    counts = [min(images_per_batch, images - start) for start in range(0, images, images_per_batch)]
    jobs = [
        (root, batch, count, params, seed) for batch, count in enumerate(counts) if not _complete(root, batch, count)
    ]
    sizes = [job[2] for job in jobs]  # images per batch
    map_jobs(_write_batch_job, jobs, workers, f"Pathfinder-{params.window_size} images", sizes, unit=" images")
    return data_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="root directory; gets pathfinder<resolution>/...")
    parser.add_argument("--resolution", type=int, default=32, choices=sorted(PRESETS))
    parser.add_argument("--images", type=int, default=200_000, help="total number of images (the release has 200k)")
    parser.add_argument("--images-per-batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes drawing batches in parallel")
    parser.add_argument(
        "--contour-length",
        type=int,
        default=14,
        help="dashes per target snake: 14 (LRA's task), or the release's easier 9 and 6 (curv_baseline)",
    )
    args = parser.parse_args(argv)
    data_dir = write_pathfinder(
        args.out,
        args.resolution,
        args.images,
        args.images_per_batch,
        args.seed,
        args.workers,
        contour_length=args.contour_length,
    )
    print(f"wrote {args.images} images to {data_dir / difficulty_folder(args.contour_length)}", file=sys.stderr)


if __name__ == "__main__":
    main()

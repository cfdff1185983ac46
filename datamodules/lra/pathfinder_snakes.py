"""Pathfinder drawing: dashes, the occupancy map, and snakes grown one dash at a time.

This is the algorithm of Linsley et al. ("Learning long-range spatial dependencies with horizontal
gated recurrent units", 2018; code ``drewlinsley/pathfinder``, ``snakes.py``/``snakes2.py``) that produced
the LRA Pathfinder and Path-X data, written with numpy and PIL only:

* every dash ("paddle") is a line of ``paddle_length`` pixels and ``paddle_thickness``, drawn at
  ``antialias_scale`` times the resolution and downsampled with a Lanczos filter; its *mask* is the line
  dilated by a disk of radius ``margin`` (per image, drawn from ``paddle_margins``). An occupancy map
  collects the masks of finished dashes so that new dashes keep their distance from old ones.
* the two target snakes start ``seed_distance`` apart near the centre; each grows ``contour_length``
  dashes one after another: the next dash's far end is sampled on a circle of radius
  ``paddle_length + margin`` around the next pivot, weighted by ``cos(min(continuity·Δθ, π/2))²`` (smooth
  turns) and by how free the spot is, and a dash is accepted only if its mask does not collide
  (``occupancy + mask < 1.8``).
* distractor snakes of ``distractor_length`` dashes are then scattered wherever there is room, and disks of
  ``marker_radius`` mark two snake ends (composed in :mod:`datamodules.lra.generate_pathfinder`).

One deliberate departure: positions outside the image count as occupied when a snake is seeded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLLISION_LIMIT = 1.8  # occupancy + new mask must stay below this everywhere
FREE_LIMIT = 0.3  # a pixel is free when its (dilated) occupancy is at most this
MIN_AVAILABILITY = 0.01  # distractors stop when less than 1 % of the image is free


@dataclass(frozen=True)
class PathfinderParams:
    """Generator settings; :data:`PRESETS` holds the ones documented for the LRA releases."""

    window_size: int
    padding: int
    antialias_scale: int
    seed_distance: int
    marker_radius: float
    contour_length: int
    paddle_length: int
    paddle_thickness: float
    paddle_margins: tuple[int, ...]
    continuity: float
    distractor_length: float
    num_distractor_snakes: float
    snake_contrasts: tuple[float, ...]
    paddle_contrasts: tuple[float, ...] = (1.0,)
    max_paddle_retrial: int = 2
    max_distractor_retrial: int = 4
    max_target_attempts: int = 10_000

    def validate(self) -> None:
        if self.window_size < 8:
            raise ValueError(f"window_size must be >= 8 pixels, got {self.window_size}")
        blown = self.paddle_thickness * self.antialias_scale
        if blown != round(blown) or blown < 1:
            raise ValueError(
                f"paddle_thickness·antialias_scale must be a whole number of pixels >= 1, got "
                f"{self.paddle_thickness}·{self.antialias_scale} = {blown}"
            )
        if not self.paddle_margins or min(self.paddle_margins) < 1:
            raise ValueError(f"paddle_margins must be a non-empty list of margins >= 1, got {self.paddle_margins}")
        if self.contour_length < 1 or self.paddle_length < 1:
            raise ValueError("contour_length and paddle_length must be >= 1")
        if 4 * self.seed_distance >= self.window_size:
            raise ValueError(
                f"seed_distance {self.seed_distance} leaves no room to place the first snake in a "
                f"{self.window_size}-pixel window (it must be below window_size / 4)"
            )


# The LRA TFDS builders' docstrings list the settings used for each resolution (difficulty
# "curv_contour_length_14"); the rest are the generator's defaults.
PRESETS: dict[int, PathfinderParams] = {
    32: PathfinderParams(
        window_size=32,
        padding=1,
        antialias_scale=2,
        seed_distance=7,
        marker_radius=1.5,
        contour_length=14,
        paddle_length=2,
        paddle_thickness=0.5,
        paddle_margins=(1,),
        continuity=1.0,
        distractor_length=14 // 3,
        num_distractor_snakes=20 // (14 // 3),
        snake_contrasts=(2.0,),
        paddle_contrasts=(0.75,),
    ),  # fmt: skip
    64: PathfinderParams(
        window_size=64,
        padding=1,
        antialias_scale=2,
        seed_distance=12,
        marker_radius=2.5,
        contour_length=14,
        paddle_length=5,
        paddle_thickness=1.0,
        paddle_margins=(1,),
        continuity=1.8,
        distractor_length=14 / 3,
        num_distractor_snakes=22 / (14 / 3),
        snake_contrasts=(0.8,),
    ),  # fmt: skip
    128: PathfinderParams(
        window_size=128,
        padding=1,
        antialias_scale=2,
        seed_distance=20,
        marker_radius=3.0,
        contour_length=14,
        paddle_length=5,
        paddle_thickness=1.5,
        paddle_margins=(2, 3),
        continuity=1.8,
        distractor_length=14 / 3,
        num_distractor_snakes=35 / (14 / 3),
        snake_contrasts=(0.9,),
    ),  # fmt: skip
    256: PathfinderParams(
        window_size=256,
        padding=22,
        antialias_scale=2,
        seed_distance=27,
        marker_radius=5.0,
        contour_length=14,
        paddle_length=5,
        paddle_thickness=2.0,
        paddle_margins=(3,),
        continuity=1.8,
        distractor_length=14 / 3,
        num_distractor_snakes=30 / (14 / 3),
        snake_contrasts=(1.0,),
    ),  # fmt: skip
}


DIFFICULTIES: dict[int, str] = {6: "curv_baseline", 9: "curv_contour_length_9", 14: "curv_contour_length_14"}
"""The release's folder for each target contour length; LRA's Pathfinder and Path-X tasks use 14, the hardest."""


def difficulty_folder(contour_length: int) -> str:
    """The folder a difficulty's images go in: the release's name, or ``curv_contour_length_<L>``."""
    return DIFFICULTIES.get(contour_length, f"curv_contour_length_{contour_length}")


def with_contour_length(params: PathfinderParams, contour_length: int) -> PathfinderParams:
    """``params`` with target snakes of ``contour_length`` dashes (the release's easier difficulties use 6 and 9).

    The distractors scale as in the release: ``contour_length / 3`` dashes each, and as many snakes as keep their
    total length unchanged (whole numbers when the preset's are, as at 32 pixels).
    """
    if contour_length < 2:
        raise ValueError(f"contour_length must be at least 2 dashes, got {contour_length}")
    total = params.distractor_length * params.num_distractor_snakes
    if isinstance(params.distractor_length, int):
        length = max(1, contour_length // 3)
        count = int(round(total)) // length
    else:
        length = contour_length / 3
        count = total / length
    return dataclasses.replace(
        params, contour_length=contour_length, distractor_length=length, num_distractor_snakes=count
    )


def translate(point, angle: float, distance: float) -> tuple[int, int]:
    """Move ``point`` (y, x) by ``distance`` along ``angle``, rounding up as the original does."""
    return (math.ceil(point[0] + distance * math.sin(angle)), math.ceil(point[1] + distance * math.cos(angle)))


def flip(angle: float) -> float:
    return angle + math.pi if angle < 0 else angle - math.pi


@functools.cache
def disk_offsets(radius: float) -> np.ndarray:
    """``[N, 2]`` integer (dy, dx) with dy² + dx² <= radius²."""
    r = int(math.floor(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = dy**2 + dx**2 <= radius**2
    return np.stack([dy[inside], dx[inside]], axis=1)


@functools.cache
def circle_offsets(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate steps from a pivot: ``[N, 2]`` distinct integer (dy, dx) on a circle of ``radius``, one
    sample per pixel of arc, floored (the original truncates coordinates, which are never negative), and
    their angles."""
    angles = np.deg2rad(np.arange(0.0, 360.0, 360.0 / (2 * radius * np.pi)))
    steps = np.floor(np.stack([radius * np.sin(angles), radius * np.cos(angles)], axis=1)).astype(int)
    steps = np.unique(steps, axis=0)
    return steps, np.arctan2(steps[:, 0], steps[:, 1])


def dilate(binary: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of a 2-D array by a disk (out-of-range neighbours ignored)."""
    r = int(math.floor(radius))
    padded = np.pad(binary, r)
    out = np.zeros_like(binary)
    height, width = binary.shape
    for dy, dx in disk_offsets(radius):
        out |= padded[r + dy : r + dy + height, r + dx : r + dx + width]
    return out


def _lanczos(array: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize((size, size), Image.LANCZOS))


@functools.cache
def dash_stamp(angle: float, length: int, thickness: float, margin: int, scale: int):
    """A dash starting at the stamp's centre and pointing along ``angle``: ``(line, mask, radius)``.

    ``line`` and ``mask`` are ``[2·radius + 1]²`` float arrays in [0, 1]; the mask is the line dilated by
    ``margin``. Both are drawn ``scale`` times larger and downsampled with a Lanczos filter."""
    radius = length + math.ceil(thickness) + margin
    size, big = 2 * radius + 1, 2 * radius * scale + 1
    centre = radius * scale
    tip = translate((centre, centre), angle, length * scale)
    canvas = Image.new("F", (big, big), 0.0)
    ImageDraw.Draw(canvas).line([(centre, centre), (tip[1], tip[0])], fill=1.0, width=round(thickness * scale))
    blown = np.asarray(canvas) > 0.5
    line = np.clip(_lanczos(blown, size), 0.0, 1.0)
    mask = np.clip(_lanczos(dilate(blown, margin * scale), size), 0.0, 1.0)
    return line, mask, radius


def _window(shape, centre, radius):
    """Slices of the image and of a ``2·radius + 1`` stamp centred at ``centre`` that overlap."""
    (height, width), (y, x) = shape, centre
    y0, y1, x0, x1 = max(y - radius, 0), min(y + radius + 1, height), max(x - radius, 0), min(x + radius + 1, width)
    if y0 >= y1 or x0 >= x1:
        return None
    image = (slice(y0, y1), slice(x0, x1))
    stamp = (slice(y0 - (y - radius), y1 - (y - radius)), slice(x0 - (x - radius), x1 - (x - radius)))
    return image, stamp


def paste_max(canvas: np.ndarray, stamp: np.ndarray, centre, radius: int, scale: float = 1.0) -> None:
    """canvas = max(canvas, scale · stamp) around ``centre``, in place."""
    window = _window(canvas.shape, centre, radius)
    if window is not None:
        image, part = window
        np.maximum(canvas[image], scale * stamp[part], out=canvas[image])


def collides(occupancy: np.ndarray, mask: np.ndarray, centre, radius: int) -> bool:
    """Whether a dash mask placed at ``centre`` overlaps the occupancy map (or lies off the image)."""
    window = _window(occupancy.shape, centre, radius)
    if window is None:
        return True
    image, part = window
    return float((occupancy[image] + mask[part]).max()) >= COLLISION_LIMIT


@dataclass
class Snake:
    """A snake being grown: where the next dash is anchored and what has been drawn so far."""

    pivot: tuple[int, int]
    angle: float
    last_mask: tuple  # (mask, centre, radius) of the newest dash, not yet in the occupancy map
    path: list[tuple[float, float]]
    contrast: float

    @property
    def end(self) -> tuple[int, int]:
        return tuple(int(round(v)) for v in self.path[-1])


class Canvas:
    """Image and occupancy map of one picture, and the dash-drawing moves of the algorithm."""

    def __init__(self, params: PathfinderParams, margin: int, rng: np.random.Generator):
        self.p, self.margin, self.rng = params, margin, rng
        size = params.window_size
        self.image = np.zeros((size, size), dtype=np.float64)
        self.occupancy = np.zeros((size, size), dtype=np.float64)
        pad = params.padding
        self.occupancy[:pad], self.occupancy[-pad:], self.occupancy[:, :pad], self.occupancy[:, -pad:] = 1, 1, 1, 1

    def stamp(self, angle: float):
        p = self.p
        return dash_stamp(round(angle, 9), p.paddle_length, p.paddle_thickness, self.margin, p.antialias_scale)

    def in_image(self, point) -> bool:
        return 0 <= point[0] < self.p.window_size and 0 <= point[1] < self.p.window_size

    def free_starts(self, blocked: np.ndarray, angle: float) -> np.ndarray:
        """``[N, 2]`` positions where a dash along ``angle`` would touch no pixel of ``blocked`` above 0.3."""
        _, mask, radius = self.stamp(angle)
        offsets = np.argwhere(mask >= 0.99) - radius  # [K, 2]
        size = self.p.window_size
        padded = np.pad(blocked, radius, constant_values=1.0)
        worst = np.zeros((size, size))
        for dy, dx in offsets:
            np.maximum(worst, padded[radius + dy : radius + dy + size, radius + dx : radius + dx + size], out=worst)
        return np.argwhere(worst <= FREE_LIMIT)

    def seed_dash(self, start, angle: float, contrast: float) -> Snake | None:
        """Draw the first dash of a snake from ``start``; None when it or its pivot leaves the image."""
        length = self.p.paddle_length
        head = translate(start, angle, length)
        pivot = translate(head, flip(angle), length + self.margin)
        if not (self.in_image(head) and self.in_image(pivot)):
            return None
        line, mask, radius = self.stamp(angle)
        paste_max(self.image, line, start, radius, contrast)
        return Snake(pivot, angle, (mask, start, radius), [tuple(map(float, start)), tuple(map(float, head))], contrast)

    def extend(self, snake: Snake, contrast: float) -> bool:
        """Add the next dash to ``snake`` (in place); False at a dead end or after repeated collisions."""
        p, margin = self.p, self.margin
        pivot = translate(snake.pivot, snake.angle, p.paddle_length + 2 * margin)
        offsets, orientations = circle_offsets(p.paddle_length + margin)
        heads = np.asarray(pivot) + offsets  # [N, 2]
        inside = ((heads >= 0) & (heads < p.window_size)).all(axis=1)
        if not inside.any():
            return False
        heads, orientations = heads[inside], orientations[inside]
        turn = np.abs(orientations - snake.angle)
        turn = np.minimum(np.minimum(turn, 2 * np.pi - turn) * p.continuity, np.pi / 2)
        # free space around each candidate: the occupancy map dilated by the margin, read at the candidate
        neighbours = heads[:, None, :] + disk_offsets(margin)[None]  # [N, D, 2]
        valid = ((neighbours >= 0) & (neighbours < p.window_size)).all(-1)
        clipped = np.clip(neighbours, 0, p.window_size - 1)
        dilated = np.where(valid, self.occupancy[clipped[..., 0], clipped[..., 1]], 0.0).max(axis=1)
        weights = (1.0 - dilated) * np.maximum(np.cos(turn), 0.0) ** 2
        total = weights.sum()
        if total < 1e-4:
            return False
        cumulative = np.cumsum(weights / total)
        for _ in range(p.max_paddle_retrial + 1):
            index = int(np.argmax(cumulative - self.rng.random() > 0))
            head, angle = tuple(int(v) for v in heads[index]), float(orientations[index])
            line, mask, radius = self.stamp(flip(angle))
            if not collides(self.occupancy, mask, head, radius):
                paste_max(self.image, line, head, radius, contrast)
                self.commit(snake.last_mask)
                near_end = translate(head, flip(angle), p.paddle_length)
                snake.pivot, snake.angle, snake.last_mask = pivot, angle, (mask, head, radius)
                snake.path += [tuple(map(float, near_end)), tuple(map(float, head))]
                return True
        return False

    def commit(self, placed) -> None:
        """Add a dash mask to the occupancy map."""
        mask, centre, radius = placed
        paste_max(self.occupancy, mask, centre, radius)

    def random_angle(self) -> float:
        return float(self.rng.integers(-180, 180)) * math.pi / 180

    def choose(self, values: tuple[float, ...]) -> float:
        return values[int(self.rng.integers(len(values)))]

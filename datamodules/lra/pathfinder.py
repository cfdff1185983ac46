"""LRA Pathfinder (32×32, 1,024 pixels) and Path-X (128×128, 16,384 pixels): are the two dots connected?

Layout (``lra_release/pathfinder32``, ``lra_release/pathfinder128``, or what
:mod:`datamodules.lra.generate_pathfinder` writes)::

    data_dir/curv_contour_length_14/metadata/<batch>.npy     one line per image: "<dir> <file> <i> <label> ..."
    data_dir/curv_contour_length_14/imgs/<batch>/sample_<i>.png

The metadata files are text despite their suffix; true numpy files (an array of such records) are read
too. Empty image files (the release has one) are skipped. The images are split 80/10/10 into train,
validation and test by a seeded permutation. Pixels are ``uint8`` levels; the model embeds them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datamodules.lra.common import LRADataModule, collate_images, missing_data_error, split_indices
from datamodules.lra.pathfinder_snakes import DIFFICULTIES

DIFFICULTY = DIFFICULTIES[14]  # the LRA tasks' difficulty


def read_metadata(path: Path) -> list[list[str]]:
    """The records of one metadata file, each a list of fields."""
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):
        return [[str(field) for field in row] for row in np.load(path, allow_pickle=False)]
    return [line.split() for line in raw.decode("utf-8").splitlines() if line.strip()]


def index_images(root: Path) -> tuple[list[str], np.ndarray]:
    """``(image paths relative to root, labels)`` from every ``root/metadata/*.npy``, in batch order."""
    metadata = sorted(
        (root / "metadata").glob("*.npy"), key=lambda p: (int(p.stem) if p.stem.isdigit() else 1 << 62, p.stem)
    )
    paths, labels = [], []
    for meta in metadata:
        for line_number, fields in enumerate(read_metadata(meta), start=1):
            if len(fields) < 4 or fields[3] not in ("0", "1"):
                raise ValueError(f"{meta}:{line_number}: expected '<dir> <file> <index> <label 0/1> ...', got {fields}")
            relative = f"{fields[0]}/{fields[1]}"
            image = root / relative
            if not image.exists():
                raise FileNotFoundError(f"{meta}:{line_number} lists {image}, which does not exist")
            if image.stat().st_size == 0:
                continue
            paths.append(relative)
            labels.append(int(fields[3]))
    return paths, np.asarray(labels, dtype=np.int64)


class PathfinderImages(Dataset):
    """PNG files read on demand as flat ``uint8 [resolution²]`` pixel sequences."""

    def __init__(self, root: Path, paths: list[str], labels: np.ndarray, resolution: int):
        self.root, self.paths, self.labels, self.resolution = root, paths, labels, resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        path = self.root / self.paths[index]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
        if pixels.shape != (self.resolution, self.resolution):
            raise ValueError(f"{path} is {pixels.shape[::-1]} pixels; this task expects {self.resolution}² images")
        return pixels.reshape(-1), int(self.labels[index])


class PathfinderDataModule(LRADataModule):
    """Pathfinder at ``resolution`` (32 for the LRA Pathfinder task); 2 classes."""

    num_classes = 2
    collate_fn = staticmethod(collate_images)

    def __init__(
        self,
        data_dir: str = "data/lra/pathfinder32",
        resolution: int = 32,
        batch_size: int = 128,
        difficulty: str = DIFFICULTY,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(data_dir, batch_size, num_workers, seed)
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if len(split_fractions) != 3 or min(split_fractions) <= 0:
            raise ValueError(f"split_fractions must be three positive fractions (train, val, test): {split_fractions}")
        self.resolution, self.difficulty, self.split_fractions = resolution, difficulty, tuple(split_fractions)
        self.release_folder = f"pathfinder{resolution}"

    @property
    def root(self) -> Path:
        return self.data_dir / self.difficulty

    def expected_files(self) -> list[Path]:
        return [self.root / "metadata" / "<batch>.npy", self.root / "imgs" / "<batch>" / "sample_<i>.png"]

    def how_to_get(self) -> str:
        generate = (
            f"python -m datamodules.lra.generate_pathfinder --out {self.data_dir.parent} --resolution {self.resolution}"
        )
        return f"{super().how_to_get()}\nOr generate it with the Pathfinder algorithm: {generate}"

    def check_files(self) -> None:
        if not any((self.root / "metadata").glob("*.npy")):
            raise missing_data_error(type(self).__name__, self.expected_files(), self.how_to_get())

    def load_splits(self) -> dict[str, PathfinderImages]:
        paths, labels = index_images(self.root)
        if len(paths) < 3:
            raise ValueError(f"{self.root} lists {len(paths)} usable images; at least 3 are needed to split")
        parts = split_indices(len(paths), self.split_fractions, self.seed)
        return {
            split: PathfinderImages(self.root, [paths[i] for i in part], labels[part], self.resolution)
            for split, part in zip(("train", "val", "test"), parts)
        }


class PathXDataModule(PathfinderDataModule):
    """Path-X: Pathfinder at 128×128 (16,384 pixels)."""

    def __init__(
        self,
        data_dir: str = "data/lra/pathfinder128",
        resolution: int = 128,
        batch_size: int = 256,
        difficulty: str = DIFFICULTY,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(data_dir, resolution, batch_size, difficulty, split_fractions, num_workers, seed)

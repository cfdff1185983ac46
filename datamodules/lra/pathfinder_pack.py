"""Pack a Pathfinder folder (the release layout) into one xz-compressed file, and unpack it again.

Pathfinder images are small and mostly black: as PNG files they take about 600 bytes each, as one xz stream of
raw pixels about 260, so 200,000 images move between machines as one file of about 50 MB::

    python -m datamodules.lra.pathfinder_pack pack   data/lra/pathfinder32 pathfinder32.pfpack.xz
    python -m datamodules.lra.pathfinder_pack unpack pathfinder32.pfpack.xz data/lra/pathfinder32

Unpacking writes the same metadata files and the same pixels as PNG files, so the loaders read it as they read
the original. Each batch's metadata is written after its images and the pack itself is written beside its
destination and then renamed, so an interrupted run never leaves a pack or a batch that looks complete.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.atomic import write_atomically
from datamodules.lra.common import map_jobs
from datamodules.lra.pathfinder import DIFFICULTY, index_images

MAGIC = b"PFPACK1\n"


def pack(data_dir: str | Path, out: str | Path, difficulty: str = DIFFICULTY) -> int:
    """Write every image under ``data_dir/difficulty`` with its metadata into ``out``; returns the image count."""
    root = Path(data_dir) / difficulty
    metadata = {path.name: path.read_text() for path in sorted((root / "metadata").glob("*.npy"))}
    if not metadata:
        raise FileNotFoundError(f"no metadata files under {root / 'metadata'}: is {data_dir} a Pathfinder folder?")
    paths, _ = index_images(root)  # checks that every listed image exists; skips empty files
    listed = {f"{fields[0]}/{fields[1]}" for text in metadata.values() for fields in map(str.split, text.splitlines())}
    empty = sorted(listed - set(paths))  # the release has an empty image file; it stays one
    images = []
    for relative in paths:
        with Image.open(root / relative) as image:
            images.append(np.asarray(image.convert("L")))
    pixels = np.stack(images)
    header = json.dumps(
        {"difficulty": difficulty, "metadata": metadata, "paths": paths, "empty": empty, "shape": list(pixels.shape)}
    ).encode()

    def write(file) -> None:
        with lzma.open(file, "wb", preset=6) as stream:
            stream.write(MAGIC + len(header).to_bytes(8, "little") + header)
            stream.write(pixels.tobytes())

    write_atomically(out, write, binary=True)
    return len(paths)


def _write_pngs(job: tuple[Path, list[str], np.ndarray]) -> None:
    root, paths, pixels = job
    for relative, image in zip(paths, pixels):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, format="PNG")


def unpack(pack_file: str | Path, data_dir: str | Path, workers: int = 1) -> int:
    """Write the images and metadata of ``pack_file`` under ``data_dir``; returns the image count."""
    with lzma.open(pack_file, "rb") as stream:
        if stream.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{pack_file} is not a Pathfinder pack (written by `pathfinder_pack pack`)")
        header = json.loads(stream.read(int.from_bytes(stream.read(8), "little")))
        shape = tuple(header["shape"])
        raw = stream.read()
    if len(raw) != int(np.prod(shape)):
        raise ValueError(f"{pack_file} is truncated: {len(raw)} pixel bytes for images of shape {shape}")
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    root = Path(data_dir) / header["difficulty"]
    paths = header["paths"]
    by_folder: dict[str, list[int]] = {}
    for i, relative in enumerate(paths):
        by_folder.setdefault(relative.rsplit("/", 1)[0], []).append(i)
    jobs = [(root, [paths[i] for i in rows], pixels[rows]) for rows in by_folder.values()]
    map_jobs(_write_pngs, jobs, workers)
    for relative in header["empty"]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"")
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for name, text in header["metadata"].items():  # last: a batch with metadata is complete
        write_atomically(root / "metadata" / name, lambda file, text=text: file.write(text))
    return len(paths)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="folder -> pack file")
    packing.add_argument("data_dir", help="the pathfinder<resolution> folder (holds curv_contour_length_14/)")
    packing.add_argument("out", help="pack file to write")
    packing.add_argument("--difficulty", default=DIFFICULTY, help="the folder inside data_dir, e.g. curv_baseline")
    unpacking = commands.add_parser("unpack", help="pack file -> folder")
    unpacking.add_argument("pack_file")
    unpacking.add_argument("data_dir", help="the pathfinder<resolution> folder to write")
    unpacking.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.command == "pack":
        count = pack(args.data_dir, args.out, args.difficulty)
        print(f"packed {count} images into {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB)")
    else:
        count = unpack(args.pack_file, args.data_dir, args.workers)
        print(f"unpacked {count} images into {args.data_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Pathfinder and Path-X: generated images, their labels, the release layout and the loaders."""

from __future__ import annotations

import lzma
import math

import numpy as np
import pytest
from PIL import Image

from datamodules.lra import pathfinder_pack
from datamodules.lra.generate_pathfinder import make_sample, write_pathfinder
from datamodules.lra.pathfinder import DIFFICULTY, PathfinderDataModule, PathXDataModule
from datamodules.lra.pathfinder_snakes import PRESETS, difficulty_folder, with_contour_length


@pytest.fixture(scope="module")
def samples_32():
    rng = np.random.default_rng(7)
    return [make_sample(PRESETS[32], rng) for _ in range(24)]


@pytest.fixture(scope="module")
def pathfinder32(tmp_path_factory):
    root = tmp_path_factory.mktemp("lra")
    return write_pathfinder(root, resolution=32, images=30, images_per_batch=12, seed=3)


def contour_ends(sample, point) -> set[int]:
    """Indices of the two target contours that start or end at ``point``."""
    return {i for i in (0, 1) for end in (sample.paths[i][0], sample.paths[i][-1]) if math.dist(end, point) < 0.5}


def test_label_one_means_the_markers_sit_on_both_ends_of_one_contour(samples_32):
    labels = []
    for sample in samples_32:
        first, second = (contour_ends(sample, marker) for marker in sample.markers)
        assert len(first) == 1 and len(second) == 1, "each marker must sit on the end of exactly one target"
        assert sample.markers[0] != sample.markers[1]
        assert (first == second) == (sample.label == 1)
        labels.append(sample.label)
    assert set(labels) == {0, 1}


def test_images_show_the_markers_and_every_dash_of_every_contour(samples_32):
    params = PRESETS[32]
    for sample in samples_32:
        image = sample.image
        assert image.shape == (32, 32) and image.dtype == np.uint8 and image.max() == 255
        for y, x in sample.markers:
            assert image[y, x] >= 128, "marker centre is not bright"
        assert len(sample.paths) >= 2 + 1, "no distractor was placed"
        assert len(sample.paths[0]) == len(sample.paths[1]) == 2 * params.contour_length
        for path in sample.paths:
            for start, end in zip(path[0::2], path[1::2]):
                assert math.dist(start, end) == pytest.approx(params.paddle_length, abs=1.5)
                y, x = (round((start[i] + end[i]) / 2) for i in (0, 1))
                assert image[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].max() >= 64, "a dash is missing"


def test_easier_difficulties_have_shorter_targets_and_the_release_distractor_budget():
    p32 = PRESETS[32]
    assert with_contour_length(p32, 14) == p32  # the preset is the release's hardest difficulty
    baseline = with_contour_length(p32, 6)  # distractors of 6 // 3 dashes, 20 dashes of them in all, as at 14
    assert (baseline.contour_length, baseline.distractor_length, baseline.num_distractor_snakes) == (6, 2, 10)
    nine = with_contour_length(p32, 9)
    assert (nine.distractor_length, nine.num_distractor_snakes) == (3, 6)
    wide = with_contour_length(PRESETS[128], 6)  # fractional at the larger sizes: 35 dashes of distractors
    assert wide.distractor_length == pytest.approx(2.0) and wide.num_distractor_snakes == pytest.approx(17.5)
    assert [difficulty_folder(n) for n in (6, 9, 14)] == ["curv_baseline", "curv_contour_length_9", DIFFICULTY]
    with pytest.raises(ValueError, match="contour_length"):
        with_contour_length(p32, 1)
    rng = np.random.default_rng(5)
    for _ in range(6):
        sample = make_sample(baseline, rng)
        assert len(sample.paths[0]) == len(sample.paths[1]) == 2 * 6
        first, second = (contour_ends(sample, marker) for marker in sample.markers)
        assert (first == second) == (sample.label == 1)


def test_an_easier_difficulty_is_written_to_its_release_folder_and_loads(tmp_path):
    data_dir = write_pathfinder(tmp_path, resolution=32, images=6, images_per_batch=6, seed=1, contour_length=6)
    lines = (data_dir / "curv_baseline" / "metadata" / "0.npy").read_text().splitlines()
    assert len(lines) == 6 and {line.split()[5] for line in lines} == {"6"}
    assert not (data_dir / DIFFICULTY).exists()
    module = PathfinderDataModule(str(data_dir), batch_size=2, difficulty="curv_baseline")
    module.setup("fit")
    assert sum(len(split) for split in module.splits.values()) == 6


def test_the_same_seed_draws_the_same_image():
    first = make_sample(PRESETS[32], np.random.default_rng(11))
    second = make_sample(PRESETS[32], np.random.default_rng(11))
    np.testing.assert_array_equal(first.image, second.image)
    assert first.label == second.label


def test_generator_writes_the_release_layout(pathfinder32):
    root = pathfinder32 / DIFFICULTY
    metadata = sorted((root / "metadata").glob("*.npy"))
    assert [p.name for p in metadata] == ["0.npy", "1.npy", "2.npy"]
    lines = [line.split() for p in metadata for line in p.read_text().splitlines()]
    assert len(lines) == 30 and all(len(fields) == 11 for fields in lines)
    assert lines[0][:4] == ["imgs/0", "sample_0.png", "0", lines[0][3]] and lines[0][3] in ("0", "1")
    assert lines[12][:3] == ["imgs/1", "sample_0.png", "0"]
    with Image.open(root / "imgs" / "2" / "sample_5.png") as image:
        assert image.mode == "L" and image.size == (32, 32)


def test_a_larger_set_of_the_same_seed_extends_a_smaller_one(tmp_path):
    small = write_pathfinder(tmp_path / "a", resolution=32, images=8, images_per_batch=4, seed=5) / DIFFICULTY
    whole = write_pathfinder(tmp_path / "b", resolution=32, images=12, images_per_batch=4, seed=5) / DIFFICULTY
    (small / "imgs" / "0" / "sample_1.png").write_bytes(b"kept")  # a complete batch is not drawn again
    (small / "metadata" / "1.npy").unlink()  # an incomplete batch (no metadata yet) is
    extended = write_pathfinder(tmp_path / "a", resolution=32, images=12, images_per_batch=4, seed=5) / DIFFICULTY
    assert (extended / "imgs" / "0" / "sample_1.png").read_bytes() == b"kept"
    for batch in ("1", "2"):
        assert (extended / "metadata" / f"{batch}.npy").read_text() == (whole / "metadata" / f"{batch}.npy").read_text()
        for index in range(4):
            name = f"sample_{index}.png"
            assert (extended / "imgs" / batch / name).read_bytes() == (whole / "imgs" / batch / name).read_bytes()


def test_datamodule_reads_every_image_with_its_label_into_disjoint_splits(pathfinder32):
    data = PathfinderDataModule(str(pathfinder32), batch_size=4, seed=0)
    data.setup()
    sizes = {split: len(dataset) for split, dataset in data.splits.items()}
    assert sizes == {"train": 24, "val": 3, "test": 3}
    seen = [path for dataset in data.splits.values() for path in dataset.paths]
    assert len(set(seen)) == 30
    root = pathfinder32 / DIFFICULTY
    records = [line.split() for meta in (root / "metadata").glob("*.npy") for line in meta.read_text().splitlines()]
    labels = {f"{fields[0]}/{fields[1]}": int(fields[3]) for fields in records}
    dataset = data.splits["val"]
    for index in range(len(dataset)):
        pixels, label = dataset[index]
        assert label == labels[dataset.paths[index]]
        with Image.open(root / dataset.paths[index]) as image:
            np.testing.assert_array_equal(pixels, np.asarray(image).reshape(-1))
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (4, 1024) and batch["labels"].shape == (4,)


def test_numpy_metadata_files_are_read_and_empty_images_skipped(pathfinder32, tmp_path):
    root = tmp_path / "pathfinder32" / DIFFICULTY
    (root / "metadata").mkdir(parents=True)
    (root / "imgs" / "0").mkdir(parents=True)
    records = []
    for i in range(4):
        source = pathfinder32 / DIFFICULTY / "imgs" / "0" / f"sample_{i}.png"
        (root / "imgs" / "0" / f"sample_{i}.png").write_bytes(source.read_bytes() if i != 2 else b"")
        records.append(["imgs/0", f"sample_{i}.png", str(i), str(i % 2), "1.0", "14"])
    np.save(root / "metadata" / "0.npy", np.array(records))
    data = PathfinderDataModule(str(tmp_path / "pathfinder32"), split_fractions=(0.34, 0.33, 0.33))
    data.setup()
    listed = sorted(path for dataset in data.splits.values() for path in dataset.paths)
    assert listed == ["imgs/0/sample_0.png", "imgs/0/sample_1.png", "imgs/0/sample_3.png"]


def test_path_x_images_are_128_pixels_wide(tmp_path):
    data_dir = write_pathfinder(tmp_path, resolution=128, images=3, images_per_batch=3, seed=0)
    assert data_dir.name == "pathfinder128"
    data = PathXDataModule(str(data_dir), batch_size=1, split_fractions=(0.34, 0.33, 0.33))
    data.setup()
    pixels, label = data.splits["train"][0]
    assert pixels.shape == (128 * 128,) and label in (0, 1)


def test_missing_data_raises_file_not_found_naming_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="curv_contour_length_14/metadata") as error:
        PathfinderDataModule(str(tmp_path / "pathfinder32")).setup()
    assert "generate_pathfinder" in str(error.value) and "lra_release/pathfinder32" in str(error.value)


def test_pack_and_unpack_give_back_the_same_images_and_metadata(tmp_path):
    data_dir = write_pathfinder(tmp_path / "in", resolution=32, images=20, images_per_batch=8, seed=4)
    root = data_dir / DIFFICULTY
    (root / "imgs" / "1" / "sample_3.png").write_bytes(b"")  # an empty image file, as in the release
    assert pathfinder_pack.pack(data_dir, tmp_path / "p.xz") == 19
    assert pathfinder_pack.unpack(tmp_path / "p.xz", tmp_path / "out", workers=2) == 19
    copy = tmp_path / "out" / DIFFICULTY
    for name in ("0.npy", "1.npy", "2.npy"):
        assert (copy / "metadata" / name).read_text() == (root / "metadata" / name).read_text()
    assert (copy / "imgs" / "1" / "sample_3.png").stat().st_size == 0
    for batch, index in [(0, 0), (1, 4), (2, 3)]:
        with Image.open(root / "imgs" / str(batch) / f"sample_{index}.png") as a:
            with Image.open(copy / "imgs" / str(batch) / f"sample_{index}.png") as b:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    original, unpacked = (PathfinderDataModule(str(d), batch_size=4) for d in (data_dir, tmp_path / "out"))
    original.setup("fit")
    unpacked.setup("fit")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(original.splits[split].labels, unpacked.splits[split].labels)
        assert original.splits[split].paths == unpacked.splits[split].paths


def test_unpack_refuses_a_truncated_or_foreign_file(pathfinder32, tmp_path):
    pathfinder_pack.pack(pathfinder32, tmp_path / "p.xz")
    with lzma.open(tmp_path / "p.xz") as stream:
        whole = stream.read()
    with lzma.open(tmp_path / "cut.xz", "wb") as stream:
        stream.write(whole[:-100])
    with pytest.raises(ValueError, match="truncated"):
        pathfinder_pack.unpack(tmp_path / "cut.xz", tmp_path / "out")
    with lzma.open(tmp_path / "other.xz", "wb") as stream:
        stream.write(b"something else entirely")
    with pytest.raises(ValueError, match="not a Pathfinder pack"):
        pathfinder_pack.unpack(tmp_path / "other.xz", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no metadata"):
        pathfinder_pack.pack(tmp_path, tmp_path / "none.xz")

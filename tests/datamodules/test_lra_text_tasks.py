"""LRA Text (IMDB bytes), Retrieval (AAN pairs) and Image (CIFAR-10 gray levels) loaders on hand-made files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from datamodules.lra.image import ImageDataModule, to_grayscale
from datamodules.lra.retrieval import RetrievalDataModule
from datamodules.lra.synthetic import write_toy_aan, write_toy_cifar10, write_toy_imdb
from datamodules.lra.text import TextDataModule


def write_reviews(root, reviews: dict[tuple[str, str], list[bytes]]) -> None:
    for (split, name), texts in reviews.items():
        (root / split / name).mkdir(parents=True)
        for i, text in enumerate(texts):
            (root / split / name / f"{i}_5.txt").write_bytes(text)


def test_reviews_become_byte_ids_plus_one_truncated_with_positive_label_one(tmp_path):
    write_reviews(tmp_path, {
        ("train", "neg"): [b"bad", b"dull film"], ("train", "pos"): ["caf\u00e9!".encode()],
        ("test", "neg"): [b"no"], ("test", "pos"): [b"yes <br />"],
    })  # fmt: skip
    data = TextDataModule(str(tmp_path), batch_size=8, max_length=5)
    data.setup()
    train = data.splits["train"]
    examples = [train[i] for i in range(len(train))]
    assert [label for _, label in examples] == [0, 0, 1]
    assert examples[0][0].tolist() == [ord(c) + 1 for c in "bad"]
    assert examples[1][0].tolist() == [ord(c) + 1 for c in "dull "]  # truncated to 5 bytes
    assert examples[2][0].tolist() == [b + 1 for b in "café".encode()]  # é is two bytes, 0xC3 0xA9
    assert data.splits["val"] is data.splits["test"]  # as in LRA, the test set validates
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (3, 5) and batch["attention_mask"].sum().item() == 3 + 5 + 5


def test_a_validation_fraction_holds_out_part_of_the_training_set(tmp_path):
    write_toy_imdb(tmp_path, per_class=10, words=5)
    data = TextDataModule(str(tmp_path), val_fraction=0.25, seed=1)
    data.setup()
    assert (len(data.splits["train"]), len(data.splits["val"]), len(data.splits["test"])) == (15, 5, 20)


def test_text_from_a_datasets_folder_via_hub_name(tmp_path):
    datasets = pytest.importorskip("datasets")
    for split, texts in (("train", ["good", "awful"]), ("test", ["fine"])):
        split_data = datasets.Dataset.from_dict({"text": texts, "label": [1, 0][: len(texts)]})
        split_data.to_parquet(tmp_path / f"{split}.parquet")
    data = TextDataModule(str(tmp_path / "unused"), hub_name=str(tmp_path))
    data.setup()
    text, label = data.splits["train"][1]
    assert text.tolist() == [ord(c) + 1 for c in "awful"] and label == 0


def test_missing_imdb_raises_file_not_found_naming_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/pos") as error:
        TextDataModule(str(tmp_path / "aclImdb")).setup()
    assert "aclImdb_v1.tar.gz" in str(error.value)


def write_pairs(root, lines: dict[str, str]) -> None:
    for split, text in lines.items():
        (root / f"new_aan_pairs.{split}.tsv").write_text(text)


def test_aan_pairs_become_two_byte_sequences_and_a_label(tmp_path):
    write_pairs(tmp_path, {
        "train": "1.0\tA\tB\tabc\txy\n0.0\tC\tD\t\"q\"\tlonger text\n",
        "eval": "0.0\tE\tF\tu\tv\n", "test": "1.0\tG\tH\tw\tz\n",
    })  # fmt: skip
    data = RetrievalDataModule(str(tmp_path), batch_size=2, max_length=6)
    data.setup()
    first, second, label = data.splits["train"][1]
    assert first.tolist() == [ord(c) + 1 for c in '"q"'] and label == 0  # quotes are plain bytes
    assert second.tolist() == [ord(c) + 1 for c in "longer"]
    batch = next(iter(data.train_dataloader()))
    assert batch["labels"].tolist() in ([1, 0], [0, 1])
    assert batch["input_ids"].shape == (2, 3) and batch["input_ids_2"].shape == (2, 6)
    assert batch["attention_mask_2"].sum().item() == 2 + 6


def test_a_malformed_aan_line_raises_a_value_error_with_its_line_number(tmp_path):
    write_pairs(tmp_path, {"train": "1.0\tA\tB\tx\ty\n1.0\tA\tB\tonly four\n", "eval": "", "test": ""})
    with pytest.raises(ValueError, match=r"train\.tsv:2: expected 5 tab-separated fields"):
        RetrievalDataModule(str(tmp_path)).setup()


def test_missing_aan_raises_file_not_found_naming_every_file(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        RetrievalDataModule(str(tmp_path)).setup()
    for name in ("new_aan_pairs.train.tsv", "new_aan_pairs.eval.tsv", "new_aan_pairs.test.tsv", "tsv_data"):
        assert name in str(error.value)


def test_grayscale_matches_tensorflow_rgb_to_grayscale_on_hand_computed_pixels():
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30], [0, 0, 0]], np.uint8)
    # floor(255.5 · (0.2989 r + 0.5870 g + 0.1140 b) / 255)
    assert to_grayscale(rgb).tolist() == [76, 149, 29, 255, 18, 0]


def test_cifar_batches_are_read_as_rgb_planes_and_the_last_tenth_validates(tmp_path):
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = np.zeros((4, 3072), np.uint8)
        data[:, 1024 + 32 * 1 + 2] = 200  # green plane, row 1, column 2
        data[:, 0] = 10 * i  # red plane, first pixel: which file
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [i, i, i, i]}, f)
    colour = ImageDataModule(str(tmp_path), grayscale=False, val_fraction=0.1)
    colour.setup()
    pixels, label = colour.splits["train"][0]
    assert pixels.shape == (1024, 3) and pixels[34].tolist() == [0, 200, 0] and label == 0
    assert len(colour.splits["train"]) == 18 and len(colour.splits["val"]) == 2 and len(colour.splits["test"]) == 4
    assert [colour.splits["val"][i][1] for i in range(2)] == [4, 4]  # the end of the last training batch
    gray = ImageDataModule(str(tmp_path), batch_size=3)
    gray.setup()
    batch = next(iter(gray.test_dataloader()))
    assert batch["input_ids"].shape == (3, 1024) and batch["input_ids"].dtype.is_floating_point is False
    assert (
        batch["input_ids"][0, 34].item() == 117 and batch["input_ids"][0, 0].item() == 14
    )  # floor(0.587·200·255.5/255)


def test_toy_writers_produce_data_the_loaders_accept(tmp_path):
    write_toy_aan(tmp_path / "aan", pairs=8, words=4)
    write_toy_cifar10(tmp_path / "cifar", per_batch=6)
    retrieval, image = RetrievalDataModule(str(tmp_path / "aan")), ImageDataModule(str(tmp_path / "cifar"))
    retrieval.setup()
    image.setup()
    assert len(retrieval.splits["train"]) == 8 and len(image.splits["test"]) == 6


def test_missing_cifar_raises_file_not_found_naming_the_batches(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1") as error:
        ImageDataModule(str(tmp_path)).setup()
    assert "test_batch" in str(error.value) and "cifar-10-python.tar.gz" in str(error.value)

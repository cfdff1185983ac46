"""ImageNet datamodule: folder checks, the DeiT transforms, batch Mixup/CutMix, HF datasets; the digits datamodule."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.digits import DigitsDataModule, _RandomShift, load_digit_tensors
from datamodules.imagenet import (
    ImageNetDataModule,
    _augment_ops,
    check_image_folder,
    posterize,
    write_synthetic_image_folder,
)

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_synthetic_image_folder(tmp_path_factory.mktemp("imagenet"), num_classes=NUM_CLASSES, size=40)


def _datamodule(root, **kwargs) -> ImageNetDataModule:
    defaults = dict(image_size=32, batch_size=8, num_workers=0)
    dm = ImageNetDataModule(root=str(root), **{**defaults, **kwargs})
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------ folder layout


def test_image_folder_layout_is_accepted_and_classes_listed(folder):
    assert check_image_folder(folder) == [f"class_{c:03d}" for c in range(NUM_CLASSES)]


def test_missing_root_raises_file_not_found_naming_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"<root>/train/<class>/\*\.JPEG"):
        _datamodule(tmp_path / "nowhere")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.JPEG").touch()
    with pytest.raises(FileNotFoundError, match=r"(?s)val does not exist.*<root>/val/<class>"):
        check_image_folder(tmp_path)


def test_flat_validation_folder_raises_and_says_to_sort_into_classes(folder, tmp_path):
    root = tmp_path / "flat"
    shutil.copytree(folder / "train", root / "train")
    (root / "val").mkdir()
    for image in (folder / "val").rglob("*.JPEG"):
        shutil.copy(image, root / "val" / image.name)
    with pytest.raises(ValueError, match=r"(?s)holds 8 images directly.*one folder per class.*<root>/val/<class>"):
        check_image_folder(root)


def test_mismatched_or_empty_class_folders_raise(folder, tmp_path):
    root = tmp_path / "mismatch"
    shutil.copytree(folder, root)
    shutil.rmtree(root / "val" / "class_003")
    with pytest.raises(ValueError, match=r"different classes \(only in train: \['class_003'\]"):
        check_image_folder(root)
    (root / "val" / "class_003").mkdir()
    with pytest.raises(ValueError, match=r"class_003 holds no images"):
        check_image_folder(root)


def test_exactly_one_data_source_and_even_batches_for_mixup_are_required(folder):
    with pytest.raises(ValueError, match="exactly one of root"):
        ImageNetDataModule()
    with pytest.raises(ValueError, match="exactly one of root"):
        ImageNetDataModule(root=str(folder), hf_name="imagenet-1k")
    with pytest.raises(ValueError, match="batch_size must be even"):
        ImageNetDataModule(root=str(folder), batch_size=7)


# ------------------------------------------------------------------------------------------ transforms


def test_transforms_follow_the_deit_recipe_at_224():
    train, evaluation = ImageNetDataModule(root="unused").transforms()
    names = [type(t).__name__ for t in train.transforms]
    assert names == [
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "RandAugment",
        "MaybeToTensor",
        "Normalize",
        "RandomErasing",
    ]
    crop, _, rand_augment, _, _, erasing = train.transforms
    assert crop.size == (224, 224) and "bicubic" in str(crop)
    assert rand_augment.num_layers == 2 and {op.magnitude for op in rand_augment.ops} == {9}
    assert {op.magnitude_std for op in rand_augment.ops} == {0.5}
    assert "PosterizeIncreasing" in str(rand_augment)  # the "inc1" op set
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    resize, center = evaluation.transforms[:2]
    assert resize.size == 256 and center.size == (224, 224) and "bicubic" in str(resize)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "original"])
def test_posterize_at_the_largest_magnitude_gives_a_black_image_instead_of_failing(policy):
    # "inc" posterize keeps 4 - int(0.4 * magnitude) bits: 0 at magnitude 10, which Pillow 13 rejects
    train, _ = ImageNetDataModule(root="unused", auto_augment=policy).transforms()
    ops = [op for op in _augment_ops(train) if op.name.startswith("Posterize")]
    assert ops and all(op.aug_fn is posterize for op in ops)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    op = next((op for op in ops if op.name == "PosterizeIncreasing"), None)
    if op is not None:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
        assert not np.asarray(op(image)).any()
    # and any other bit count is timm's (Pillow's) posterize: the top bits of every channel
    kept = np.asarray(posterize(image, 2))
    assert np.array_equal(kept, np.asarray(image) & 0b11000000)


def test_loaders_give_normalised_batches_and_drop_the_last_partial_training_batch(folder):
    dm = _datamodule(folder, batch_size=6)
    assert dm.num_classes == NUM_CLASSES
    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == (NUM_CLASSES * 8) // 6  # 32 images, batches of 6, remainder dropped
    images, labels = train_batches[0]
    assert images.shape == (6, 3, 32, 32) and labels.dtype == torch.int64
    val_images, val_labels = next(iter(dm.val_dataloader()))
    assert val_images.shape == (6, 3, 32, 32)
    assert sorted(set(val_labels.tolist())) == list(range(3))  # first 6 of 8 val images, sorted by class
    assert abs(val_images.mean().item()) < 3 and val_images.std().item() > 0.1


# ------------------------------------------------------------------------------------------ Mixup


def _smooth(labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    off = smoothing / NUM_CLASSES
    return torch.full((len(labels), NUM_CLASSES), off).scatter_(1, labels[:, None], 1 - smoothing + off)


def _mix(dm, images, labels, training=True):
    dm.trainer = SimpleNamespace(training=training)
    return dm.on_after_batch_transfer((images.clone(), labels.clone()), 0)


def test_mixup_blends_each_image_with_the_reversed_batch_and_its_smoothed_labels(folder):
    dm = _datamodule(folder, cutmix_alpha=0.0, mixup_alpha=0.8, mixup_label_smoothing=0.1)
    images, labels = next(iter(dm.train_dataloader()))
    mixed, targets = _mix(dm, images, labels)
    flipped = images.flip(0)
    # recover λ from the pixels by least squares, then check pixels and targets against it
    diff = (images - flipped).flatten()
    lam = ((mixed - flipped).flatten() @ diff / (diff @ diff)).item()
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * flipped, atol=1e-5, rtol=1e-5)
    expected = lam * _smooth(labels, 0.1) + (1 - lam) * _smooth(labels.flip(0), 0.1)
    torch.testing.assert_close(targets, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))


def test_cutmix_pastes_one_box_and_weights_labels_by_its_area(folder):
    dm = _datamodule(folder, cutmix_alpha=1.0, mixup_alpha=0.0, mixup_label_smoothing=0.0)
    images, labels = next(iter(dm.train_dataloader()))
    mixed, targets = _mix(dm, images, labels)
    from_self = (mixed == images).all(dim=1)  # [B, H, W]: pixel kept from the image itself
    from_other = (mixed == images.flip(0)).all(dim=1)
    assert bool((from_self | from_other).all())
    box = ~from_self[0]
    rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
    if len(rows):  # the pasted region is one rectangle, the same for the whole batch
        assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    lam = 1 - box.float().mean().item()
    expected = lam * _smooth(labels, 0.0) + (1 - lam) * _smooth(labels.flip(0), 0.0)
    torch.testing.assert_close(targets, expected, atol=1e-5, rtol=1e-5)


def test_validation_batches_are_not_mixed(folder):
    dm = _datamodule(folder)
    images, labels = next(iter(dm.val_dataloader()))
    out_images, out_labels = _mix(dm, images, labels, training=False)
    assert torch.equal(out_images, images) and torch.equal(out_labels, labels)


# ------------------------------------------------------------------------------------------ HF datasets


def test_hugging_face_dataset_on_disk_loads_like_the_folder(folder, tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    def split(name):
        paths = sorted((folder / name).rglob("*.JPEG"))
        return {"image": [Image.open(p) for p in paths], "label": [int(p.parent.name[-3:]) for p in paths]}

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(NUM_CLASSES)])}
    )
    data = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict(split(d), features=features)
            for s, d in (("train", "train"), ("validation", "val"))
        }
    )
    data.save_to_disk(str(tmp_path / "hf"))
    dm = ImageNetDataModule(hf_name=str(tmp_path / "hf"), image_size=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == NUM_CLASSES and dm.classes == ["c0", "c1", "c2", "c3"]
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    bad = ImageNetDataModule(hf_name=str(tmp_path / "hf"), hf_label_column="cls", num_workers=0)
    with pytest.raises(ValueError, match=r"lacks columns \['cls'\]"):
        bad.setup("fit")


# ------------------------------------------------------------------------------------------ digits


def test_digits_are_sklearns_real_images_upsampled_and_split_stratified():
    from sklearn.datasets import load_digits

    images, labels = load_digit_tensors(image_size=8)
    raw = load_digits()
    np.testing.assert_allclose(images[:, 0].numpy(), raw.images / 16.0, rtol=0, atol=1e-7)
    dm = DigitsDataModule(image_size=32, val_fraction=0.2, seed=0)
    dm.setup("fit")
    val_x, val_y = dm.val_set.tensors
    train_y = dm.train_set.labels
    assert len(val_y) + len(train_y) == 1797 and val_x.shape[1:] == (1, 32, 32)
    for c in range(10):  # 20% of every class in validation
        assert round(0.2 * int((torch.from_numpy(raw.target) == c).sum())) == int((val_y == c).sum())
    assert abs(dm.train_set.images.mean().item()) < 1e-4


def test_random_shift_moves_the_digit_without_changing_it():
    image = torch.zeros(1, 1, 10, 10)
    image[0, 0, 4:6, 4:6] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    shifted, label = _RandomShift(image, torch.tensor([7]), max_shift=2)[0]
    assert label.item() == 7
    rows, cols = shifted[0].nonzero().unbind(1)
    assert 2 <= rows.min() <= 6 and 2 <= cols.min() <= 6
    torch.testing.assert_close(
        shifted[0, rows.min() : rows.min() + 2, cols.min() : cols.min() + 2], image[0, 0, 4:6, 4:6]
    )

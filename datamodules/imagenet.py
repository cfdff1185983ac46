"""ImageNet (or any ImageFolder) with the DeiT training recipe: timm transforms, RandAugment, random erasing, Mixup.

Data come from a local folder in the standard layout (``<root>/train/<class>/*.JPEG``, ``<root>/val/<class>/*.JPEG``)
or from a Hugging Face ``datasets`` name or ``save_to_disk`` directory. Mixup/CutMix with label smoothing is
applied to whole training batches on the device (``on_after_batch_transfer``); the targets then become soft
``[B, num_classes]`` rows, which the LightningModule recognises.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from datamodules.resumable import loader_generator, ordered_loader, seeded_generators

SPLITS = ("train", "val")
LAYOUT = (
    "expected an ImageNet-style folder:\n"
    "  <root>/train/<class>/*.JPEG\n"
    "  <root>/val/<class>/*.JPEG\n"
    "with the same class folders in both splits (any of these extensions: " + " ".join(IMG_EXTENSIONS) + ")"
)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _split_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder split {split_dir} does not exist; {LAYOUT}")
    entries = list(os.scandir(split_dir))
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        loose = sum(1 for e in entries if e.is_file() and _is_image(e.name))
        hint = (
            f"it holds {loose} images directly (the raw ILSVRC validation archive is flat: sort its images "
            "into one folder per class, e.g. with the ground-truth labels, before training)"
            if loose
            else "it has no class folders"
        )
        raise ValueError(f"malformed image folder {split_dir}: {hint}; {LAYOUT}")
    for name in classes:
        if not any(e.is_file() and _is_image(e.name) for e in os.scandir(split_dir / name)):
            raise ValueError(f"malformed image folder: class folder {split_dir / name} holds no images; {LAYOUT}")
    return classes


def posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op, with 0 bits kept giving a black image.

    RandAugment's "inc" posterize keeps ``4 - int(0.4 * magnitude)`` bits, so 0 once a magnitude drawn around 9
    with std 0.5 (DeiT's ``rand-m9-mstd0.5-inc1``) reaches its cap of 10: about 2% of draws. Older Pillow
    turned 0 bits into a black image; Pillow 13 raises ``ValueError``, which stops a training run within its
    first ImageNet epoch. This keeps the old result.
    """
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return timm_auto_augment.posterize(image, bits_to_keep, **kwargs)


def _augment_ops(transform):
    """Every timm ``AugmentOp`` inside a (composed) transform: RandAugment's ops and AutoAugment's policies."""
    for part in getattr(transform, "transforms", [transform]):
        yield from getattr(part, "ops", [])
        for sub_policy in getattr(part, "policy", []):
            yield from sub_policy


def check_image_folder(root: str | os.PathLike) -> list[str]:
    """Check ``root`` against the ImageNet layout and return its class names; raise one error naming the layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist; {LAYOUT}")
    train, val = (_split_classes(root / split) for split in SPLITS)
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise ValueError(
            f"malformed image folder {root}: train/ and val/ have different classes "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]}); {LAYOUT}"
        )
    return train


class HFImageDataset(Dataset):
    """A Hugging Face image-classification split as ``(transformed image, label)`` pairs."""

    def __init__(self, split, transform, image_column: str = "image", label_column: str = "label"):
        missing = {image_column, label_column} - set(split.column_names)
        if missing:
            raise ValueError(
                f"dataset split lacks columns {sorted(missing)} (has {split.column_names}); "
                "set hf_image_column / hf_label_column"
            )
        self.split, self.transform = split, transform
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        example = self.split[index]
        return self.transform(example[self.image_column].convert("RGB")), int(example[self.label_column])


def _load_hf(name: str, splits: tuple[str, str]):
    import datasets

    if Path(name).is_dir():  # a DatasetDict written by save_to_disk
        data = datasets.load_from_disk(name)
    else:
        data = datasets.load_dataset(name)
    missing = [s for s in splits if s not in data]
    if missing:
        raise ValueError(f"dataset {name!r} has splits {list(data)}, not {missing}; set hf_splits")
    return data[splits[0]], data[splits[1]]


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet-1k (or any ImageFolder / HF image dataset) with timm's DeiT augmentation and batch Mixup.

    Give ``root`` (a folder in the layout above) or ``hf_name`` (a hub name, or a ``save_to_disk`` directory).
    ``batch_size`` is per device. ``mixup_label_smoothing`` smooths the mixed targets; Mixup/CutMix is off
    when both alphas are 0, and label smoothing is then the LightningModule's ``label_smoothing``.

    The training order, each image's augmentation and each batch's Mixup are functions of ``seed``, the epoch and
    the position (``datamodules.resumable``; the count of mixed batches is in the datamodule's checkpoint state),
    so a fit resumed mid-epoch continues exactly.
    """

    def __init__(
        self,
        root: str | None = None,
        hf_name: str | None = None,
        hf_splits: tuple[str, str] = ("train", "validation"),
        hf_image_column: str = "image",
        hf_label_column: str = "label",
        image_size: int = 224,
        eval_crop_pct: float = 0.875,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        interpolation: str = "bicubic",
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        mixup_label_smoothing: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        if (root is None) == (hf_name is None):
            raise ValueError(f"give exactly one of root= (a local folder) or hf_name= (a datasets name); {LAYOUT}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (mixup_alpha > 0 or cutmix_alpha > 0) and mixup_mode == "batch" and batch_size % 2:
            raise ValueError(f"Mixup/CutMix mixes pairs of a batch: batch_size must be even, got {batch_size}")
        self.save_hyperparameters()
        self.num_classes: int | None = None
        self.classes: list[str] | None = None
        self.train_set = self.val_set = None
        self.mixup: Mixup | None = None
        self.mixed_batches = 0  # Mixup's draws for batch n are seeded by (seed, n)

    def transforms(self):
        """The (train, eval) transforms: DeiT's RandAugment / erasing recipe and resize + centre crop."""
        h = self.hparams
        common = dict(interpolation=h.interpolation, mean=tuple(h.mean), std=tuple(h.std))
        train = create_transform(
            h.image_size,
            is_training=True,
            auto_augment=h.auto_augment,
            color_jitter=h.color_jitter,
            re_prob=h.re_prob,
            re_mode=h.re_mode,
            **common,
        )
        for op in _augment_ops(train):
            if op.aug_fn is timm_auto_augment.posterize:
                op.aug_fn = posterize
        evaluation = create_transform(h.image_size, is_training=False, crop_pct=h.eval_crop_pct, **common)
        return train, evaluation

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        train_tf, eval_tf = self.transforms()
        if h.root is not None:
            self.classes = check_image_folder(h.root)
            self.train_set = ImageFolder(os.path.join(h.root, "train"), transform=train_tf)
            self.val_set = ImageFolder(os.path.join(h.root, "val"), transform=eval_tf)
        else:
            train, val = _load_hf(h.hf_name, tuple(h.hf_splits))
            feature = train.features.get(h.hf_label_column)
            self.classes = list(feature.names) if hasattr(feature, "names") else None
            self.train_set = HFImageDataset(train, train_tf, h.hf_image_column, h.hf_label_column)
            self.val_set = HFImageDataset(val, eval_tf, h.hf_image_column, h.hf_label_column)
        if self.classes is None:
            labels = np.asarray(self.train_set.split[h.hf_label_column])
            self.classes = [str(c) for c in range(int(labels.max()) + 1)]
        self.num_classes = len(self.classes)
        if h.mixup_alpha > 0 or h.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=h.mixup_alpha,
                cutmix_alpha=h.cutmix_alpha,
                prob=h.mixup_prob,
                switch_prob=h.mixup_switch_prob,
                mode=h.mixup_mode,
                label_smoothing=h.mixup_label_smoothing,
                num_classes=self.num_classes,
            )

    def _loader(self, dataset, train: bool) -> DataLoader:
        h = self.hparams
        options = dict(
            num_workers=h.num_workers,
            pin_memory=h.pin_memory and torch.cuda.is_available(),
            persistent_workers=h.num_workers > 0,
        )
        if not train:
            batch_size = h.eval_batch_size or h.batch_size
            return DataLoader(dataset, batch_size=batch_size, generator=loader_generator(h.seed), **options)
        return ordered_loader(
            dataset, self.trainer, batch_size=h.batch_size, shuffle=True, seed=h.seed, resumable=True, augmented=True,
            drop_last=True, **options,  # Mixup pairs need full, even batches
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Mix training batches on the device: images stay ``[B, C, H, W]``, targets become ``[B, classes]``."""
        if self.mixup is not None and self.trainer is not None and self.trainer.training:
            images, targets = batch
            with seeded_generators(self.hparams.seed * 1_000_003 + self.mixed_batches):  # Mixup draws from NumPy's
                batch = self.mixup(images, targets)
            self.mixed_batches += 1
        return batch

    def state_dict(self) -> dict:
        return {"mixed_batches": self.mixed_batches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.mixed_batches = state_dict["mixed_batches"]


def write_synthetic_image_folder(
    root: str | os.PathLike,
    num_classes: int = 4,
    train_per_class: int = 8,
    val_per_class: int = 2,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """Write a small ImageNet-layout folder of JPEGs whose classes are learnable (for tests and demos).

    Class ``c`` is a bright square at one of ``num_classes`` positions with a class-specific colour, on noise.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    side = max(4, size // 3)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            angle = 2 * np.pi * c / num_classes
            top = int((size - side) / 2 * (1 + 0.8 * np.sin(angle)))
            left = int((size - side) / 2 * (1 + 0.8 * np.cos(angle)))
            colour = np.array([255 * (c % 2), 255 * ((c // 2) % 2), 128 + 127 * ((c // 4) % 2)])
            for n in range(count):
                pixels = rng.integers(0, 96, size=(size, size, 3))
                dy, dx = rng.integers(-1, 2, size=2)
                y0, x0 = np.clip(top + dy, 0, size - side), np.clip(left + dx, 0, size - side)
                pixels[y0 : y0 + side, x0 : x0 + side] = colour
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{split}_{c}_{n}.JPEG", quality=95)
    return root

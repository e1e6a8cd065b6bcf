"""Image folders as datasets: files read one at a time with PIL, resized and centre-cropped to the model's
size, a seeded per-class validation split for a folder without train/ and val/."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets.folder import default_loader

from ..errors import UsageError
from .options import SPLIT_SEED, VAL_FRACTION, DataOptions
from .raw import LUMA, STATS, ImageFiles

__all__ = ["FolderImages", "folder_splits", "split_per_class"]


class FolderImages(Dataset):
    """Image files with labels, read as torchvision's ``ImageFolder`` reads them (``samples``,
    ``targets``, ``classes``, ``transform``)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None = None):
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = default_loader(path)
        return (self.transform(image) if self.transform is not None else image), target


class _FolderSplit(Subset):
    """One split of an image folder; ``targets`` (per image of the split) keeps ``train_subset`` stratified."""

    @property
    def targets(self) -> list[int]:
        return [self.dataset.targets[i] for i in self.indices]


def split_per_class(
    targets: Sequence[int], fraction: float, seed: int = SPLIT_SEED, classes: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """``(train, val)`` indices: ``round(fraction * n)`` of each class's ``n`` images held out (at least
    one, and one left to train), drawn by a generator seeded with ``seed``; sorted. ``classes``: the
    class folders' names, by label (for the error)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(list(targets))
    train, val = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2:
            name = f"folder {classes[c]!r}" if classes is not None and c < len(classes) else f"class {c}"
            raise UsageError(f"imagefolder: {name} has {len(idx)} image; a validation split needs at least 2 per class")
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


def folder_splits(files: ImageFiles, shape: tuple[int, ...] | None, augment: bool, opts: DataOptions):
    """``(train, val, num_classes, input_shape)`` of an image folder.

    Every image is resized (shorter side) and centre-cropped to the model's size; ``crop-flip`` then
    pads by 1/8 of the side, crops at random and flips, as for CIFAR. (ImageNet's random-resized crop
    keeps as little as 8% of an image: on a folder of a few hundred images it left a SmallNet at chance.)
    """
    size = opts.image_size or (shape[-1] if shape else 224)
    channels = opts.channels or 3
    mean, std = STATS["imagenet"]
    if channels == 1:  # gray by luma, normalised with the luma of ImageNet's statistics
        mean = (sum(w * m for w, m in zip(LUMA, mean)),)
        std = (sum(w * s for w, s in zip(LUMA, std)),)
    gray = [transforms.Grayscale(1)] if channels == 1 else []
    fit = [transforms.Resize(size), transforms.CenterCrop(size)]
    norm = [*gray, transforms.ToTensor(), transforms.Normalize(mean, std)]
    val_tf = transforms.Compose([*fit, *norm])
    if augment and opts.augment != "none":
        crop = transforms.RandomCrop(size, padding=max(1, size // 8))
        train_tf = transforms.Compose([*fit, crop, transforms.RandomHorizontalFlip(), *norm])
    else:
        train_tf = val_tf
    shape = (channels, size, size)
    if files.val is not None:
        train = FolderImages(files.train, files.classes, train_tf)
        return train, FolderImages(files.val, files.classes, val_tf), len(files.classes), shape
    whole = FolderImages(files.train, files.classes, train_tf)
    train_idx, val_idx = split_per_class(whole.targets, opts.val_fraction or VAL_FRACTION, classes=whole.classes)
    held_out = copy.copy(whole)  # the same file list, read with the validation transform
    held_out.transform = val_tf
    return _FolderSplit(whole, train_idx), _FolderSplit(held_out, val_idx), len(files.classes), shape

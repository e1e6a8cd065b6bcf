"""What a source's reader returns: torch-free data that :mod:`expandctl.data.pipeline` turns into datasets.

* :class:`ArraySplits`: in-memory images ``(N, C, H, W)`` and labels as numpy arrays, with the
  normalisation statistics and the scale that brings the stored values to [0, 1];
* :class:`ImageFiles`: a listing of image files and labels (read one at a time, with PIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .options import SPLIT_SEED, VAL_FRACTION

__all__ = ["LUMA", "STATS", "ArraySplits", "ImageFiles", "fixed_split"]

# Per-channel (mean, std) of the training images, in [0, 1] pixel units (the usual published values).
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
#: ITU-R BT.601 luma weights, as PIL's ``convert("L")`` and torchvision's ``Grayscale`` use.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ArraySplits:
    """Training and validation images ``(N, C, H, W)`` (any dtype) with integer labels.

    Stored values times ``scale`` are in [0, 1]; ``mean`` / ``std`` normalise them (per channel).
    ``augment``: the set's default training augmentation is crop + flip (CIFAR); otherwise none.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    num_classes: int
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    scale: float = 1.0
    augment: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.train_x.shape[1:])


@dataclass(frozen=True)
class ImageFiles:
    """Image files by class folder: ``classes`` (folder names, by label), ``train`` and ``val`` as
    ``(path, label)`` lists; ``val`` is ``None`` when one folder is to be split per class."""

    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]] | None = None


def fixed_split(x: np.ndarray, y: np.ndarray, **stats) -> ArraySplits:
    """A set without a validation split, split once for all:
    ``train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)``. ``stats``: the other fields."""
    from sklearn.model_selection import train_test_split  # lazy: scikit-learn is the optional [data] extra

    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=VAL_FRACTION, stratify=y, random_state=SPLIT_SEED)
    return ArraySplits(x_tr, y_tr, x_va, y_va, **stats)

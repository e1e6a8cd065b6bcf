"""``cifar10[:DIR]`` and ``cifar100[:DIR]``: torchvision's python format (checked and read by torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..files import download, locate
from ..raw import STATS, ArraySplits
from ..registry import DataSource, register

_CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _dataset_class(name: str):
    from torchvision import datasets  # lazy: torchvision's readers check and unpickle the batches

    return getattr(datasets, _CLASSES[name])


def cifar_root(name: str, root: Path) -> Path:
    """The parent of the set's batches folder; raises :class:`UsageError` naming missing files."""
    cls = _dataset_class(name)
    folder = cls.base_folder
    if root.name == folder:
        root = root.parent
    expected = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in expected if not (root / folder / n).is_file()]
    if missing:
        # data_batch_1, ..., data_batch_5 -> data_batch_1..5, to keep the message on one line
        short = ", ".join(expected) if name == "cifar100" else "data_batch_1..5, test_batch, batches.meta"
        listed = ", ".join(missing) if len(missing) < len(expected) else "all of them"
        raise UsageError(f"{name}: {root / folder} must hold {short} (torchvision's format); missing: {listed}")
    return root


def _has_files(name: str, root: Path) -> bool:
    try:
        cifar_root(name, root)
    except UsageError:
        return False
    return True


def read_cifar(name: str, arg: str | None, download_ok: bool) -> ArraySplits:
    """The set found in ``arg`` or the cache (or downloaded), its official test set as validation."""
    root = locate(name, arg, download_ok, lambda p: _has_files(name, p), lambda p: download(name, p, _CLASSES[name]))
    root = cifar_root(name, root)
    cls = _dataset_class(name)
    try:
        train = cls(str(root), train=True, download=False)
        val = cls(str(root), train=False, download=False)
    except RuntimeError as e:
        raise UsageError(f"{name}: files in {root / cls.base_folder} failed torchvision's checksum: {e}") from None
    mean, std = STATS[name]

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)

    # CIFAR trains with a random crop (4 pixels of padding) and a flip by default.
    return ArraySplits(*arrays(train), *arrays(val), len(train.classes), mean, std, 1 / 255, augment=True)


for _order, _name in ((50, "cifar10"), (60, "cifar100")):
    _folder = "cifar-10-batches-py" if _name == "cifar10" else "cifar-100-python"
    register(
        DataSource(
            _name,
            f"{_name}[:DIR]",
            f"torchvision's {_folder} (DIR is its parent or the folder itself; else the cache)",
            lambda arg, options, shape, _name=_name: read_cifar(_name, arg, options.download),
            order=_order,
            downloadable=True,
            doc=f"torchvision's python format; DIR is the folder holding `{_folder}`, or that folder itself; "
            "without DIR: the cache",
            split="official train / test",
        )
    )

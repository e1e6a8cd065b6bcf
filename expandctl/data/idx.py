"""IDX files (MNIST, Fashion-MNIST): reading them and finding the four of a set. Torch-free."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .files import download, locate
from .raw import STATS, ArraySplits

__all__ = ["IDX_FILES", "find_idx", "read_idx", "read_idx_set"]

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (``.gz`` or not) as a numpy array: 2 zero bytes, type code, ndim, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    types = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in types:
        raise UsageError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(types[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise UsageError(f"{path} is truncated or corrupt: {len(data)} bytes, expected {expected}")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def find_idx(root: Path, name: str, layout: str, hint: str = "") -> list[Path]:
    """The four IDX files in ``root`` or torchvision's ``root/<layout>/raw`` (``layout``: its class name,
    e.g. ``"MNIST"``), gzipped or not. ``hint`` ends the error, e.g. ``" (install ...)"``."""
    for folder in (root, root / layout / "raw"):
        found = []
        for stem in IDX_FILES:
            path = next((folder / f"{stem}{ext}" for ext in ("", ".gz") if (folder / f"{stem}{ext}").is_file()), None)
            found.append(path)
        if all(found):
            return found
    expected = ", ".join(f"{s}[.gz]" for s in IDX_FILES)
    raise UsageError(f"{name}: {root} does not hold the IDX files {expected}{hint}")


def read_idx_set(
    name: str, arg: str | None, download_ok: bool, layout: str, system: Sequence[Path] = (), hint: str = ""
) -> ArraySplits:
    """An IDX set: found in ``arg``, the ``system`` folders or the cache (or downloaded through
    torchvision's ``layout`` class), its official test set as validation. ``hint``: what else the user
    can do, e.g. ``"install Debian's dataset-fashion-mnist, "``."""

    def has_files(place: Path) -> bool:
        try:
            find_idx(place, name, layout)
        except UsageError:
            return False
        return True

    def fetch(target: Path) -> Path:
        return download(name, target, layout, hint)

    root = locate(name, arg, download_ok, has_files, fetch, system, hint)
    missing_hint = f" ({hint.rstrip(', ')} or give {name}:DIR)" if hint else ""
    tr_x, tr_y, va_x, va_y = (read_idx(p) for p in find_idx(root, name, layout, missing_hint))
    if tr_x.ndim != 3 or len(tr_x) != len(tr_y) or va_x.ndim != 3 or len(va_x) != len(va_y):
        raise UsageError(f"{name}: IDX files in {root} have inconsistent shapes")
    mean, std = STATS[name]
    # MNIST-like sets: no augmentation by default (crops and flips hurt digits and buy little here).
    return ArraySplits(
        tr_x[:, None], tr_y.astype(np.int64), va_x[:, None], va_y.astype(np.int64), 10, mean, std, 1 / 255
    )

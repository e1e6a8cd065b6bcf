"""``mnist[:DIR]``: MNIST's IDX files."""

from __future__ import annotations

from ..idx import read_idx_set
from ..raw import ArraySplits
from ..registry import DataSource, register


def read(arg: str | None, options, shape) -> ArraySplits:
    return read_idx_set("mnist", arg, options.download, "MNIST")


register(
    DataSource(
        "mnist",
        "mnist[:DIR]",
        "MNIST IDX files in DIR (without DIR: the cache)",
        read,
        order=40,
        downloadable=True,
        doc="MNIST IDX files; without DIR: the cache",
        split="official train / test",
    )
)

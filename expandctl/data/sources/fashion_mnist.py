"""``fashion-mnist[:DIR]``: Fashion-MNIST's IDX files, by default where Debian's package put them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..idx import read_idx_set
from ..raw import ArraySplits
from ..registry import DataSource, register

#: Where Debian's ``dataset-fashion-mnist`` usually installs the files.
FASHION_FALLBACK = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_default_dir() -> Path:
    """The folder where Debian's ``dataset-fashion-mnist`` installed the IDX files (``dpkg -L``), else
    that package's usual location ``/usr/share/datasets/fashion-mnist``."""
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(
                ["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            if Path(line).name.startswith("train-images-idx3-ubyte"):
                return Path(line).parent
    return FASHION_FALLBACK


def read(arg: str | None, options, shape) -> ArraySplits:
    hint = "install Debian's dataset-fashion-mnist, "
    system = () if arg else (fashion_mnist_default_dir(),)
    return read_idx_set("fashion-mnist", arg, options.download, "FashionMNIST", system, hint)


register(
    DataSource(
        "fashion-mnist",
        "fashion-mnist[:DIR]",
        "Fashion-MNIST IDX files; without DIR: Debian's dataset-fashion-mnist, then the cache",
        read,
        order=30,
        downloadable=True,
        doc="Fashion-MNIST, 60,000 + 10,000 images in IDX files; without DIR: where Debian's "
        "`dataset-fashion-mnist` put them (`dpkg -L`; normally `/usr/share/datasets/fashion-mnist`), then the cache",
        split="official train / test",
    )
)

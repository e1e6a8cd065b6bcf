"""``digits``: scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import numpy as np

from ...errors import UsageError
from ..raw import ArraySplits, fixed_split
from ..registry import DataSource, register


def read(arg: str | None, options, shape) -> ArraySplits:
    try:
        from sklearn.datasets import load_digits  # lazy: scikit-learn is the optional [data] extra
    except ImportError:
        raise UsageError("data digits needs scikit-learn (pip install 'expandctl[data]')", option="data") from None
    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # 1797, 1, 8, 8, values 0..16
    y = d.target.astype(np.int64)
    # No published statistics for this set: mean/std of all its pixels (0..16 scaled to [0, 1]).
    return fixed_split(x, y, num_classes=10, mean=(0.3053,), std=(0.3760,), scale=1 / 16)


register(
    DataSource(
        "digits",
        "digits",
        "scikit-learn's bundled 8x8 digits (1,797 images); fixed 80/20 split",
        read,
        order=10,
        doc="scikit-learn's bundled 8x8 handwritten digits: 1,797 real images, 1x8x8, 10 classes",
        split="fixed 80/20 (1,437 / 360)",
    )
)

"""``synthetic[:CxHxW]``: smooth random class prototypes plus pixel noise, for tests.

Generated with numpy (seeded), so reading the registry and this module loads no torch: learnable in an
epoch or two (tests see accuracy rise) yet not trivial; values are about zero-mean, unit-variance.
"""

from __future__ import annotations

import numpy as np

from ...errors import UsageError
from ..options import SPLIT_SEED
from ..raw import ArraySplits
from ..registry import DataSource, register

SYNTHETIC_TRAIN, SYNTHETIC_VAL, SYNTHETIC_CLASSES = 512, 128, 10


def _upsample(n: int, size: int) -> np.ndarray:
    """``(size, n)`` bilinear interpolation weights (``align_corners=False``, as torch's ``interpolate``)."""
    src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = np.zeros((size, n))
    np.add.at(w, (np.arange(size), lo), 1 - (src - lo))
    np.add.at(w, (np.arange(size), hi), src - lo)
    return w


def make_synthetic(shape: tuple[int, int, int], seed: int = SPLIT_SEED) -> ArraySplits:
    """Ten smooth prototypes (4x4 Gaussian noise upsampled), each image one of them plus unit noise, / sqrt 2."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    coarse = rng.standard_normal((SYNTHETIC_CLASSES, c, min(h, 4), min(w, 4)))
    protos = np.einsum("hk,wl,nckl->nchw", _upsample(coarse.shape[2], h), _upsample(coarse.shape[3], w), coarse)
    protos = protos / protos.std(ddof=1)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % SYNTHETIC_CLASSES)
        x = (protos[y] + rng.standard_normal((n, *shape))) / 2**0.5
        return x.astype(np.float32), y.astype(np.int64)

    return ArraySplits(*sample(SYNTHETIC_TRAIN), *sample(SYNTHETIC_VAL), SYNTHETIC_CLASSES)


def read(arg: str | None, options, shape) -> ArraySplits:
    if arg:
        try:
            shape = tuple(int(s) for s in arg.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise UsageError(f"synthetic:{arg}: give the image shape as CxHxW, e.g. synthetic:3x32x32")
    return make_synthetic(shape or (3, 32, 32))


register(
    DataSource(
        "synthetic",
        "synthetic[:CxHxW]",
        "class prototypes plus noise, for tests (synthetic:CxHxW picks the image shape)",
        read,
        order=80,
        doc="smooth random class prototypes plus noise, 10 classes, 512 + 128 images, fixed seed; the shape "
        "defaults to the model's input shape (tests)",
        split="fixed",
    )
)

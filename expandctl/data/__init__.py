"""Data for training, evaluation and analysis: data specs -> ``(train, val, num_classes, input_shape)``.

A spec is ``NAME`` or ``NAME:ARG`` (``digits``, ``cifar10:/data/c10``, ``imagefolder:DIR``, ...); the
sources are registered in :mod:`.registry`, one module each in :mod:`.sources` (see docs/train.md for the
list, generated from the registry). :func:`load_data` reads a spec and adapts the set to a model
(:class:`DataOptions`). Small sets live in memory as tensors (:class:`TensorImages`), augmented a batch
at a time.

The torch-free names (:class:`DataOptions`, the registry) are imported here directly. The others load
torch, so they are imported on first use (PEP 562 ``__getattr__`` below): the CLI's ``--help`` reads
:mod:`expandctl.data.registry`, and importing that runs this file first, which must not load torch.
"""

from __future__ import annotations

import importlib

from .files import data_home
from .idx import read_idx
from .options import AUGMENT_MODES, SPLIT_SEED, SUBSET_SEED, VAL_FRACTION, DataOptions
from .raw import ArraySplits, ImageFiles
from .registry import SOURCES, DataSource, parse_spec, register, sources, spec_help
from .sources.fashion_mnist import fashion_mnist_default_dir
from .sources.mnist5k import mnist5k_path
from .sources.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_TRAIN, SYNTHETIC_VAL

#: name -> module of the names that load torch (imported by ``__getattr__`` on first use).
_TORCH_NAMES = {
    "DataSplits": ".pipeline",
    "load_data": ".pipeline",
    "stratified_subset": ".pipeline",
    "TensorImages": ".transforms",
    "crop_flip": ".transforms",
    "random_crop": ".transforms",
    "random_flip": ".transforms",
    "resize": ".transforms",
    "to_channels": ".transforms",
    "split_per_class": ".folders",
}

__all__ = [
    "AUGMENT_MODES",
    "SOURCES",
    "SPLIT_SEED",
    "SUBSET_SEED",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_TRAIN",
    "SYNTHETIC_VAL",
    "VAL_FRACTION",
    "ArraySplits",
    "DataOptions",
    "DataSource",
    "ImageFiles",
    "data_home",
    "fashion_mnist_default_dir",
    "mnist5k_path",
    "parse_spec",
    "read_idx",
    "register",
    "sources",
    "spec_help",
    *_TORCH_NAMES,
]


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        value = getattr(importlib.import_module(_TORCH_NAMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TORCH_NAMES))

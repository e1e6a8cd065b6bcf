"""Training expanded models: data specs, objectives, the loop (``expandctl train``; docs/train.md).

>>> from expandctl.train import TrainConfig, train
>>> summary = train(TrainConfig(src="run/expanded.pt", data="digits", epochs=5, out="run"))

The Typer command lives in :mod:`expandctl.commands.train` (imported by the CLI only, so the library
does not pull in the console code).
"""

from ..data import DataSplits, TensorImages, load_data, parse_spec
from .loop import Callbacks, EpochContext, TrainConfig, TrainingDiverged, learning_rate, train
from .losses import kd_loss, product_l2, split_decay_parameters
from .precise_bn import batchnorm_layers, precise_batchnorm

__all__ = [
    "TrainConfig",
    "train",
    "Callbacks",
    "EpochContext",
    "TrainingDiverged",
    "learning_rate",
    "load_data",
    "parse_spec",
    "DataSplits",
    "TensorImages",
    "kd_loss",
    "product_l2",
    "split_decay_parameters",
    "precise_batchnorm",
    "batchnorm_layers",
]

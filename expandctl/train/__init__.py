"""Training expanded models: options, the loop, objectives (``expandctl train``; docs/train.md).

>>> from expandctl.train import TrainConfig, train
>>> summary = train(TrainConfig(src="run/expanded.pt", data="digits", epochs=5, out="run"))

Modules, one concept each: :mod:`.options` (:class:`TrainConfig`), :mod:`.loop` (:func:`train`, the
epochs), :mod:`.epoch` (one training pass, validation), :mod:`.state` (the run folder, resume,
checkpoints), :mod:`.rng` (random streams), :mod:`.distributed` (torchrun), :mod:`.loaders`,
:mod:`.distill` (teacher, KD), :mod:`.warmup` (nonlinear warm-up), :mod:`.callbacks` (what callers plug
in), :mod:`.losses`, :mod:`.precise_bn`, :mod:`.curves`. Data sets are read by :mod:`expandctl.data`.
The ``expandctl train`` command is :mod:`expandctl.commands.train` (the CLI imports it, not the library).
"""

from .callbacks import Callbacks, EpochContext
from .epoch import TrainingDiverged
from .loop import learning_rate, train
from .losses import kd_loss, product_l2, split_decay_parameters
from .options import DECAY_MODES, DEVICES, OPTIMIZERS, SCHEDULES, TrainConfig
from .precise_bn import batchnorm_layers, precise_batchnorm

__all__ = [
    "TrainConfig",
    "train",
    "Callbacks",
    "EpochContext",
    "TrainingDiverged",
    "learning_rate",
    "OPTIMIZERS",
    "SCHEDULES",
    "DECAY_MODES",
    "DEVICES",
    "kd_loss",
    "product_l2",
    "split_decay_parameters",
    "precise_batchnorm",
    "batchnorm_layers",
]

"""What a caller plugs into :func:`expandctl.train.train`: progress :class:`Callbacks` and epoch hooks.

Progress goes to a :class:`Callbacks` object (the CLI owns the console); per-epoch analyses (e.g.
gradient confusion) plug in as epoch hooks that see an :class:`EpochContext` and add metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..analysis.confusion import grad_confusion_hook
from .options import TrainConfig

__all__ = ["Callbacks", "EpochContext", "EpochHook", "with_builtin_hooks"]


class Callbacks:
    """Progress reports from :func:`train` (rank 0 only). Override what you need; all default to no-ops."""

    def on_start(self, info: dict) -> None:
        """Once, before the first epoch: model, data, device and where training starts."""

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        """``epoch`` is 1-based; ``steps`` mini-batches follow."""

    def on_step(self, step: int, steps: int, loss: float) -> None:
        """After each optimisation step (1-based)."""

    def on_epoch_end(self, metrics: dict, is_best: bool) -> None:
        """After the epoch's checkpoints are written; ``metrics`` is its ``metrics.jsonl`` row."""

    def on_end(self, summary: dict) -> None:
        """Once, after the last epoch and ``curves.png``."""


@dataclass
class EpochContext:
    """What an epoch hook sees, after validation and before the epoch's checkpoint is written.

    Hooks run on every rank (write files only where ``rank == 0``); a dict they return is merged
    into the epoch's metrics row. ``model`` is the bare model (not the DDP wrapper), in train mode.
    A hook that draws from the global generators draws from the states ``last.pt`` saves, so resume stays
    exact; one that must not move the training stream (gradient confusion) seeds a generator of its own.
    """

    epoch: int
    model: nn.Module
    train_data: Dataset
    val_data: Dataset
    device: torch.device
    metrics: dict
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    make_loader: Callable[..., DataLoader]
    rank: int = 0
    world_size: int = 1


EpochHook = Callable[[EpochContext], "dict | None"]


def with_builtin_hooks(config: TrainConfig, epoch_hooks: Sequence[EpochHook]) -> list[EpochHook]:
    """The caller's hooks, then those the config asks for (``grad_confusion``)."""
    hooks = list(epoch_hooks)
    if config.grad_confusion:  # measured from its own generator: the trajectory does not change
        hooks.append(grad_confusion_hook(config.grad_confusion_pairs, config.batch_size, config.seed))
    return hooks

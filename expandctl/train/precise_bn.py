"""Precise BatchNorm statistics: recompute every BatchNorm's running statistics with the final weights.

During training a BatchNorm's running mean and variance are exponential averages of batch statistics
taken while the weights moved; the eval-mode network uses them with the final weights. Where that
matters (the parallel-branch kinds' per-branch BatchNorms: a branch with a tiny running variance and
a large scale makes the eval-mode network hypersensitive to it; docs/evidence.md), recomputing them
over a few batches with the final weights, in train mode without gradients, fixes it ("precise BN",
Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

The pass is torch's :func:`torch.optim.swa_utils.update_bn`: every ``_BatchNorm`` of the model (the
branch BatchNorms of ``acb``, ``rep`` and ``dbb`` included) is reset and given ``momentum=None``,
torch's cumulative average, so ``N`` batches give the plain average of their ``N`` batch means and
variances; the momenta and the train/eval mode are restored afterwards.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from ..errors import UsageError

__all__ = ["batchnorm_layers", "precise_batchnorm", "shuffled_batches"]


def batchnorm_layers(model: nn.Module) -> list[str]:
    """The dotted paths of the BatchNorms whose running statistics a precise-BN pass recomputes."""
    return [
        path
        for path, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def precise_batchnorm(
    model: nn.Module, batches: Iterable, count: int, device: torch.device | str | None = None
) -> dict:
    """Recompute the running statistics of every BatchNorm of ``model`` (in place) over the first
    ``count`` items of ``batches`` (tensors, or ``(inputs, targets)`` pairs), with its current
    weights. Returns ``{"layers": number of BatchNorms, "batches": batches used, "images": images seen}``.
    A model without BatchNorm is left alone (``layers`` 0). Raises :class:`UsageError` for ``count < 1``
    or an empty ``batches``."""
    if count < 1:
        raise UsageError(f"precise_bn needs at least 1 batch (got {count})", option="precise_bn")
    layers = batchnorm_layers(model)
    if not layers:
        return {"layers": 0, "batches": 0, "images": 0}
    items = iter(batches)
    first = next(items, None)
    if first is None:  # before update_bn resets the statistics
        raise UsageError(
            "precise_bn: the training data gave no batch to recompute the BatchNorm statistics on", option="precise_bn"
        )
    seen = {"batches": 0, "images": 0}

    def counted():
        for item in itertools.islice(itertools.chain([first], items), count):
            x = item[0] if isinstance(item, (list, tuple)) else item
            seen["batches"] += 1
            seen["images"] += len(x)
            yield x

    update_bn(counted(), model, device=device)
    return {"layers": len(layers), **seen}


def shuffled_batches(dataset: Dataset, batch_size: int, seed: int):
    """The training set's images in batches, in an order drawn from a generator of its own seeded
    with ``seed`` (a training run's own generators are not touched); in-memory sets are read a batch
    per index list, as the training loop reads them."""
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    if getattr(dataset, "batched", False):
        loader = DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    for item in loader:
        yield item[0] if isinstance(item, (list, tuple)) else item

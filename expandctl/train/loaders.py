"""Data loaders of a run: the shuffled training shard and this rank's validation shard."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from ..data import DataSplits
from .distributed import Dist, shard
from .options import TrainConfig

__all__ = ["make_loader", "run_loaders", "batches"]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    sampler,
    workers: int,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ``sampler``; in-memory sets (``dataset.batched``) are read a batch per index list."""
    common = {"num_workers": workers, "generator": generator, "persistent_workers": False}
    if getattr(dataset, "batched", False):
        batch_sampler = BatchSampler(sampler, batch_size, drop_last=drop_last)
        return DataLoader(dataset, sampler=batch_sampler, batch_size=None, **common)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common)


def run_loaders(config: TrainConfig, data: DataSplits, d: Dist, loader_gen: torch.Generator):
    """``(train sampler, train loader, validation loader)``; each rank validates its own shard."""
    n_local = math.ceil(len(data.train) / d.world_size)
    # A last batch of one image would crash BatchNorm in train mode; drop it in that case only.
    drop_last = n_local % config.batch_size == 1
    if d.active:
        train_sampler = DistributedSampler(data.train, d.world_size, d.rank, shuffle=True, seed=config.seed)
    else:
        train_sampler = RandomSampler(data.train, generator=loader_gen)
    train_loader = make_loader(data.train, config.batch_size, train_sampler, config.workers, loader_gen, drop_last)
    val_loader = make_loader(data.val, config.batch_size, shard(len(data.val), d), config.workers, None)
    return train_sampler, train_loader, val_loader


def batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, targets)`` of each batch, on ``device``."""
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

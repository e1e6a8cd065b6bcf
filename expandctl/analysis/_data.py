"""Reading batches and restoring a model's state: what the analyses share. Never prints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..errors import UsageError


def read_batch(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` for ``indices``: one read for in-memory sets (``dataset.batched``), else per item."""
    idx = [int(i) for i in indices]
    if getattr(dataset, "batched", False):
        x, y = dataset[idx]
    else:
        xs, ys = zip(*(dataset[i] for i in idx))
        x, y = torch.stack(xs), torch.as_tensor(ys)
    return x, torch.as_tensor(y).long()


def in_order(dataset: Dataset, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """The first ``max_batches`` batches (all if ``None``) of ``dataset`` in its own order."""
    n = len(dataset)
    if n == 0:
        raise UsageError("the data split is empty")
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield read_batch(dataset, range(start, min(start + batch_size, n)))


def device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def to_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on the model's device, images in the model's floating dtype (a float64 checkpoint
    is analysed in float64; data sets deliver float32)."""
    p = next(model.parameters(), None)
    if p is None:
        return x, y
    dtype = p.dtype if (p.is_floating_point() and x.is_floating_point()) else x.dtype
    return x.to(p.device, dtype), y.to(p.device)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run something on ``model`` and put back what a train-mode forward or dropout would change:
    every module's train/eval flag, every buffer (BatchNorm running statistics and counters) and the
    global torch RNG of the model's device. A training run that measures something in between its
    epochs then follows exactly the trajectory it would have followed without the measurement."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    device = device_of(model)
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode


def seed_rng(seed: int, device: torch.device) -> None:
    """Seed the CPU generator (and the model's CUDA device only): call inside :func:`preserved`."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)

"""Restoring a model's state and seeding: what the analyses share. Never prints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


def device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


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

"""Data-parallel training under ``torchrun``: the process group, shards, and gradient all-reduce.

With ``WORLD_SIZE`` > 1 each process trains a shard with DistributedDataParallel (gloo on CPU, nccl on
GPU); only rank 0 writes files or reports progress. With one process every helper here is a no-op.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["Dist", "init_distributed", "leave_process_group", "shard", "all_reduce_grads", "no_sync"]


@dataclass
class Dist:
    """This process's place among the training processes."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """``values`` summed over all processes (exact: float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics, which drift apart across ranks) to every rank."""
        if self.active:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)


def init_distributed(kind: str) -> Dist:
    """The process group from ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    d = Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return d


def leave_process_group() -> None:
    """Destroy the process group while the interpreter is fully alive. The DDP wrapper's reducer
    holds the group (and gloo's worker threads and pending work); if a reference cycle keeps the
    wrapper alive past ``destroy_process_group``, the group is freed only at interpreter shutdown,
    where gloo's threads releasing tensors abort the process ("terminate called without an active
    exception", pytorch/pytorch#179291). Collecting the cycles first frees it here."""
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def shard(n: int, d: Dist) -> list[int]:
    """This rank's validation indices: every sample exactly once across ranks (no padding)."""
    return list(range(d.rank, n, d.world_size))


def all_reduce_grads(model: nn.Module, world_size: int) -> None:
    """Average the gradients over the processes (after micro-batches that ran unsynchronised)."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


def no_sync(net: nn.Module, d: Dist, sync: bool):
    """DDP's gradient all-reduce only on the backward that completes a step (``sync``)."""
    if d.active and not sync:
        return net.no_sync()
    return contextlib.nullcontext()

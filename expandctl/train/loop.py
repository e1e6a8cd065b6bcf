"""The training loop: :class:`TrainConfig` in, files in ``out/`` and a summary dict out. Never prints.

Progress goes to a :class:`Callbacks` object (the CLI owns the console); per-epoch analyses (e.g.
gradient confusion) plug in as ``epoch_hooks`` that see the model and data and add metrics.

Reproducibility: every random draw comes from seeded generators whose states (torch, the loader's
shuffling generator, Python ``random``, numpy, CUDA) are saved in ``last.pt`` after every epoch, so
``resume`` after a crash -- even ``kill -9`` mid-epoch -- replays the lost epoch exactly: on CPU the
final weights equal an uninterrupted run's bit for bit.

Multi-process: under ``torchrun`` (``WORLD_SIZE`` > 1) each process trains a shard with
DistributedDataParallel (gloo on CPU, nccl on GPU); only rank 0 writes files or reports progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from ..checkpoint import atomic_write, load_checkpoint, save
from ..data import DataOptions, DataSplits, load_data
from ..errors import ExpandctlError, UsageError
from ..layers import FORWARD_MODES, ChainLayer, ComposeOnce
from ..probe import DEVICES, check_fits, device_kind
from ..rewrite import contract, expanded_layers, set_forward
from .losses import kd_loss, product_l2, split_decay_parameters
from .precise_bn import precise_batchnorm, shuffled_batches

__all__ = [
    "TrainConfig",
    "Callbacks",
    "EpochContext",
    "TrainingDiverged",
    "train",
    "learning_rate",
    "OPTIMIZERS",
    "SCHEDULES",
    "DECAY_MODES",
    "DEVICES",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("paper", "step", "cosine")
DECAY_MODES = ("factors", "product")

#: Options that shape the trajectory: ``resume`` refuses to continue a run if any of them changed.
TRAJECTORY_FIELDS = (
    "data", "epochs", "batch_size", "lr", "optimizer", "momentum", "nesterov", "schedule",
    "weight_decay", "decay_on", "teacher", "kd_alpha", "kd_temperature", "nonlinear_warmup", "seed",
    "channels", "image_size", "augment", "train_subset", "accumulate", "val_fraction", "precise_bn",
)  # fmt: skip


_OUTPUT_FILES = {"last": "last.pt", "best": "best.pt", "metrics": "metrics.jsonl", "curves": "curves.png"}


class TrainingDiverged(ExpandctlError):
    """The loss became NaN or infinite; the last good checkpoint is kept (exit 1)."""

    exit_code = 1


@dataclass
class TrainConfig:
    """Everything ``expandctl train`` takes; field names match the command's options."""

    src: str
    data: str
    out: str = "run"
    epochs: int = 150
    batch_size: int = 128
    #: Mini-batches per optimizer step (gradient accumulation); fused layers compose once per step.
    accumulate: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "paper"
    weight_decay: float = 0.0
    decay_on: str = "factors"
    teacher: str | None = None
    #: Architecture of a plain state-dict SRC / teacher (expandctl checkpoints record their own).
    arch: str | None = None
    arch_kwargs: dict | None = None
    teacher_arch: str | None = None
    teacher_arch_kwargs: dict | None = None
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    nonlinear_warmup: int = 0
    forward: str = "fused"
    device: str = "auto"
    workers: int = 0
    seed: int = 0
    resume: bool = False
    trust_pickle: bool = False
    #: Record the minimum and mean gradient confusion on the training set after every epoch
    #: (``grad_confusion_min``/``_mean`` in metrics.jsonl; :mod:`expandctl.analysis.confusion`).
    grad_confusion: bool = False
    grad_confusion_pairs: int = 100
    #: Data adapters (:class:`expandctl.data.DataOptions`): --channels, --image-size, --augment,
    #: --train-subset; --download fetches a missing set into the cache.
    channels: int | None = None
    image_size: int | None = None
    augment: str | None = None
    train_subset: int | None = None
    download: bool = False
    #: --val-fraction: the held-out share of an image folder with class folders directly under it.
    val_fraction: float | None = None
    #: --precise-bn N: after the last epoch, recompute every BatchNorm's running statistics over N
    #: training batches with the final weights (:mod:`expandctl.train.precise_bn`); 0: off.
    precise_bn: int = 0
    #: The command line, recorded in the checkpoints' provenance.
    command: str | None = None

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the first bad option."""
        choices = {
            "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "decay_on": DECAY_MODES,
            "forward": FORWARD_MODES, "device": DEVICES,
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.accumulate >= 1, "--accumulate must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (not (self.nesterov and self.momentum == 0), "--nesterov needs a non-zero --momentum"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (0 <= self.kd_alpha <= 1, "--kd-alpha must be in [0, 1]"),
            (self.kd_temperature > 0, "--kd-temperature must be > 0"),
            (self.nonlinear_warmup >= 0, "--nonlinear-warmup must be >= 0"),
            (
                self.nonlinear_warmup < self.epochs,
                f"--nonlinear-warmup ({self.nonlinear_warmup}) must be smaller than --epochs "
                f"({self.epochs}): the ReLUs must come out before training ends",
            ),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.precise_bn >= 0, "--precise-bn must be >= 0 (0: off)"),
            (self.grad_confusion_pairs >= 1, "--grad-confusion-pairs must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        self.data_options()

    def data_options(self) -> DataOptions:
        """The data adapters, validated."""
        return DataOptions(
            self.channels, self.image_size, self.augment, self.train_subset, self.download, self.val_fraction
        ).validate()


def learning_rate(schedule: str, base: float, epoch: int, epochs: int) -> float:
    """The learning rate of 0-based ``epoch``.

    ``paper``: ``base``, ``base/10``, ``base/100`` for a third of the epochs each (ExpandNets: 50 + 50 + 50).
    ``step``: divided by 10 at 50% and again at 75% of the epochs. ``cosine``: half a cosine to 0.
    """
    if schedule == "paper":
        return base / 10 ** min(2, epoch * 3 // epochs)
    if schedule == "step":
        return base / 10 ** (int(epoch >= 0.5 * epochs) + int(epoch >= 0.75 * epochs))
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    raise UsageError(f"unknown schedule {schedule!r}")


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


# --------------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
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
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def _init_distributed(kind: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    d = _Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return d


# --------------------------------------------------------------------------------------------------
# Reproducibility state
# --------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(loader_gen: torch.Generator) -> dict:
    """Every generator's state, as tensors/lists/numbers (the checkpoint is ``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "loader": loader_gen.get_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, loader_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    loader_gen.set_state(state["loader"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Nonlinear initialisation
# --------------------------------------------------------------------------------------------------
def _relu_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return F.relu(output)


class _NonlinearWarmup:
    """The paper's "nonlinear init": a ReLU after every factor but the last, while attached.

    Implemented with forward hooks on the factors (the modules stay purely linear, so a checkpoint
    saved meanwhile is still contractible); needs the explicit chain, as a fused forward never calls
    the factors.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def attach(self) -> None:
        if self.attached:
            return
        set_forward(self.model, "explicit")
        for _, layer in expanded_layers(self.model):
            for factor in layer.factors[:-1]:
                self.handles.append(factor.register_forward_hook(_relu_output))

    def detach(self, forward: str) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        set_forward(self.model, forward)

    def finish(self, forward: str) -> None:
        """Detach if attached (the warm-up is over), else nothing."""
        if self.attached:
            self.detach(forward)


# --------------------------------------------------------------------------------------------------
# Data loading
# --------------------------------------------------------------------------------------------------
def _make_loader(
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
        batches = BatchSampler(sampler, batch_size, drop_last=drop_last)
        return DataLoader(dataset, sampler=batches, batch_size=None, **common)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common)


def _shard(n: int, d: _Dist) -> list[int]:
    """This rank's validation indices: every sample exactly once across ranks (no padding)."""
    return list(range(d.rank, n, d.world_size))


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def _write_metrics(path: Path, history: Sequence[dict]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))


def _write_curves(path: Path, history: Sequence[dict], title: str) -> None:
    if not history:
        return
    from .curves import plot_curves  # matplotlib is slow to import; only when plotting

    with atomic_write(path) as tmp:
        plot_curves(history, tmp, title)


def _remove_stale_temps(out: Path) -> None:
    """Temporary files a killed process left behind (``atomic_write`` names them ``.NAME.*.tmp``)."""
    for name in _OUTPUT_FILES.values():
        for tmp in out.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """State shared by the epoch functions."""

    config: TrainConfig
    model: nn.Module  # bare model
    net: nn.Module  # what the training step calls (the DDP wrapper under torchrun)
    optimizer: torch.optim.Optimizer
    device: torch.device
    dist: _Dist
    teacher: nn.Module | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    history: list[dict] = field(default_factory=list)


def train(
    config: TrainConfig,
    callbacks: Callbacks | None = None,
    epoch_hooks: Sequence[EpochHook] = (),
    data: DataSplits | None = None,
    teacher: nn.Module | None = None,
) -> dict:
    """Train ``config.src`` on ``config.data`` into ``config.out``; returns the run's summary.

    ``data`` (optional) are the splits to use instead of reading ``config.data`` (a training
    subset, a custom dataset); ``config.data`` then only names them in the metrics and checkpoints.
    ``teacher`` (optional) is a distillation teacher module to use instead of loading
    ``config.teacher`` (which then only names it); it is called in eval mode under no_grad.

    Raises :class:`UsageError` for bad options, missing files or a model that does not fit the data,
    and :class:`TrainingDiverged` when the loss stops being finite (``last.pt`` then still holds the
    last good epoch).
    """
    config.validate()
    callbacks = callbacks or Callbacks()
    kind = device_kind(config.device)
    d = _init_distributed(kind)
    try:
        summary = _train(config, callbacks, epoch_hooks, kind, d, data, teacher)
        if d.active:  # leave together: rank 0 may still be writing files; tearing gloo down under a
            dist.barrier()  # peer that is still connected aborted the process now and then
        return summary
    finally:
        if d.active and dist.is_initialized():
            _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group while the interpreter is fully alive. The DDP wrapper's reducer
    holds the group (and gloo's worker threads and pending work); if a reference cycle keeps the
    wrapper alive past ``destroy_process_group``, the group is freed only at interpreter shutdown,
    where gloo's threads releasing tensors abort the process ("terminate called without an active
    exception", pytorch/pytorch#179291). Collecting the cycles first frees it here."""
    import gc

    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def _train(
    config: TrainConfig, callbacks: Callbacks, epoch_hooks, kind: str, d: _Dist, data=None, teacher_module=None
) -> dict:
    started = time.perf_counter()
    out = Path(config.out)
    device = torch.device(f"cuda:{d.local_rank}" if kind == "cuda" else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    ckpt, state, parent_sha = _open_run(config, out / "last.pt")
    model = ckpt.model
    n_expanded = sum(1 for _ in expanded_layers(model))
    if config.nonlinear_warmup and not n_expanded:
        raise UsageError("--nonlinear-warmup needs expanded layers, and this model has none (run expandctl expand)")
    if config.nonlinear_warmup:
        branched = [f"{p} ({layer.kind})" for p, layer in expanded_layers(model) if not isinstance(layer, ChainLayer)]
        if branched:
            raise UsageError(
                "--nonlinear-warmup puts ReLUs between the factors of serial chains (fc, cl, ck); "
                f"parallel-branch layers have none: {', '.join(branched[:3])}"
            )
    if data is None:
        data = load_data(config.data, input_shape=ckpt.input_shape, options=config.data_options())
    model.to(device)
    if n_expanded:
        set_forward(model, config.forward)
    recorded = tuple(ckpt.input_shape) if ckpt.input_shape else None
    check_fits(model, data.val, config.data, data.num_classes, data.input_shape, device, expected=recorded)
    # What the model was just run on: adapters (--channels, --image-size) may differ from the source's shape.
    input_shape = tuple(data.input_shape) if data.input_shape else recorded
    warnings = [] if state is not None else _size_warnings(config, recorded, input_shape)

    _seed_everything(config.seed + d.rank)
    loader_gen = torch.Generator().manual_seed(config.seed)
    train_sampler, train_loader, val_loader = _loaders(config, data, d, loader_gen)
    optimizer = _build_optimizer(model, config)
    start_epoch, best_acc, best_epoch, history = _restore(state, optimizer, loader_gen, config, d)

    teacher = _load_teacher(config, device) if teacher_module is None else teacher_module.to(device).eval()
    net = model
    if d.active:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if kind == "cuda" else None)

    def autocast():
        if kind == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    epoch_hooks = _with_builtin_hooks(config, epoch_hooks)
    run = _Run(config, model, net, optimizer, device, d, teacher, autocast, history)
    meta = {
        "arch": ckpt.arch, "arch_kwargs": ckpt.arch_kwargs, "input_shape": input_shape, "plan": ckpt.plan,
        "parent_sha256": parent_sha, "command": config.command,
    }  # fmt: skip
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        if state is not None:  # lines written after the checkpoint we resume from are replayed
            _write_metrics(out / "metrics.jsonl", history)
        callbacks.on_start({
            "src": config.src, "data": config.data, "train_size": len(data.train), "val_size": len(data.val),
            "num_classes": data.num_classes, "input_shape": list(input_shape), "device": str(device),
            "world_size": d.world_size, "expanded_layers": n_expanded,
            "params": sum(p.numel() for p in model.parameters()), "start_epoch": start_epoch,
            "epochs": config.epochs, "resumed": state is not None, "out": str(out),
            "batch_size": config.batch_size, "steps_per_epoch": len(train_loader), "warnings": warnings,
        })  # fmt: skip

    loop = _EpochLoop(run, data, out, meta, callbacks, epoch_hooks, loader_gen, parent_sha, best_acc, best_epoch)
    for epoch in range(start_epoch, config.epochs):
        loop.run_epoch(epoch, train_sampler, train_loader, val_loader, start_epoch)
    loop.warmup.finish(config.forward)
    summary = {
        "out": str(out), "epochs": config.epochs, "start_epoch": start_epoch, "epochs_run": loop.epochs_run,
        "best_val_acc": loop.best_acc if loop.best_epoch else None, "best_epoch": loop.best_epoch or None,
        "final": history[-1] if history else None, "history": list(history),
        "seconds": round(time.perf_counter() - started, 3), "device": str(device), "world_size": d.world_size,
        "threads": torch.get_num_threads(),
        "files": {name: str(out / f) for name, f in _OUTPUT_FILES.items()}, "warnings": warnings,
    }  # fmt: skip
    if d.main:
        _write_curves(out / "curves.png", history, _title(config))
        callbacks.on_end(summary)
    return summary


def _size_warnings(config: TrainConfig, recorded, trained) -> list[str]:
    """A model that takes any image size trains at the data's size: say so when that is not the size
    its file records (it becomes the size the run's checkpoints record)."""
    from ..shapes import fmt_shape

    if not recorded or not trained or tuple(recorded) == tuple(trained):
        return []
    fix = (
        f" (pass --image-size {recorded[1]} to train at the recorded size)"
        if (len(recorded) == 3 and recorded[1] == recorded[2] and tuple(recorded[1:]) != tuple(trained[1:]))
        else ""
    )
    return [
        f"{config.src} records input shape {fmt_shape(recorded)} but --data {config.data} gives "
        f"{fmt_shape(trained)} images: training at {fmt_shape(trained)}, and the run's checkpoints record "
        f"{fmt_shape(trained)}{fix}"
    ]


def _open_run(config: TrainConfig, last_path: Path):
    """``(checkpoint, training state or None, parent sha256)``: the source model for a new run, or
    ``last.pt`` and its optimizer/RNG state for ``--resume``."""
    if config.resume:
        if not last_path.is_file():
            raise UsageError(f"--resume: {last_path} does not exist; start the run without --resume")
        ckpt = load_checkpoint(last_path, trust_pickle=config.trust_pickle)
        state = (ckpt.extra or {}).get("train")
        if not isinstance(state, dict) or "optimizer" not in state:
            raise UsageError(f"--resume: {last_path} holds no training state (was it written by expandctl train?)")
        _check_same_run(config, state["config"], last_path)
        parent_sha = state.get("parent_sha256")
    else:
        if last_path.exists():
            raise UsageError(
                f"{last_path.parent} already holds a run ({last_path.name}); continue it with --resume, "
                "or pick another --out"
            )
        ckpt = load_checkpoint(config.src, config.arch, config.arch_kwargs, trust_pickle=config.trust_pickle)
        _check_finite(ckpt.model, config.src)  # as contract and export do: exit 2 naming the parameter
        state, parent_sha = None, ckpt.sha256
    if not ckpt.arch:
        raise UsageError(f"cannot tell which architecture {config.src} is; pass --arch so checkpoints can be written")
    return ckpt, state, parent_sha


def _loaders(config: TrainConfig, data: DataSplits, d: _Dist, loader_gen: torch.Generator):
    """``(train sampler, train loader, validation loader)``; each rank validates its own shard."""
    n_local = math.ceil(len(data.train) / d.world_size)
    # A last batch of one image would crash BatchNorm in train mode; drop it in that case only.
    drop_last = n_local % config.batch_size == 1
    if d.active:
        train_sampler = DistributedSampler(data.train, d.world_size, d.rank, shuffle=True, seed=config.seed)
    else:
        train_sampler = RandomSampler(data.train, generator=loader_gen)
    train_loader = _make_loader(data.train, config.batch_size, train_sampler, config.workers, loader_gen, drop_last)
    val_loader = _make_loader(data.val, config.batch_size, _shard(len(data.val), d), config.workers, None)
    return train_sampler, train_loader, val_loader


def _restore(state: dict | None, optimizer, loader_gen: torch.Generator, config: TrainConfig, d: _Dist):
    """``(start epoch, best accuracy, best epoch, history)``, from a resumed run's state (optimizer
    and random streams put back) or for a fresh start."""
    if state is None:
        return 0, -1.0, 0, []
    optimizer.load_state_dict(state["optimizer"])
    start_epoch = int(state["epoch"])
    _set_rng_state(state["rng"], loader_gen)
    if d.rank > 0:  # only rank 0's generators are saved; give the others fresh, distinct streams
        torch.manual_seed(config.seed + d.rank + 7919 * start_epoch)
    return start_epoch, float(state["best_val_acc"]), int(state["best_epoch"]), list(state["history"])


def _with_builtin_hooks(config: TrainConfig, epoch_hooks) -> list:
    hooks = list(epoch_hooks)
    if config.grad_confusion:  # measured from its own generator: the trajectory does not change
        from ..analysis.confusion import grad_confusion_hook

        hooks.append(grad_confusion_hook(config.grad_confusion_pairs, config.batch_size, config.seed))
    return hooks


class _EpochLoop:
    """One epoch at a time: learning rate, nonlinear warm-up, training, validation, hooks, checkpoints."""

    def __init__(
        self, run: _Run, data, out: Path, meta, callbacks, hooks, loader_gen, parent_sha, best_acc, best_epoch
    ):
        self.run, self.data, self.out, self.meta = run, data, out, meta
        self.callbacks, self.hooks, self.loader_gen, self.parent_sha = callbacks, hooks, loader_gen, parent_sha
        self.best_acc, self.best_epoch, self.epochs_run = best_acc, best_epoch, 0
        self.warmup = _NonlinearWarmup(run.model)

    def run_epoch(self, epoch: int, train_sampler, train_loader, val_loader, start_epoch: int) -> None:
        run, config, d = self.run, self.run.config, self.run.dist
        if epoch < config.nonlinear_warmup:
            self.warmup.attach()
        else:
            self.warmup.finish(config.forward)
        lr = learning_rate(config.schedule, config.lr, epoch, config.epochs)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        if isinstance(train_sampler, DistributedSampler):
            train_sampler.set_epoch(epoch)

        t0 = time.perf_counter()
        if d.main:
            self.callbacks.on_epoch_start(epoch + 1, config.epochs, len(train_loader))
        try:
            train_loss, train_acc, seen = _train_epoch(run, train_loader, epoch, self.callbacks)
        except TrainingDiverged as e:
            last_path = self.out / "last.pt"
            if d.main:
                _write_curves(self.out / "curves.png", run.history, _title(config))
            kept = "no checkpoint was written"
            if last_path.exists():
                kept = f"{last_path} still holds epoch {start_epoch + self.epochs_run}"
            raise TrainingDiverged(f"{e}; stopped, {kept}; try a lower --lr") from None
        train_seconds = time.perf_counter() - t0
        precise = _precise_bn(run, self.data.train) if config.precise_bn and epoch + 1 == config.epochs else None
        val_loss, val_acc = _evaluate(run, val_loader)
        metrics = {
            "epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
            "val_acc": val_acc, "seconds": round(time.perf_counter() - t0, 3),
            "images_per_s": round(seen / max(train_seconds, 1e-9), 1),
        }  # fmt: skip
        if self.warmup.attached:
            metrics["nonlinear"] = True
        if precise is not None:
            metrics["precise_bn_batches"], metrics["precise_bn_layers"] = precise["batches"], precise["layers"]
        self._hooks(epoch, metrics)

        # Best by validation accuracy, among linear epochs only: during the nonlinear warmup the
        # validated network has ReLUs the saved (linear) checkpoint does not.
        is_best = not self.warmup.attached and val_acc > self.best_acc
        if is_best:
            self.best_acc, self.best_epoch = val_acc, epoch + 1
        run.history.append(metrics)
        if d.main:
            _save_epoch(run, self.out, self.meta, epoch + 1, is_best, self.best_acc, self.best_epoch,
                        self.loader_gen, self.parent_sha)  # fmt: skip
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            self.callbacks.on_epoch_end(metrics, is_best)
        self.epochs_run += 1

    def _hooks(self, epoch: int, metrics: dict) -> None:
        run, config, d, data = self.run, self.run.config, self.run.dist, self.data
        ctx = EpochContext(
            epoch + 1, run.model, data.train, data.val, run.device, metrics, _ce,
            lambda ds, batch_size=config.batch_size, sampler=None: _make_loader(
                ds, batch_size, sampler if sampler is not None else range(len(ds)), 0, None),
            d.rank, d.world_size,
        )  # fmt: skip
        for hook in self.hooks:
            extra = hook(ctx)
            if extra:
                metrics.update(extra)


def _title(config: TrainConfig) -> str:
    return f"{Path(config.src).name} on {config.data}"


def _check_same_run(config: TrainConfig, saved: dict, path: Path) -> None:
    ignored = set()
    if not config.teacher and not saved.get("teacher"):
        ignored |= {"kd_alpha", "kd_temperature"}  # no distillation: these do nothing
    if config.weight_decay == 0 and not saved.get("weight_decay"):
        ignored.add("decay_on")
    changed = [
        f"--{name.replace('_', '-')} {getattr(config, name)!r} (the run has {saved.get(name)!r})"
        for name in TRAJECTORY_FIELDS
        if name in saved and name not in ignored and getattr(config, name) != saved[name]
    ]
    if changed:
        raise UsageError(
            f"--resume continues {path} with the options it was started with; these differ: {'; '.join(changed)}"
        )


def _build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.decay_on == "product" and config.weight_decay > 0:
        # Product L2 is a loss term (losses.product_l2); the factors get no decay of their own.
        factors, others = split_decay_parameters(model)
        groups = [
            {"params": others, "weight_decay": config.weight_decay},
            {"params": factors, "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": config.weight_decay}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr)


def _check_finite(model: nn.Module, where: str) -> None:
    """NaN or inf weights would only show up as a NaN loss an epoch later, blamed on --lr."""
    from ..verify import check_finite

    try:
        check_finite(model)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None


def _load_teacher(config: TrainConfig, device: torch.device) -> nn.Module | None:
    if not config.teacher:
        return None
    ckpt = load_checkpoint(config.teacher, config.teacher_arch, config.teacher_arch_kwargs, config.trust_pickle)
    _check_finite(ckpt.model, f"--teacher {config.teacher}")
    teacher = contract(ckpt.model, inplace=True)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


def _batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _train_epoch(run: _Run, loader: DataLoader, epoch: int, callbacks: Callbacks) -> tuple[float, float, int]:
    """One pass over the training shard: ``(mean loss, accuracy, images seen by all ranks)``.

    With ``--accumulate N`` each optimizer step sums the gradients of N mini-batches (the objective
    is their mean loss; the last step of an epoch may have fewer); fused expanded layers then
    compose their kernels once per step (:class:`~expandctl.layers.ComposeOnce`).
    """
    config, d = run.config, run.dist
    run.net.train()
    product = config.decay_on == "product" and config.weight_decay > 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    n = 0
    steps = len(loader)
    once = _compose_once(run)
    try:
        for step, (x, y) in enumerate(_batches(loader, run.device), start=1):
            size = min(config.accumulate, steps - (step - 1) // config.accumulate * config.accumulate)
            last = step % config.accumulate == 0 or step == steps
            # Plain accumulation lets DDP all-reduce on the step's last backward; with ComposeOnce the
            # factors get their gradients only after it, so every backward runs unsynchronised.
            sync = last and once is None
            if (step - 1) % config.accumulate == 0:
                run.optimizer.zero_grad(set_to_none=True)
                if once is not None:
                    once.__enter__()
            with _no_sync(run, sync), run.autocast():
                logits = run.net(x)
                if run.teacher is not None:
                    with torch.no_grad():
                        teacher_logits = run.teacher(x)
                    loss = kd_loss(logits, teacher_logits, y, config.kd_alpha, config.kd_temperature)
                else:
                    loss = _ce(logits, y)
            value = loss.item()
            bad = 0.0 if math.isfinite(value) else 1.0
            if d.active:  # every rank must stop at the same step, or the others hang in all-reduce
                bad = d.all_sum([bad], run.device)[0]
            if bad:
                raise TrainingDiverged(f"the loss became {value} at epoch {epoch + 1}, step {step} of {steps}")
            objective = loss if size == 1 else loss / size
            if product and (once is None or last):  # with ComposeOnce the penalty enters once per step
                penalty = product_l2(run.model, config.weight_decay)
                if penalty is not None:
                    objective = objective + (penalty if once is not None or size == 1 else penalty / size)
            with _no_sync(run, sync):
                objective.backward()
            if last:
                if once is not None:
                    once.backward()
                    once.__exit__(None, None, None)
                    if d.active:  # the micro-batches ran unsynchronised: average the summed gradients
                        _all_reduce_grads(run.model, d.world_size)
                run.optimizer.step()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            n += len(y)
            if d.main:
                callbacks.on_step(step, steps, value)
    finally:
        if once is not None:  # never leave held kernels behind (divergence, interrupt)
            once.__exit__(None, None, None)
    total_loss, total_correct, total_n = d.all_sum([loss_sum.item(), float(correct.item()), float(n)], run.device)
    return total_loss / max(total_n, 1), total_correct / max(total_n, 1), int(total_n)


def _compose_once(run: _Run) -> ComposeOnce | None:
    """Gradient accumulation over fused expanded layers: compose their kernels once per step."""
    if run.config.accumulate == 1:
        return None
    layers = [layer for _, layer in expanded_layers(run.model) if layer.forward_mode == "fused"]
    return ComposeOnce(layers) if layers else None


def _no_sync(run: _Run, sync: bool):
    """DDP's gradient all-reduce only on the backward that completes a step (``sync``)."""
    if run.dist.active and not sync:
        return run.net.no_sync()
    return contextlib.nullcontext()


def _all_reduce_grads(model: nn.Module, world_size: int) -> None:
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


def _precise_bn(run: _Run, train_set: Dataset) -> dict:
    """Precise BatchNorm statistics after the last epoch, before it is validated and saved: the
    first ``--precise-bn`` batches of the training set in an order of their own (seeded with
    ``--seed``; the training RNG that ``last.pt`` saves is untouched). Every rank runs the same
    batches on the unwrapped model (no collective), so all ranks end with the same statistics."""
    batches = shuffled_batches(train_set, run.config.batch_size, run.config.seed)
    return precise_batchnorm(run.model, batches, run.config.precise_bn, run.device)


@torch.no_grad()
def _evaluate(run: _Run, loader: DataLoader) -> tuple[float, float]:
    """Cross-entropy and accuracy on the validation set (each rank its shard, summed exactly)."""
    model, d = run.model, run.dist
    if d.active:  # after the last step other ranks' BN statistics drifted from rank 0's, which is saved
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in _batches(loader, run.device):
        with run.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train()
    loss_sum, correct, n = d.all_sum([loss_sum, float(correct), float(n)], run.device)
    return loss_sum / max(n, 1), correct / max(n, 1)


def _save_epoch(
    run: _Run,
    out: Path,
    meta: dict,
    epoch: int,
    is_best: bool,
    best_acc: float,
    best_epoch: int,
    loader_gen: torch.Generator,
    parent_sha: str | None,
) -> None:
    """best.pt (if improved) before last.pt: a crash between the two replays this epoch from the
    previous last.pt, which rewrites best.pt identically; the other order could lose the best."""
    config = dataclasses.asdict(run.config)
    if is_best:
        record = {"epoch": epoch, "val_acc": best_acc, "metrics": run.history[-1], "config": config}
        save(run.model, out / "best.pt", extra={"train": record}, **meta)
    state = {
        "epoch": epoch,
        "optimizer": run.optimizer.state_dict(),
        "rng": _rng_state(loader_gen),
        "best_val_acc": best_acc,
        "best_epoch": best_epoch,
        "history": list(run.history),
        "config": config,
        "parent_sha256": parent_sha,
        "world_size": run.dist.world_size,
    }
    save(run.model, out / "last.pt", extra={"train": state}, **meta)

"""The training loop: :class:`TrainConfig` in, files in ``out/`` and a summary dict out. Never prints.

The pieces live beside it: options (:mod:`.options`), the random streams (:mod:`.rng`), the run folder
and resume (:mod:`.state`), processes (:mod:`.distributed`), loaders (:mod:`.loaders`), the epoch pass
(:mod:`.epoch`), distillation (:mod:`.distill`), the nonlinear warm-up (:mod:`.warmup`), what callers
plug in (:mod:`.callbacks`). See docs/train.md.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data.distributed import DistributedSampler

from ..checkpoint import Checkpoint
from ..data import DataSplits, load_data
from ..errors import UsageError
from ..probe import check_fits, device_kind
from ..rewrite import expanded_layers, set_forward
from ..shapes import fmt_shape
from .callbacks import Callbacks, EpochContext, EpochHook, with_builtin_hooks
from .distill import load_teacher
from .distributed import Dist, init_distributed, leave_process_group
from .epoch import TrainingDiverged, evaluate, train_epoch
from .loaders import make_loader, run_loaders
from .losses import cross_entropy, split_decay_parameters
from .options import TrainConfig
from .precise_bn import precise_batchnorm, shuffled_batches
from .rng import seed_everything
from .state import OUTPUT_FILES, Run, open_run, prepare_folder, restore, save_epoch, write_curves
from .warmup import NonlinearWarmup, check_warmup

__all__ = ["train", "learning_rate"]


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
    raise UsageError(f"unknown schedule {schedule!r}", option="schedule")


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; with product L2 the factors get no decay of their own (it is a loss term)."""
    if config.decay_on == "product" and config.weight_decay > 0:
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

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process trains a shard with DistributedDataParallel;
    only rank 0 writes files or calls ``callbacks``.

    Raises :class:`UsageError` for bad options, missing files or a model that does not fit the data,
    and :class:`TrainingDiverged` when the loss stops being finite (``last.pt`` then still holds the
    last good epoch).
    """
    config.validate()
    callbacks = callbacks or Callbacks()
    kind = device_kind(config.device)
    d = init_distributed(kind)
    try:
        summary = _train(config, callbacks, epoch_hooks, kind, d, data, teacher)
        if d.active:  # leave together: rank 0 may still be writing files; tearing gloo down under a
            dist.barrier()  # peer that is still connected aborted the process now and then
        return summary
    finally:
        if d.active and dist.is_initialized():
            leave_process_group()


def _train(
    config: TrainConfig, callbacks: Callbacks, epoch_hooks, kind: str, d: Dist, data=None, teacher_module=None
) -> dict:
    started = time.perf_counter()
    out = Path(config.out)
    device = torch.device(f"cuda:{d.local_rank}" if kind == "cuda" else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    ckpt, state, parent_sha = open_run(config, out / OUTPUT_FILES["last"])
    data, input_shape, warnings = _prepare_model(config, ckpt, data, device, resumed=state is not None)

    seed_everything(config.seed + d.rank)
    loader_gen = torch.Generator().manual_seed(config.seed)
    train_sampler, train_loader, val_loader = run_loaders(config, data, d, loader_gen)
    optimizer = build_optimizer(ckpt.model, config)
    start_epoch, best_acc, best_epoch, history = restore(state, optimizer, loader_gen, config.seed, d)
    teacher = load_teacher(config, device, teacher_module)
    meta = {
        "arch": ckpt.arch, "arch_kwargs": ckpt.arch_kwargs, "input_shape": input_shape, "plan": ckpt.plan,
        "parent_sha256": parent_sha, "command": config.command,
    }  # fmt: skip
    run = Run(config, ckpt.model, _wrap(ckpt.model, d, device), optimizer, device, d, teacher, _autocast(kind),
              loader_gen, out, meta, history)  # fmt: skip
    if d.main:
        prepare_folder(out, history if state is not None else None)
        callbacks.on_start({
            "src": config.src, "data": config.data, "train_size": len(data.train), "val_size": len(data.val),
            "num_classes": data.num_classes, "input_shape": list(input_shape), "device": str(device),
            "world_size": d.world_size, "expanded_layers": sum(1 for _ in expanded_layers(run.model)),
            "params": sum(p.numel() for p in run.model.parameters()), "start_epoch": start_epoch,
            "epochs": config.epochs, "resumed": state is not None, "out": str(out),
            "batch_size": config.batch_size, "steps_per_epoch": len(train_loader), "warnings": warnings,
        })  # fmt: skip

    loop = _EpochLoop(run, data, callbacks, with_builtin_hooks(config, epoch_hooks), best_acc, best_epoch)
    for epoch in range(start_epoch, config.epochs):
        loop.run_epoch(epoch, train_sampler, train_loader, val_loader, start_epoch)
    loop.warmup.finish(config.forward)
    summary = {
        "out": str(out), "epochs": config.epochs, "start_epoch": start_epoch, "epochs_run": loop.epochs_run,
        "best_val_acc": loop.best_acc if loop.best_epoch else None, "best_epoch": loop.best_epoch or None,
        "final": history[-1] if history else None, "history": list(history),
        "seconds": round(time.perf_counter() - started, 3), "device": str(device), "world_size": d.world_size,
        "threads": torch.get_num_threads(),
        "files": {name: str(out / f) for name, f in OUTPUT_FILES.items()}, "warnings": warnings,
    }  # fmt: skip
    if d.main:
        write_curves(run)
        callbacks.on_end(summary)
    return summary


def _prepare_model(config: TrainConfig, ckpt: Checkpoint, data: DataSplits | None, device: torch.device, resumed: bool):
    """``(data, input shape, warnings)``: the data read (unless given), the model on ``device`` in its
    forward mode and checked against two images; the input shape is what the model was just run on
    (adapters such as ``image_size`` may differ from the source's shape)."""
    model = ckpt.model
    if config.nonlinear_warmup:
        check_warmup(model)
    if data is None:
        data = load_data(config.data, input_shape=ckpt.input_shape, options=config.data_options)
    model.to(device)
    if any(True for _ in expanded_layers(model)):
        set_forward(model, config.forward)
    recorded = tuple(ckpt.input_shape) if ckpt.input_shape else None
    check_fits(model, data.val, config.data, data.num_classes, data.input_shape, device, expected=recorded)
    input_shape = tuple(data.input_shape) if data.input_shape else recorded
    warnings = [] if resumed else _size_warnings(config, recorded, input_shape)
    return data, input_shape, warnings


def _wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """What the training step calls: the DDP wrapper under ``torchrun``, else the model."""
    if not d.active:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _autocast(kind: str):
    """bf16 autocast on CUDA, nothing on CPU."""

    def autocast():
        if kind == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return autocast


def _size_warnings(config: TrainConfig, recorded, trained) -> list[str]:
    """A model that takes any image size trains at the data's size: say so when that is not the size
    its file records (it becomes the size the run's checkpoints record)."""
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


class _EpochLoop:
    """One epoch at a time: learning rate, nonlinear warm-up, training, validation, hooks, checkpoints."""

    def __init__(self, run: Run, data: DataSplits, callbacks: Callbacks, hooks, best_acc: float, best_epoch: int):
        self.run, self.data, self.callbacks, self.hooks = run, data, callbacks, hooks
        self.best_acc, self.best_epoch, self.epochs_run = best_acc, best_epoch, 0
        self.warmup = NonlinearWarmup(run.model)

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
        train_loss, train_acc, seen = self._train(train_loader, epoch, start_epoch)
        train_seconds = time.perf_counter() - t0
        precise = self._precise_bn() if config.precise_bn and epoch + 1 == config.epochs else None
        val_loss, val_acc = evaluate(run, val_loader)
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
            save_epoch(run, epoch + 1, is_best, self.best_acc, self.best_epoch)
            self.callbacks.on_epoch_end(metrics, is_best)
        self.epochs_run += 1

    def _train(self, train_loader, epoch: int, start_epoch: int) -> tuple[float, float, int]:
        """:func:`train_epoch`; on divergence write the curves so far and say which checkpoint is kept."""
        run = self.run
        try:
            return train_epoch(run, train_loader, epoch, self.callbacks)
        except TrainingDiverged as e:
            last_path = run.out / OUTPUT_FILES["last"]
            if run.dist.main:
                write_curves(run)
            kept = "no checkpoint was written"
            if last_path.exists():
                kept = f"{last_path} still holds epoch {start_epoch + self.epochs_run}"
            raise TrainingDiverged(f"{e}; stopped, {kept}; try a lower lr", option="lr") from None

    def _precise_bn(self) -> dict:
        """Precise BatchNorm statistics after the last epoch, before it is validated and saved: the
        first ``precise_bn`` batches of the training set in an order of their own (seeded with
        ``seed``; the training RNG that ``last.pt`` saves is untouched). Every rank runs the same
        batches on the unwrapped model (no collective), so all ranks end with the same statistics."""
        run = self.run
        batches = shuffled_batches(self.data.train, run.config.batch_size, run.config.seed)
        return precise_batchnorm(run.model, batches, run.config.precise_bn, run.device)

    def _hooks(self, epoch: int, metrics: dict) -> None:
        run, config, d, data = self.run, self.run.config, self.run.dist, self.data
        ctx = EpochContext(
            epoch + 1, run.model, data.train, data.val, run.device, metrics, cross_entropy,
            lambda ds, batch_size=config.batch_size, sampler=None: make_loader(
                ds, batch_size, sampler if sampler is not None else range(len(ds)), 0, None),
            d.rank, d.world_size,
        )  # fmt: skip
        for hook in self.hooks:
            extra = hook(ctx)
            if extra:
                metrics.update(extra)

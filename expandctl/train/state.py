"""A run's state on disk: the run folder (``last.pt``, ``best.pt``, ``metrics.jsonl``, ``curves.png``),
opening a new run or resuming one, and the per-epoch checkpoints that make resume exact."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import Checkpoint, atomic_write, load_checkpoint, save
from ..errors import UsageError
from ..verify import check_finite as check_weights_finite
from .curves import plot_curves
from .distributed import Dist
from .options import TRAJECTORY_FIELDS, TrainConfig
from .rng import rng_state, set_rng_state

__all__ = ["OUTPUT_FILES", "Run", "open_run", "restore", "save_epoch", "check_finite"]

#: What a run folder holds, by summary key.
OUTPUT_FILES = {"last": "last.pt", "best": "best.pt", "metrics": "metrics.jsonl", "curves": "curves.png"}


@dataclass
class Run:
    """A run in progress: what the epoch functions share."""

    config: TrainConfig
    model: nn.Module  # bare model
    net: nn.Module  # what the training step calls (the DDP wrapper under torchrun)
    optimizer: torch.optim.Optimizer
    device: torch.device
    dist: Dist
    teacher: nn.Module | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    loader_gen: torch.Generator
    out: Path
    #: What every checkpoint of the run records beside the weights (:func:`expandctl.checkpoint.save`).
    meta: dict
    history: list[dict] = field(default_factory=list)


def check_finite(model: nn.Module, where: str, option: str | None = None) -> None:
    """NaN or inf weights would only show up as a NaN loss an epoch later, blamed on the learning rate."""
    try:
        check_weights_finite(model)
    except UsageError as e:
        raise UsageError(f"{where}: {e}", option=option) from None


def open_run(config: TrainConfig, last_path: Path) -> tuple[Checkpoint, dict | None, str | None]:
    """``(checkpoint, training state or None, parent sha256)``: the source model for a new run, or
    ``last.pt`` and its optimizer/RNG state for ``config.resume``."""
    if config.resume:
        if not last_path.is_file():
            raise UsageError(f"resume: {last_path} does not exist; start the run without resume", option="resume")
        ckpt = load_checkpoint(last_path, trust_pickle=config.trust_pickle)
        state = (ckpt.extra or {}).get("train")
        if not isinstance(state, dict) or "optimizer" not in state:
            raise UsageError(
                f"resume: {last_path} holds no training state (was it written by expandctl train?)", option="resume"
            )
        _check_same_run(config, state["config"], last_path)
        parent_sha = state.get("parent_sha256")
    else:
        if last_path.exists():
            raise UsageError(
                # not option "out": a folder named "out" would be reworded too
                f"{last_path.parent} already holds a run ({last_path.name}); continue it with resume, "
                "or pick another output folder",
                option="resume",
            )
        ckpt = load_checkpoint(config.src, config.arch, config.arch_kwargs, trust_pickle=config.trust_pickle)
        check_finite(ckpt.model, config.src)  # as contract and export do: exit 2 naming the parameter
        state, parent_sha = None, ckpt.sha256
    if not ckpt.arch:
        raise UsageError(
            f"cannot tell which architecture {config.src} is; pass arch so checkpoints can be written", option="arch"
        )
    return ckpt, state, parent_sha


def _check_same_run(config: TrainConfig, saved: dict, path: Path) -> None:
    ignored = set()
    if not config.teacher and not saved.get("teacher"):
        ignored |= {"kd_alpha", "kd_temperature"}  # no distillation: these do nothing
    if config.weight_decay == 0 and not saved.get("weight_decay"):
        ignored.add("decay_on")
    given = config.to_dict()
    names = [name for name in TRAJECTORY_FIELDS if name in saved and name not in ignored and given[name] != saved[name]]
    changed = [f"{name} {given[name]!r} (the run has {saved[name]!r})" for name in names]
    if changed:
        raise UsageError(
            f"resume continues {path} with the options it was started with; these differ: {'; '.join(changed)}",
            option=("resume", *names),
        )


def restore(state: dict | None, optimizer: torch.optim.Optimizer, loader_gen: torch.Generator, seed: int, d: Dist):
    """``(start epoch, best accuracy, best epoch, history)``, from a resumed run's state (optimizer
    and random streams put back) or for a fresh start."""
    if state is None:
        return 0, -1.0, 0, []
    optimizer.load_state_dict(state["optimizer"])
    start_epoch = int(state["epoch"])
    set_rng_state(state["rng"], loader_gen)
    if d.rank > 0:  # only rank 0's generators are saved; give the others fresh, distinct streams
        torch.manual_seed(seed + d.rank + 7919 * start_epoch)
    return start_epoch, float(state["best_val_acc"]), int(state["best_epoch"]), list(state["history"])


def prepare_folder(out: Path, history: Sequence[dict] | None) -> None:
    """Create ``out`` and remove temporary files a killed process left behind (``atomic_write`` names
    them ``.NAME.*.tmp``); on resume (``history`` given) rewrite ``metrics.jsonl`` to the checkpoint's
    epochs: lines written after the checkpoint we resume from are replayed."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES.values():
        for tmp in out.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
    if history is not None:
        with atomic_write(out / OUTPUT_FILES["metrics"]) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in history))


def save_epoch(run: Run, epoch: int, is_best: bool, best_acc: float, best_epoch: int) -> None:
    """best.pt (if improved) before last.pt, then the epoch's ``metrics.jsonl`` line: a crash between
    the two checkpoints replays this epoch from the previous last.pt, which rewrites best.pt
    identically; the other order could lose the best."""
    config = run.config.to_dict()
    if is_best:
        record = {"epoch": epoch, "val_acc": best_acc, "metrics": run.history[-1], "config": config}
        save(run.model, run.out / OUTPUT_FILES["best"], extra={"train": record}, **run.meta)
    state = {
        "epoch": epoch,
        "optimizer": run.optimizer.state_dict(),
        "rng": rng_state(run.loader_gen),
        "best_val_acc": best_acc,
        "best_epoch": best_epoch,
        "history": list(run.history),
        "config": config,
        "parent_sha256": run.meta["parent_sha256"],
        "world_size": run.dist.world_size,
    }
    save(run.model, run.out / OUTPUT_FILES["last"], extra={"train": state}, **run.meta)
    with open(run.out / OUTPUT_FILES["metrics"], "a") as f:
        f.write(json.dumps(run.history[-1]) + "\n")


def write_curves(run: Run) -> None:
    """``curves.png`` from the epochs so far (none yet: nothing)."""
    if not run.history:
        return
    with atomic_write(run.out / OUTPUT_FILES["curves"]) as tmp:
        plot_curves(run.history, tmp, f"{Path(run.config.src).name} on {run.config.data}")

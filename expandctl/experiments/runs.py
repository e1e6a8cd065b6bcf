"""Run bookkeeping for seed studies: one finished run = one JSON file, claims by file lock, resume.

The engine under ``expandctl compare``, ``examples/reproduce.py`` and ``examples/figures.py``:

* a run trains in its own work folder (``src.pt``, then the training loop's ``last.pt``); a folder
  that already holds ``last.pt`` is resumed, which replays a killed run exactly
  (:mod:`expandctl.train.loop`);
* :func:`train_contracted` trains, contracts, checks the contraction in float64 and scores the
  *contracted* model on the validation set on its own;
* :func:`finish_run` writes the run's JSON atomically; that file marks the run finished, and a
  later invocation skips it;
* :func:`claim` takes a run's lock (``fcntl.flock``), so that several processes, on one machine or
  on several sharing a folder, never train the same run twice; the kernel drops the lock of a
  process that dies, and the next claimer resumes its run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..checkpoint import atomic_write, load_checkpoint, save
from ..data import DataSplits
from ..errors import CheckFailed, UsageError
from ..evaluate import evaluate_torch
from ..rewrite import contract, expanded_layers
from ..train import Callbacks, TrainConfig, train
from ..verify import check_contraction

__all__ = [
    "Lock",
    "claim",
    "finish_run",
    "read_run",
    "read_runs",
    "check_settings",
    "Trained",
    "train_contracted",
    "TRAINING_STATE",
]

#: What only a resume needs; dropped once the run's JSON is written.
TRAINING_STATE = ("last.pt", "best.pt", "src.pt")


# --------------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------------
class Lock:
    """An exclusive ``flock`` on a file, held while the file descriptor is open (also by a child
    process it was passed to). Lock files are never deleted: removing one that another process has
    just opened would let two processes hold "the" lock at once."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor releases the lock
            self.fd = -1

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(path: str | Path) -> Lock | None:
    """The lock at ``path`` (created if missing), or ``None`` if another open file description
    holds it: a live process, this one included. A dead process's lock is free again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    # Who holds it, for people looking at the folder (the lock itself is the flock, not this text).
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.uname().nodename} {os.getpid()}\n".encode(), 0)
    return Lock(path, fd)


# --------------------------------------------------------------------------------------------------
# Run files
# --------------------------------------------------------------------------------------------------
def finish_run(work: Path, target: Path, result: dict) -> None:
    """Write the run's JSON atomically (it marks the run finished), then drop the training state
    in ``work`` that only a resume needs. In this order a kill between the two steps loses nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    for name in TRAINING_STATE:
        (work / name).unlink(missing_ok=True)


def read_run(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_runs(folder: Path, pattern: str = "*.json") -> list[dict]:
    """Every run file in ``folder``, in file-name order."""
    return [read_run(p) for p in sorted(Path(folder).glob(pattern))]


def check_settings(path: Path, settings: Mapping, keys: Sequence[str] | None = None) -> None:
    """All runs in one folder share the settings that shape a result (``path``, a JSON file written
    by the first invocation); raises :class:`UsageError` naming the differences otherwise, since
    mixing them would mix tables."""
    path = Path(path)
    keys = list(settings) if keys is None else list(keys)
    ours = {k: settings[k] for k in keys}
    if path.is_file():
        theirs = json.loads(path.read_text())
        diff = [f"{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in keys if theirs.get(k) != ours[k]]
        if diff:
            raise UsageError(f"{path.parent} holds runs with other settings ({'; '.join(diff)}); use another --out")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(ours, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# One run: train, contract, check, score
# --------------------------------------------------------------------------------------------------
@dataclass
class Trained:
    """What :func:`train_contracted` measured; ``expanded`` is the trained model, ``compact`` its
    contraction (the model that was scored)."""

    summary: dict
    expanded: nn.Module
    compact: nn.Module
    checkpoint: object  # the loaded last.pt (arch, arch_kwargs, input_shape)
    final: dict  # evaluate_torch's result for the contracted model
    contraction_max_rel: float | None  # float64 check; None for a model with no expanded layer
    resumed: bool
    cpu_seconds: float
    wall_seconds: float

    @property
    def params_trained(self) -> int:
        return sum(p.numel() for p in self.expanded.parameters())

    @property
    def params_compact(self) -> int:
        return sum(p.numel() for p in self.compact.parameters())

    @property
    def history(self) -> list[dict]:
        return self.summary["history"]


def train_contracted(
    work: Path,
    build: Callable[[], tuple[nn.Module, str, dict, Sequence[int]]],
    config: TrainConfig,
    data: DataSplits | None = None,
    *,
    score_on: Dataset | None = None,
    callbacks: Callbacks | None = None,
    hooks: Sequence = (),
    teacher: nn.Module | None = None,
    batch_size: int = 500,
    name: str | None = None,
) -> Trained | None:
    """Train in ``work`` (resuming its ``last.pt`` if there is one, else starting from ``build()``:
    ``(model, arch spec, arch kwargs, input shape)``, saved as ``src.pt``), contract the result,
    check the contraction in float64 and score the contracted model on ``score_on`` (default: the
    validation split). ``config``'s ``src``, ``out`` and ``resume`` are set here.

    Raises :class:`CheckFailed` if the contracted model does not compute what the trained one does.
    Under ``torchrun`` every rank trains its shard and only rank 0 goes on: the others return ``None``.
    """
    cpu0, wall0 = time.process_time(), time.perf_counter()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    resume = (work / "last.pt").is_file()
    src = work / "src.pt"
    if not resume:
        model, arch, kwargs, shape = build()
        save(model, src, arch=arch, arch_kwargs=kwargs, input_shape=tuple(shape))
    config = dataclasses.replace(config, src=str(src), out=str(work), resume=resume)
    summary = train(config, callbacks, hooks, data=data, teacher=teacher)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun: rank 0 alone contracts, scores and writes
        return None

    ckpt = load_checkpoint(work / "last.pt")
    expanded = ckpt.model
    compact = contract(expanded)
    max_rel = None
    if any(True for _ in expanded_layers(expanded)):
        (report,) = check_contraction(expanded, compact, ckpt.input_shape, dtypes=(torch.float64,), samples=1)
        if not report.passed:
            raise CheckFailed(
                f"{name or work.name}: the contracted model differs from the expanded one: {report.summary()}"
            )
        max_rel = report.max_rel
    if score_on is None:
        if data is None:
            raise UsageError("train_contracted needs data or score_on to score the contracted model")
        score_on = data.val
    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    final = evaluate_torch(compact.to("cuda" if on_gpu else "cpu"), score_on, batch_size=batch_size)
    return Trained(
        summary, expanded, compact, ckpt, final, max_rel, resume,
        round(time.process_time() - cpu0, 2), round(time.perf_counter() - wall0, 2),
    )  # fmt: skip


@contextlib.contextmanager
def claimed(path: Path) -> Iterator[Lock | None]:
    """``with claimed(lock_path) as lock:`` -- ``lock`` is ``None`` when another process holds it."""
    lock = claim(path)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()

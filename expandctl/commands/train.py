"""``expandctl train``: the flags as a :class:`~expandctl.train.TrainConfig`, :func:`expandctl.train.train`, progress.

The library is imported inside the command function, so that ``expandctl train --help`` loads no torch.

The main app registers it with ``app.command("train")(train)``; ``python -m expandctl.commands.train``
runs it standalone (e.g. under ``torchrun``). Output follows the other commands (:mod:`expandctl.console`):

* at a terminal: a rich progress bar per epoch on stderr, one line per epoch and a summary table on stdout;
* in a pipe or CI log: the same lines and table, no bars;
* ``--quiet``: one line (the last checkpoint and its validation accuracy); ``--json``: exactly one JSON
  object on stdout at the end (the summary and every epoch's metrics; also on error). ``metrics.jsonl``
  streams the epochs either way.

Under ``torchrun`` only rank 0 prints.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..console import UI, fmt_count, kv_table
from ..errors import ExpandctlError, UsageError
from .options import (
    ArchKwOpt,
    ArchOpt,
    AugmentOpt,
    ChannelsOpt,
    DataOpt,
    DebugOpt,
    DownloadOpt,
    ImageSizeOpt,
    KdTemperatureOpt,
    LrOpt,
    MomentumOpt,
    NesterovOpt,
    OptimizerOpt,
    PreciseBnOpt,
    TrainSubsetOpt,
    TrustOpt,
    ValFractionOpt,
    WeightDecayOpt,
)
from .runtime import Command, guard, parse_json_object

__all__ = ["train", "ConsoleReporter", "epoch_line"]

_BASE_KEYS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def epoch_line(m: dict, epochs: int, is_best: bool) -> str:
    """``epoch  3/150  lr 0.01  train loss 0.5210 acc 84.10%  val loss ...  4.1s  5120 img/s  best``."""
    parts = [
        f"epoch {m['epoch']:>{len(str(epochs))}}/{epochs}",
        f"lr {m['lr']:.3g}",
        f"train loss {m['train_loss']:.4f} acc {_pct(m['train_acc'])}",
        f"val loss {m['val_loss']:.4f} acc {_pct(m['val_acc'])}",
        f"{m['seconds']:.1f}s",
        f"{m['images_per_s']:.0f} img/s",
    ]
    parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items() if k not in _BASE_KEYS]
    return "  ".join(parts) + ("  best" if is_best else "")


#: Fewer optimizer steps per epoch than this: the batch size is large for the training set, and
#: the advice names one that makes about ``ADVISED_STEPS``.
FEW_STEPS, ADVISED_STEPS = 4, 10


def small_set_advice(info: dict) -> str | None:
    """The fix for a training set that makes only a few steps per epoch at this batch size (measured:
    a SmallNet on 160 images at batch 128, 2 steps per epoch, stayed near chance for 50 epochs)."""
    steps, batch, n = info.get("steps_per_epoch"), info.get("batch_size"), info.get("train_size")
    if not steps or not batch or not n or steps >= FEW_STEPS or batch <= 8:
        return None
    smaller = max(8, 2 ** int(math.log2(max(1, n // ADVISED_STEPS))))
    if smaller >= batch:
        return None
    return (
        f"{n} training images make {steps} step{'s' if steps > 1 else ''} per epoch at --batch-size {batch}; "
        f"on a set this small pass --batch-size {smaller} ({math.ceil(n / smaller)} steps per epoch) "
        "or many more --epochs"
    )


class ConsoleReporter:
    """Turns the loop's callbacks into output on a :class:`~expandctl.console.UI`: it implements every
    method of :class:`expandctl.train.Callbacks` (not subclassed: that would import torch for ``--help``)."""

    def __init__(self, ui: UI):
        self.ui = ui
        self.lines = not (ui.json or ui.quiet)
        self.progress: Progress | None = None
        self.task = None
        self.epochs = 0

    def on_start(self, info: dict) -> None:
        self.epochs = info["epochs"]
        for w in info.get("warnings") or ():
            self.ui.warn(w)
        advice = small_set_advice(info)
        if advice:
            self.ui.warn(advice)
        if not self.lines:
            return
        what = f"{info['expanded_layers']} expanded layers" if info["expanded_layers"] else "no expanded layer"
        procs = f" x {info['world_size']} processes" if info["world_size"] > 1 else ""
        self.ui.print(
            escape(
                f"train {info['src']} ({what}, {fmt_count(info['params'])} parameters) on {info['data']} "
                f"({fmt_count(info['train_size'])} train / {fmt_count(info['val_size'])} val, "
                f"{'x'.join(map(str, info['input_shape']))}, {info['num_classes']} classes) "
                f"on {info['device']}{procs}"
            )
        )
        if info["resumed"]:
            self.ui.print(escape(f"resuming {info['out']}/last.pt after epoch {info['start_epoch']}"))

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.ui.progress:
            return
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=self.ui.err,
            transient=True,
        )
        self.task = self.progress.add_task("train", total=steps, loss="-")
        self.progress.start()

    def on_step(self, step: int, steps: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_epoch_end(self, metrics: dict, is_best: bool) -> None:
        self.stop()
        if self.lines:
            self.ui.print(escape(epoch_line(metrics, self.epochs, is_best)))

    def on_end(self, summary: dict) -> None:
        self.stop()
        final = summary["final"] or {}
        if self.ui.quiet:  # one line, as every command under --quiet
            best = summary["best_val_acc"]
            self.ui.print(escape(
                f"wrote {summary['files'].get('last', summary['out'])} (final val acc {_pct(final.get('val_acc'))}"
                + (f", best {_pct(best)} at epoch {summary['best_epoch']}" if best is not None else "") + ")"
            ))  # fmt: skip
            return
        epochs = str(summary["epochs"])
        if summary["start_epoch"]:
            epochs += f" (resumed after {summary['start_epoch']}, ran {summary['epochs_run']})"
        rows = [
            ("epochs", epochs),
            ("best val acc", f"{_pct(summary['best_val_acc'])} (epoch {summary['best_epoch']})"),
            ("final val acc", _pct(final.get("val_acc"))),
            ("final val loss", f"{final['val_loss']:.4f}" if final else "-"),
            ("final train acc", _pct(final.get("train_acc"))),
            ("time", f"{summary['seconds']:.1f}s on {summary['device']}"),
            *summary["files"].items(),
        ]
        self.ui.print(kv_table(rows, title="expandctl train"))


class TrainingInterrupted(ExpandctlError):
    """Ctrl-C during training (exit 130): the run folder is consistent and resumable."""

    exit_code = 130


def train(
    src: Annotated[
        Path, typer.Argument(metavar="SRC", help="Checkpoint to train (expanded or compact), any file expandctl loads.")
    ],
    data: DataOpt,
    channels: ChannelsOpt = None,
    image_size: ImageSizeOpt = None,
    augment: AugmentOpt = None,
    train_subset: TrainSubsetOpt = None,
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = None,
    precise_bn: PreciseBnOpt = 0,
    out: Annotated[Path, typer.Option("--out", help="Run folder: last.pt, best.pt, metrics.jsonl, curves.png.")] = Path(
        "run"
    ),
    epochs: Annotated[int, typer.Option(help="Epochs in all.")] = 150,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size per process.")] = 128,
    accumulate: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Gradient accumulation: one optimizer step per N mini-batches (their mean loss); "
            "fused layers compose their kernels once per step.",
        ),
    ] = 1,
    lr: LrOpt = 0.01,
    optimizer: OptimizerOpt = "sgd",
    momentum: MomentumOpt = 0.9,
    nesterov: NesterovOpt = False,
    schedule: Annotated[
        str,
        typer.Option(help="paper (lr, lr/10, lr/100 for a third each), step (/10 at 50% and 75%), cosine."),
    ] = "paper",
    weight_decay: WeightDecayOpt = 0.0,
    decay_on: Annotated[
        str,
        typer.Option(
            help="factors: L2 on every factor (normal L2); product: on each expanded layer's contracted "
            "weight and bias (product L2)."
        ),
    ] = "factors",
    teacher: Annotated[Path | None, typer.Option(help="Distil from this checkpoint (Hinton KD).")] = None,
    kd_alpha: Annotated[float, typer.Option(help="Weight of the distillation term (1 - alpha: labels).")] = 0.9,
    kd_temperature: KdTemperatureOpt = 4.0,
    nonlinear_warmup: Annotated[
        int,
        typer.Option(metavar="EPOCHS", help="First EPOCHS epochs with a ReLU between factors (nonlinear init)."),
    ] = 0,
    forward: Annotated[
        str, typer.Option(help="fused: compose each chain's kernel per step; explicit: run the chain.")
    ] = "fused",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (with bf16 autocast).")] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    threads: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Torch CPU threads (default: torch's, about one per core); what compare's "
            "--threads sets for each of its runs.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random draw (shuffling, augmentation).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pt.")] = False,
    grad_confusion: Annotated[
        bool,
        typer.Option(
            "--grad-confusion",
            help="After each epoch, record the min and mean cosine similarity of mini-batch gradient pairs "
            "on the training set (grad_confusion_min/_mean in metrics.jsonl; docs/analysis.md).",
        ),
    ] = False,
    grad_confusion_pairs: Annotated[
        int, typer.Option(metavar="N", help="Mini-batch pairs for --grad-confusion.")
    ] = 100,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    teacher_arch: Annotated[str | None, typer.Option(help="Architecture of a plain state-dict --teacher.")] = None,
    teacher_arch_kwargs: Annotated[str | None, typer.Option(help="JSON keyword arguments for --teacher-arch.")] = None,
    trust_pickle: TrustOpt = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout at the end (also on error).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or epoch lines.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Train an expanded (or compact) model; checkpoints stay contractible. Under torchrun: DDP."""
    flags = dict(locals())  # first: the parsed flags, named as TrainConfig's fields
    ui = UI("train", as_json, quiet, debug)
    if os.environ.get("RANK", "0") != "0":  # other torchrun ranks stay silent; rank 0 reports
        ui.json = ui.progress = False
        ui.out.quiet = ui.err.quiet = True
    reporter = ConsoleReporter(ui)
    with guard(ui):
        import torch

        from ..train import train as run_training

        if threads is not None:
            if threads < 1:
                raise UsageError("--threads must be at least 1")
            torch.set_num_threads(threads)
        try:
            summary = run_training(_config(flags), reporter)
        except KeyboardInterrupt:
            reporter.stop()
            raise TrainingInterrupted(
                f"interrupted; {out}/last.pt holds the last finished epoch: rerun with --resume to continue"
            ) from None
        finally:
            reporter.stop()  # a live progress bar would swallow the error line
        ui.emit(summary)


#: The command's parameters that are not training options.
_CLI_ONLY = ("threads", "as_json", "quiet", "debug")


def _config(flags: dict):
    """The parsed flags as a :class:`~expandctl.train.TrainConfig` (its fields are named as the flags;
    the data adapters' flags go into its ``data_options``)."""
    from ..train import TrainConfig

    text = {name: flags[name].lower() for name in ("optimizer", "schedule", "decay_on", "forward", "device")}
    return TrainConfig.from_dict(
        {name: value for name, value in flags.items() if name not in _CLI_ONLY},
        **text,
        src=str(flags["src"]),
        out=str(flags["out"]),
        teacher=str(flags["teacher"]) if flags["teacher"] else None,
        augment=flags["augment"].lower() if flags["augment"] else None,
        arch_kwargs=parse_json_object(flags["arch_kwargs"], "--arch-kwargs"),
        teacher_arch_kwargs=parse_json_object(flags["teacher_arch_kwargs"], "--teacher-arch-kwargs"),
        command=shlex.join(["expandctl", *sys.argv[1:]]),
    )


if __name__ == "__main__":  # python -m expandctl.commands.train: what torchrun starts on each process
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    _app.command(cls=Command)(train)
    _app()

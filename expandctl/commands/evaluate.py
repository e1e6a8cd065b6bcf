"""``expandctl evaluate``: accuracy and loss of a checkpoint or ONNX file on a data split.

The workflow is :func:`expandctl.workflows.evaluate_file`; this module parses, calls it and prints. The library
is imported inside the command so that ``--help`` loads no torch. Registered in :mod:`expandctl.cli`."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import UI
from ..errors import CheckFailed
from .runtime import ModelFlags, command


@command("evaluate", load=True, data_adapters=True)
def evaluate(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Checkpoint (run in torch) or ONNX file (onnxruntime).")],
    data: Annotated[str, typer.Option("--data", metavar="SPEC", help="Data spec, e.g. digits, cifar10:DIR.")],
    split: Annotated[str, typer.Option(metavar="val|train", help="Which split to score.")] = "val",
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per batch.")] = 256,
    min_accuracy: Annotated[
        float | None,
        typer.Option(metavar="PERCENT", help="Exit 1 if the accuracy is below PERCENT (a CI gate)."),
    ] = None,
    *,
    ui: UI,
    model: ModelFlags,
    adapters: dict,
) -> None:
    """Accuracy and loss of a model on a data split (the held-out split by default)."""
    from ..data import DataOptions
    from ..workflows import EvaluateOptions, evaluate_file

    options = EvaluateOptions(split, batch_size, min_accuracy, DataOptions(**adapters), **model.library())
    try:
        result = evaluate_file(src, data, options, progress=ui)
    except CheckFailed as e:  # below --min-accuracy: the score first, then the one-line error
        if getattr(e, "result", None) is not None:
            _show(ui, e.result)
        raise
    _show(ui, result)
    ui.emit(result.to_dict())


def _show(ui: UI, result) -> None:
    if result.recorded_val_fraction is not None:
        ui.detail(f"--val-fraction {result.recorded_val_fraction:g}, as recorded by the run that wrote {result.source}")
    m = result.metrics
    ui.print(
        f"{result.source}: accuracy {100 * m['accuracy']:.2f}% ({m['correct']}/{m['samples']}), "
        f"loss {m['loss']:.4f} on {result.data} {result.split} ({m['runtime']})"
    )

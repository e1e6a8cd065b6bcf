"""``expandctl evaluate``: accuracy and loss of a checkpoint or ONNX file on a data split.

Parses, calls the library and prints; registered in :mod:`expandctl.cli`."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import checkpoint as ckpt_io
from ..console import UI
from ..errors import CheckFailed, UsageError
from ..shapes import data_mismatch, first_layer_channels
from .options import (
    ArchKwOpt,
    ArchOpt,
    ChannelsOpt,
    DebugOpt,
    DownloadOpt,
    ImageSizeOpt,
    JsonOpt,
    QuietOpt,
    TrainSubsetOpt,
    TrustOpt,
    ValFractionOpt,
)
from .runtime import data_options, guard, load_for_cli, onnx_shape


def evaluate(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Checkpoint (run in torch) or ONNX file (onnxruntime).")],
    data: Annotated[str, typer.Option("--data", metavar="SPEC", help="Data spec, e.g. digits, cifar10:DIR.")],
    split: Annotated[str, typer.Option(metavar="val|train", help="Which split to score.")] = "val",
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per batch.")] = 256,
    min_accuracy: Annotated[
        float | None,
        typer.Option(metavar="PERCENT", help="Exit 1 if the accuracy is below PERCENT (a CI gate)."),
    ] = None,
    channels: ChannelsOpt = None,
    image_size: ImageSizeOpt = None,
    train_subset: TrainSubsetOpt = None,
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Accuracy and loss of a model on a data split (the held-out split by default)."""
    from ..data import load_data
    from ..evaluate import evaluate_onnx, evaluate_torch

    ui = UI("evaluate", as_json, quiet, debug)
    with guard(ui):
        if split not in ("val", "train"):
            raise UsageError(f"--split must be val or train, not {split!r}")
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        opts = data_options(channels, image_size, None, train_subset, download, val_fraction)  # never augmented
        if min_accuracy is not None and not 0 <= min_accuracy <= 100:
            raise UsageError(f"--min-accuracy is a percentage between 0 and 100, not {min_accuracy:g}")
        if ckpt_io.sniff_format(src) == "onnx":
            shape = onnx_shape(src)
            sets = load_data(data, shape, augment=False, options=opts)
            if shape and tuple(shape) != tuple(sets.input_shape):  # a fixed-shape graph: known before running
                raise data_mismatch(None, src, shape, data, sets.input_shape)
            with ui.step(f"scoring {src} on {data} ({split}) in onnxruntime"):
                result = evaluate_onnx(src, getattr(sets, split), batch_size, num_classes=sets.num_classes)
        else:
            ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust_pickle)
            recorded = ((ckpt.extra or {}).get("train") or {}).get("config") or {}
            if val_fraction is None and recorded.get("val_fraction") is not None:
                # a run's checkpoint: score the split the run held out, not the default one
                val_fraction = recorded["val_fraction"]
                opts = data_options(channels, image_size, None, train_subset, download, val_fraction)
                ui.detail(f"--val-fraction {val_fraction:g}, as recorded by the run that wrote {src}")
            sets = load_data(data, ckpt.input_shape, augment=False, options=opts)
            channels_in = first_layer_channels(ckpt.model)
            with ui.step(f"scoring {src} on {data} ({split})"):
                try:
                    result = evaluate_torch(ckpt.model, getattr(sets, split), batch_size, num_classes=sets.num_classes)
                except (RuntimeError, ValueError) as e:
                    if isinstance(e, UsageError):
                        raise
                    raise data_mismatch(e, src, ckpt.input_shape, data, sets.input_shape, channels_in) from None
        ui.print(
            f"{src}: accuracy {100 * result['accuracy']:.2f}% ({result['correct']}/{result['samples']}), "
            f"loss {result['loss']:.4f} on {data} {split} ({result['runtime']})"
        )
        if min_accuracy is not None and 100 * result["accuracy"] < min_accuracy:
            err = CheckFailed(
                f"{src}: accuracy {100 * result['accuracy']:.2f}% on {data} {split} is below --min-accuracy "
                f"{min_accuracy:g} (chance: {100 / sets.num_classes:.2f}%)"
            )
            scored = {k: v for k, v in result.items() if k != "error"}  # "error" is the message under --json
            err.details = {"source": src, "data": data, "split": split, **scored, "min_accuracy": min_accuracy}
            raise err
        ui.emit({"source": src, "data": data, "split": split, **result, "min_accuracy": min_accuracy})

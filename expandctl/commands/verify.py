"""``expandctl verify``: an expanded model against its contraction, or two files against each other.

The workflow is :func:`expandctl.workflows.verify_files`; this module parses, calls it and prints. The library
is imported inside the command so that ``--help`` loads no torch. Registered in :mod:`expandctl.cli`."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import UI
from .options import AtolOpt, RtolOpt, ShapeOpt
from .runtime import ModelFlags, command, parse_shape, reports_on_failure, show_reports


@command("verify", load=True)
def verify(
    a: Annotated[str, typer.Argument(metavar="A", help="Expanded checkpoint, or the reference checkpoint.")],
    b: Annotated[
        str | None, typer.Argument(metavar="B", help="Second checkpoint or ONNX file to compare with A.")
    ] = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    samples: Annotated[int, typer.Option(metavar="N", help="Random input batches.")] = 4,
    batch: Annotated[int, typer.Option(metavar="N", help="Batch size of each random input.")] = 2,
    dtype: Annotated[
        str | None,
        typer.Option(
            metavar="float32|float64",
            help="float32 or float64 (default: both for one file, float64 for two checkpoints, float32 for ONNX).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the random inputs.")] = 0,
    input_shape: ShapeOpt = None,
    *,
    ui: UI,
    model: ModelFlags,
) -> None:
    """Check that A's expanded chains equal their contraction, or that A and B compute the same outputs."""
    from ..workflows import VerifyOptions, verify_files

    options = VerifyOptions(atol, rtol, samples, batch, dtype, seed, parse_shape(input_shape), **model.library())
    with reports_on_failure(ui):
        result = verify_files(a, b, options, progress=ui)
    show_reports(ui, result.reports, result.title)
    ui.print("[green]passed[/green]")
    ui.emit(result.to_dict())

"""``expandctl export``: a checkpoint to ONNX, checked with onnxruntime.

The workflow is :func:`expandctl.workflows.export_checkpoint`; this module parses, calls it and prints. The
library is imported inside the command so that ``--help`` loads no torch. Registered in :mod:`expandctl.cli`."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import UI
from .options import AtolOpt, DynamicSizeOpt, RtolOpt, ShapeOpt
from .runtime import ModelFlags, command, command_line, parse_shape, reports_on_failure, show_reports


@command("export", load=True)
def export(
    ctx: typer.Context,
    src: Annotated[
        str, typer.Argument(metavar="SRC", help="Checkpoint (expanded ones are contracted and checked first).")
    ],
    output: Annotated[str, typer.Option("-o", "--output", metavar="OUT", help="Output .onnx file.")],
    opset: Annotated[int | None, typer.Option(metavar="N", help="ONNX opset (default: the exporter's).")] = None,
    dynamic_batch: Annotated[
        bool,
        typer.Option("--dynamic-batch/--static-batch", help="Dynamic batch dimension (default) or batch 1."),
    ] = True,
    dynamic_size: DynamicSizeOpt = False,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    input_shape: ShapeOpt = None,
    *,
    ui: UI,
    model: ModelFlags,
) -> None:
    """Write a single-file ONNX model, checked against torch with onnxruntime, with provenance metadata."""
    from ..workflows import ExportOptions, export_checkpoint

    options = ExportOptions(opset, dynamic_batch, dynamic_size, atol, rtol, parse_shape(input_shape), **model.library())
    with reports_on_failure(ui):
        result = export_checkpoint(src, output, options, command=command_line(ctx), progress=ui)
    show_reports(ui, result.reports, "checks")
    size = "dynamic" if dynamic_size else "static"
    ui.print(f"wrote {result.output} ({'dynamic' if dynamic_batch else 'static'} batch, {size} input size)")
    ui.emit(result.to_dict())

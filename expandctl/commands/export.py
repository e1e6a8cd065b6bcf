"""``expandctl export``: a checkpoint to ONNX, checked with onnxruntime.

Parses, calls the library and prints; registered in :mod:`expandctl.cli`."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import checkpoint as ckpt_io
from ..console import UI
from ..errors import CheckFailed
from ..shapes import running_model
from ..workflows import check_failed
from .options import (
    ArchKwOpt,
    ArchOpt,
    AtolOpt,
    DebugOpt,
    DynamicSizeOpt,
    JsonOpt,
    QuietOpt,
    RtolOpt,
    ShapeOpt,
    TrustOpt,
)
from .runtime import contract_checked_cli, guard, input_shape_of, load_for_cli, onnx_metadata_of, show_reports


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
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a single-file ONNX model, checked against torch with onnxruntime, with provenance metadata."""
    from ..export import export_onnx
    from ..rewrite import expanded_layers

    ui = UI("export", as_json, quiet, debug)
    with guard(ui):
        out = ckpt_io.check_output_path(output, [src], (".onnx",))
        ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust_pickle)
        shape = input_shape_of(ckpt, input_shape)
        reports: list = []
        model = ckpt.model
        if list(expanded_layers(model)):
            model, reports = contract_checked_cli(ui, ckpt, shape, atol, rtol)
        with ui.step(f"exporting {out} and checking it with onnxruntime"), running_model(shape, ckpt.input_shape):
            try:
                _, report = export_onnx(
                    model,
                    out,
                    shape,
                    opset=opset,
                    dynamic_batch=dynamic_batch,
                    dynamic_size=dynamic_size,
                    metadata=onnx_metadata_of(ctx, ckpt, shape, ckpt.folded_bn),
                    atol=atol,
                    rtol=rtol,
                )
            except CheckFailed as e:
                if getattr(e, "report", None) is not None:
                    reports.append(e.report)
                    show_reports(ui, reports, "checks")
                    raise check_failed(str(e) + "; nothing was written", reports) from None
                raise
        if report is not None:
            reports.append(report)
        show_reports(ui, reports, "checks")
        size = "dynamic" if dynamic_size else "static"
        ui.print(f"wrote {out} ({'dynamic' if dynamic_batch else 'static'} batch, {size} input size)")
        ui.emit(
            {
                "output": str(out),
                "source": src,
                "input_shape": list(shape),
                "dynamic_batch": dynamic_batch,
                "dynamic_size": dynamic_size,
                "opset": opset,
                "passed": True,
                "checks": [r.to_dict() for r in reports],
            }
        )

"""``expandctl contract``: contract, check, fold, write or export.

The workflow is :func:`expandctl.workflows.contract_checkpoint`; this module parses, calls it and prints.
Registered in :mod:`expandctl.cli`."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import checkpoint as ckpt_io
from ..console import UI, fmt_count, graph_plan_table, left_alone_table
from ..errors import UsageError
from ..workflows import contract_checkpoint
from .options import (
    ArchKwOpt,
    ArchOpt,
    AtolOpt,
    DebugOpt,
    DynamicSizeOpt,
    JsonOpt,
    PreciseBnOpt,
    QuietOpt,
    RtolOpt,
    ShapeOpt,
    TrustOpt,
)
from .runtime import command_line, guard, load_for_cli, parse_shape, reports_on_failure, show_reports


def contract(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(metavar="SRC", help="Expanded checkpoint (or, with --graph, any model).")],
    output: Annotated[
        str | None,
        typer.Option(
            "-o", "--output", metavar="OUT", help="Output .pt, .safetensors or .onnx (with --graph: .onnx or .pt2)."
        ),
    ] = None,
    graph: Annotated[
        bool,
        typer.Option(
            "--graph",
            help="Also merge every linear region of the traced model (conv -> BN, parallel branches, chains, "
            "layer scales) into one layer each, whoever built it; writes .onnx or .pt2.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --graph: list the regions and the reasons, write nothing.")
    ] = False,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    fold_bn: Annotated[
        bool, typer.Option("--fold-bn", help="Also fold eval-mode BatchNorm into the preceding conv.")
    ] = False,
    dynamic_size: DynamicSizeOpt = False,
    input_shape: ShapeOpt = None,
    require_expanded: Annotated[
        bool,
        typer.Option(
            "--require-expanded",
            help="Fail (exit 4) if SRC has no expanded layer, instead of writing it unchanged (for CI).",
        ),
    ] = False,
    precise_bn: PreciseBnOpt = 0,
    data: Annotated[
        str | None,
        typer.Option("--data", metavar="SPEC", help="Training data of --precise-bn (as for train: digits, ...)."),
    ] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Multiply every chain back into one layer, check it against the chain, write the compact model."""
    ui = UI("contract", as_json, quiet, debug)
    with guard(ui):
        if graph or dry_run:
            _contract_graph(ctx, ui, src, output, dry_run, input_shape, atol, rtol, fold_bn, dynamic_size,
                            require_expanded, arch, arch_kwargs, trust_pickle)  # fmt: skip
            return
        if output is None:
            raise UsageError("give the output file with -o OUT (.pt, .safetensors or .onnx)")
        out = ckpt_io.check_output_path(
            output, [src], ckpt_io.TORCH_SUFFIXES + ckpt_io.SAFETENSORS_SUFFIXES + (".onnx",)
        )
        if dynamic_size and out.suffix.lower() != ".onnx":
            raise UsageError("--dynamic-size shapes an ONNX graph; give an -o ending in .onnx")
        ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust_pickle)
        with reports_on_failure(ui):
            result = contract_checkpoint(
                ckpt,
                out,
                input_shape=parse_shape(input_shape),
                atol=atol,
                rtol=rtol,
                fold_bn=fold_bn,
                dynamic_size=dynamic_size,
                require_expanded=require_expanded,
                source=src,
                command=command_line(ctx),
                progress=ui,
                precise_bn=precise_bn,
                data=data,
            )
        show_reports(ui, result.reports, "checks")
        summary = (
            f"contracted {len(result.contracted_layers)} expanded layers: "
            f"{fmt_count(result.params_before)} -> {fmt_count(result.params_after)} parameters"
        )
        if fold_bn:
            summary += f"; folded {len(result.folded_bn)} BatchNorm layers into their convs"
        if result.precise_bn:
            p = result.precise_bn
            ui.detail(f"recomputed the running statistics of {p['layers']} BatchNorm layers over {p['batches']} "
                     f"batches ({p['images']} images of {p['data']})")  # fmt: skip
        ui.detail(summary)
        ui.print(f"wrote {out}")
        ui.emit(result.to_dict())


def _contract_graph(
    ctx, ui, src, output, dry_run, input_shape, atol, rtol, fold_bn, dynamic_size, require_expanded, arch,
    arch_kwargs, trust_pickle,
) -> None:  # fmt: skip
    from ..workflows import GRAPH_SUFFIXES, contract_graph_checkpoint

    if dry_run and not graph_requested(ctx):
        raise UsageError("--dry-run lists the regions of --graph; add --graph")
    if dynamic_size or require_expanded:
        flag = "--dynamic-size" if dynamic_size else "--require-expanded"
        raise UsageError(f"{flag} is not available with --graph")
    out = None
    if not dry_run:
        if output is None:
            raise UsageError("give the output file with -o OUT (.onnx or .pt2), or --dry-run to see the plan")
        out = ckpt_io.check_output_path(output, [src], GRAPH_SUFFIXES)
    ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust_pickle)
    with reports_on_failure(ui):
        result = contract_graph_checkpoint(
            ckpt, out, input_shape=parse_shape(input_shape), atol=atol, rtol=rtol, source=src,
            command=command_line(ctx), progress=ui,
        )  # fmt: skip
    ui.detail(graph_plan_table(result.plan))
    if result.plan.left_alone:
        ui.detail(left_alone_table(result.plan))
    for path, reason in result.plan.opaque.items():
        ui.note(f"note: {path} cannot be traced and stays as it is ({reason})")
    if fold_bn:
        ui.note("note: --graph folds every BatchNorm that follows a linear layer; --fold-bn adds nothing")
    show_reports(ui, result.reports, "checks")
    plan = result.plan
    summary = (
        f"{len(plan.merged)} linear regions merged: {fmt_count(plan.params_before)} -> "
        f"{fmt_count(plan.params_after)} parameters and buffers"
    )
    if result.contracted_layers:
        summary = f"contracted {len(result.contracted_layers)} expanded layers; " + summary
    ui.detail(summary)
    ui.print("dry run: nothing written" if out is None else f"wrote {out}")
    ui.emit(result.to_dict())


def graph_requested(ctx) -> bool:
    return bool(ctx.params.get("graph"))

"""``expandctl contract``: contract, check, fold, write or export.

The workflows are :func:`expandctl.workflows.contract_checkpoint` and, with ``--graph``,
:func:`expandctl.workflows.contract_graph_checkpoint`; this module parses, calls them and prints. The library is
imported inside the command so that ``--help`` loads no torch. Registered in :mod:`expandctl.cli`."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import UI, fmt_count, graph_plan_table, left_alone_table
from ..errors import UsageError
from .options import AtolOpt, DynamicSizeOpt, PreciseBnOpt, RtolOpt, ShapeOpt
from .runtime import (
    ModelFlags,
    command,
    command_line,
    load_for_cli,
    parse_shape,
    reports_on_failure,
    show_reports,
)


@command("contract", load=True)
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
    *,
    ui: UI,
    model: ModelFlags,
) -> None:
    """Multiply every chain back into one layer, check it against the chain, write the compact model."""
    from .. import checkpoint as ckpt_io
    from ..workflows import GRAPH_SUFFIXES, contract_checkpoint, contract_graph_checkpoint

    common = {"input_shape": parse_shape(input_shape), "atol": atol, "rtol": rtol, "source": src}
    common.update(command=command_line(ctx), progress=ui)
    if graph or dry_run:  # flag combinations of this command; everything else is the verbs' to check
        if dry_run and not graph:
            raise UsageError("--dry-run lists the regions of --graph; add --graph")
        if output is None and not dry_run:
            raise UsageError("give the output file with -o OUT (.onnx or .pt2), or --dry-run to see the plan")
        out = None if dry_run else ckpt_io.check_output_path(output, [src], GRAPH_SUFFIXES)
        ckpt = load_for_cli(ui, src, model.arch, model.arch_kwargs, model.trust_pickle)
        with reports_on_failure(ui):
            result = contract_graph_checkpoint(
                ckpt, out, dynamic_size=dynamic_size, require_expanded=require_expanded, **common
            )
        return _show_graph(ui, result, fold_bn)
    if output is None:
        raise UsageError("give the output file with -o OUT (.pt, .safetensors or .onnx)")
    out = ckpt_io.check_output_path(output, [src], ckpt_io.TORCH_SUFFIXES + ckpt_io.SAFETENSORS_SUFFIXES + (".onnx",))
    ckpt = load_for_cli(ui, src, model.arch, model.arch_kwargs, model.trust_pickle)
    with reports_on_failure(ui):
        result = contract_checkpoint(
            ckpt, out, fold_bn=fold_bn, dynamic_size=dynamic_size, require_expanded=require_expanded,
            precise_bn=precise_bn, data=data, **common,
        )  # fmt: skip
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


def _show_graph(ui: UI, result, fold_bn: bool) -> None:
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
    ui.print("dry run: nothing written" if result.output is None else f"wrote {result.output}")
    ui.emit(result.to_dict())

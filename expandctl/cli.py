"""``expandctl``: expand, contract, verify, export and inspect models on safe checkpoints.

This module parses arguments, calls the library and prints; nothing else. Every command takes
``--json`` (exactly one JSON object on stdout, also on error), ``--quiet`` (no progress) and
``--debug`` (tracebacks). Exit codes: see :data:`expandctl.cli_common.EXIT_CODES` and docs/cli.md.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated

import torch
import typer

from . import checkpoint as ckpt_io
from ._version import __version__
from .checkpoint.describe import ONNX_PARAMETERS_NOTE
from .cli_common import (
    EXIT_INTERRUPTED,
    ArchKwOpt,
    ArchOpt,
    AtolOpt,
    AugmentOpt,
    ChannelsOpt,
    Command,
    DebugOpt,
    DownloadOpt,
    ImageSizeOpt,
    JsonOpt,
    QuietOpt,
    RtolOpt,
    ShapeOpt,
    TrainSubsetOpt,
    TrustOpt,
    ValFractionOpt,
    data_options,
    guard,
    input_shape_of,
    load_for_cli,
    parse_json_object,
    parse_shape,
    running_model,
)
from .console import UI, fmt_count, fmt_rate, kv_table, layers_table, plan_table, report_settings, report_table
from .errors import CheckFailed, UsageError
from .shapes import (
    backend_message,
    data_mismatch,
    first_layer_channels,
    fmt_shape,
    onnx_dynamic_size,
    onnx_input_shape,
    run_once,
    second_size,
)
from .workflows import (
    check_failed,
    contract_checked,
    contract_checkpoint,
    count_params,
    expand_checkpoint,
    failed_reports,
    fresh_checkpoint,
    onnx_metadata,
)


def _strategy_help() -> str:
    """``--strategy`` help, read from the registry (a new kind shows up here by registering)."""
    from .layers import EXPANSIONS

    kinds = "; ".join(f"{k}: {EXPANSIONS[k][0].summary}" for k in EXPANSIONS)
    return f"'+'-joined expansion kinds ({kinds})."


def _rate_help() -> str:
    from .layers import EXPANSIONS

    by_rate: dict = {}
    for k, classes in EXPANSIONS.items():
        by_rate.setdefault(classes[0].default_rate, []).append(k)
    defaults = ", ".join(f"{'/'.join(ks)} {'unused' if r is None else f'{r:g}'}" for r, ks in by_rate.items())
    return f"Expansion rate r >= 1 (hidden widths r*m, r*n); default per kind: {defaults}."


STRATEGY_HELP = _strategy_help()
RATE_HELP = _rate_help()

app = typer.Typer(
    name="expandctl",
    help="Train compact CNNs as linear over-parameterised chains (ExpandNets), contract them back exactly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"expandctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Expand a model for training, contract it back exactly, verify and export it."""


DynamicSizeOpt = Annotated[
    bool,
    typer.Option(
        "--dynamic-size",
        help="Symbolic image size (length; height, width; depth too) in the ONNX graph; refused for models "
        "with a fixed-size layer. Checked at the exported size and at twice it.",
    ),
]


# --- helpers ---------------------------------------------------------------------------------------
_ARGV: list[str] | None = None  # set by main(): the exact command line, for provenance


def _command_line(ctx: typer.Context) -> str:
    """The command line as typed (through :func:`main`), else rebuilt from the parsed parameters
    (when called in-process, e.g. by CliRunner, where ``sys.argv`` belongs to someone else)."""
    if _ARGV is not None:
        return shlex.join(["expandctl", *_ARGV])
    parts = ["expandctl", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or value == [] or value == ():
            continue
        if param.param_type_name == "argument":
            parts.append(str(value))
        elif isinstance(value, bool):
            parts.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                parts += [param.opts[0], str(v)]
    return shlex.join(parts)


def _show_reports(ui: UI, reports: Sequence, title: str) -> None:
    if not reports:
        return
    table = report_table(reports)
    table.title = title
    ui.detail(table)
    ui.detail(report_settings(reports))
    for n in dict.fromkeys(n for r in reports for n in r.notes):
        ui.note(f"note: {n}")


@contextlib.contextmanager
def _reports_on_failure(ui: UI) -> Iterator[None]:
    """A failed check's reports as a table before its one-line error (the workflows attach them)."""
    try:
        yield
    except CheckFailed as e:
        if getattr(e, "reports", None) is not None:
            _show_reports(ui, e.reports, e.reports_title)
        raise


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "float64": torch.float64, "fp32": torch.float32, "fp64": torch.float64}
    if name.lower() not in table:
        raise UsageError(f"--dtype must be float32 or float64, got {name!r}")
    return table[name.lower()]


def _onnx_metadata(ctx: typer.Context, ckpt: ckpt_io.Checkpoint, shape, folded: Sequence) -> dict[str, str]:
    """Provenance carried into the ONNX file's metadata_props (see docs/cli.md)."""
    return onnx_metadata(ckpt, shape, folded, _command_line(ctx))


def _contract_checked(ui: UI, ckpt: ckpt_io.Checkpoint, shape, atol, rtol, **check_kw) -> tuple[torch.nn.Module, list]:
    """The compact model and the expanded-vs-contracted reports; raises CheckFailed on a mismatch."""
    with _reports_on_failure(ui):
        return contract_checked(ckpt, shape, atol, rtol, ui, **check_kw)


# --- expand ----------------------------------------------------------------------------------------
@app.command(cls=Command)
def expand(
    ctx: typer.Context,
    src: Annotated[
        str | None,
        typer.Argument(
            metavar="SRC", help="Checkpoint, state dict or pickled model; omit to build --arch from scratch."
        ),
    ] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    input_shape: ShapeOpt = None,
    strategy: Annotated[str, typer.Option(metavar="KINDS", help=STRATEGY_HELP)] = "ck+fc",
    rate: Annotated[
        float | None,
        typer.Option(
            metavar="R", help=RATE_HELP
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", metavar="GLOB", help="Only layers whose path matches this glob (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", metavar="GLOB", help="Leave layers whose path matches this glob (repeatable)."),
    ] = None,
    pointwise: Annotated[bool, typer.Option("--pointwise", help="Also expand 1x1 convolutions with cl.")] = False,
    init: Annotated[
        str,
        typer.Option(
            metavar="scratch|preserve",
            help="scratch (fresh factors, the paper) or preserve (same function as the input).",
        ),
    ] = "scratch",
    seed: Annotated[
        int | None, typer.Option(metavar="N", help="Seed for the scratch initialisation (and a fresh --arch model).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    output: Annotated[
        str | None,
        typer.Option("-o", "--output", metavar="OUT", help="Output .pt/.safetensors (default <SRC stem>.expanded.pt)."),
    ] = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Replace layers by linear chains for training; write an expanded checkpoint."""
    from .layers import INIT_MODES

    ui = UI("expand", as_json, quiet, debug)
    with guard(ui):
        kwargs = parse_json_object(arch_kwargs)
        shape = parse_shape(input_shape)
        if init not in INIT_MODES:
            raise UsageError(f"--init must be one of {', '.join(INIT_MODES)}, got {init!r}")
        if src is None and arch is None:
            raise UsageError("give a checkpoint to expand, or --arch to build a fresh model (e.g. --arch resnet18)")
        out = None
        if not dry_run:
            if output:
                out = Path(output)
            elif src is not None:
                out = Path(src).with_name(f"{Path(src).stem}.expanded.pt")
            else:
                out = Path(f"{arch.rpartition(':')[2]}.expanded.pt")
            ckpt_io.check_output_path(out, [src] if src else [], ckpt_io.TORCH_SUFFIXES + ckpt_io.SAFETENSORS_SUFFIXES)
        if src is not None:
            ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust_pickle)
        else:
            ckpt = fresh_checkpoint(arch, kwargs, seed, ui)
        result = expand_checkpoint(
            ckpt,
            out,
            strategy=strategy,
            rate=rate,
            include=include or (),
            exclude=exclude or (),
            pointwise=pointwise,
            init=init,
            seed=seed,
            input_shape=shape,
            source=src if src is not None else "",
            dry_run=dry_run,
            command=None if dry_run else _command_line(ctx),
            progress=ui,
        )
        plan = result.plan
        if dry_run:
            ui.detail(plan_table(plan))
            ui.print(
                f"{len(plan.expanded)} of {len(plan.entries)} candidate layers would be expanded: "
                f"{fmt_count(plan.params_before)} -> {fmt_count(plan.params_after)} parameters in them; "
                "nothing written"
            )
            if not plan.expanded:
                raise plan.nothing_selected("see the reasons above. Try another --strategy, --pointwise or --include")
            ui.emit({**result.to_dict(), "source": src})
            return
        ui.detail(plan_table(plan, only_expanded=True))
        ui.detail(
            f"expanded {len(plan.expanded)} of {len(plan.entries)} candidate layers "
            f"({plan.strategy}, {fmt_rate(plan.rate)}, "
            f"init {init}): {fmt_count(result.params_before)} -> {fmt_count(result.params_after)} parameters"
        )
        for w in result.warnings:
            ui.warn(w)
        ui.print(f"wrote {out}")
        ui.emit({**result.to_dict(), "source": src})


# --- contract --------------------------------------------------------------------------------------
@app.command(cls=Command)
def contract(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(metavar="SRC", help="Expanded checkpoint.")],
    output: Annotated[str, typer.Option("-o", "--output", metavar="OUT", help="Output .pt, .safetensors or .onnx.")],
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
        out = ckpt_io.check_output_path(
            output, [src], ckpt_io.TORCH_SUFFIXES + ckpt_io.SAFETENSORS_SUFFIXES + (".onnx",)
        )
        if dynamic_size and out.suffix.lower() != ".onnx":
            raise UsageError("--dynamic-size shapes an ONNX graph; give an -o ending in .onnx")
        ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust_pickle)
        with _reports_on_failure(ui):
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
                command=_command_line(ctx),
                progress=ui,
            )
        _show_reports(ui, result.reports, "checks")
        summary = (
            f"contracted {len(result.contracted_layers)} expanded layers: "
            f"{fmt_count(result.params_before)} -> {fmt_count(result.params_after)} parameters"
        )
        if fold_bn:
            summary += f"; folded {len(result.folded_bn)} BatchNorm layers into their convs"
        ui.detail(summary)
        ui.print(f"wrote {out}")
        ui.emit(result.to_dict())


# --- verify ----------------------------------------------------------------------------------------
@app.command(cls=Command)
def verify(
    ctx: typer.Context,
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
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check that A's expanded chains equal their contraction, or that A and B compute the same outputs."""
    from .export import check_onnx_sizes
    from .rewrite import contract as contract_model
    from .rewrite import expanded_layers
    from .verify import check_contraction, compare_models

    ui = UI("verify", as_json, quiet, debug)
    with guard(ui):
        want = _dtype(dtype)
        fa = ckpt_io.sniff_format(a)
        fb = ckpt_io.sniff_format(b) if b is not None else None
        if fa == "onnx" and fb is not None and fb != "onnx":
            a, b, fa, fb = b, a, fb, fa  # the torch model is always the reference
        if fa == "onnx":
            raise UsageError(
                "verify needs a PyTorch checkpoint as reference; to check an ONNX file give it with its "
                "checkpoint "
                "(expandctl verify model.pt model.onnx)"
            )
        if fb == "onnx" and want == torch.float64:
            raise UsageError("onnxruntime runs the exported model in float32; drop --dtype float64")
        ckpt_a = load_for_cli(ui, a, arch, arch_kwargs, trust_pickle)
        if fb == "onnx" and input_shape is None:
            # The ONNX file says what it was exported with (graph input, else expandctl's metadata);
            # the checkpoint may record another shape its model also takes (contract --input-shape).
            shape = _onnx_shape(b) or input_shape_of(ckpt_a, None)
        else:
            shape = input_shape_of(ckpt_a, input_shape)
        check = {"samples": samples, "batch": batch, "seed": seed, "atol": atol, "rtol": rtol}
        if b is None:
            if not list(expanded_layers(ckpt_a.model)):
                raise UsageError(
                    f"{a} has no expanded layers, so there is nothing to contract and compare; "
                    "give a second file "
                    f"(expandctl verify {a} other.pt|other.onnx)"
                )
            compact = contract_model(ckpt_a.model)
            with ui.step("comparing the expanded model with its contraction"), running_model(shape, ckpt_a.input_shape):
                reports = check_contraction(
                    ckpt_a.model,
                    compact,
                    shape,
                    dtypes=(want,) if want else (torch.float64, torch.float32),
                    **check,
                )
            title = f"{a}: expanded (explicit) vs contracted"
        elif fb == "onnx":
            recorded = ckpt_a.input_shape
            if input_shape is None and recorded and tuple(recorded) != tuple(shape):
                # The ONNX file fixes another shape than the checkpoint records: if the checkpoint's
                # model cannot even take it, the two files are two different models.
                try:
                    run_once(ckpt_a.model, shape, a)
                except UsageError as e:
                    raise UsageError(
                        f"{a} and {b} are two different models (input shapes differ: {b} takes "
                        f"{fmt_shape(shape)}, {a} records {fmt_shape(recorded)} and fails on "
                        f"{fmt_shape(shape)}: {backend_message(e.__cause__ or e)}); verify a checkpoint "
                        "against the ONNX file contracted or exported from it"
                    ) from None
            sizes = [shape, second_size(shape)] if onnx_dynamic_size(b) else [shape]  # a dynamic-size file: two
            with ui.step(f"comparing {a} with {b} in onnxruntime"), running_model(shape, ckpt_a.input_shape, a):
                reports = [check_onnx_sizes(ckpt_a.model, b, sizes, (batch,), atol, rtol, samples=samples, seed=seed)]
            title = f"{a} vs {b} (onnxruntime)"
        else:
            ckpt_b = load_for_cli(ui, b, arch, arch_kwargs, trust_pickle)
            sa, sb = ckpt_a.input_shape, ckpt_b.input_shape
            if input_shape is None and sa and sb and tuple(sa) != tuple(sb):
                raise UsageError(
                    f"{a} takes inputs of shape {fmt_shape(sa)} and {b} takes {fmt_shape(sb)} (as their files "
                    "record), so they are not two forms of one model; pass --input-shape to compare them anyway"
                )
            for path, model in ((a, ckpt_a.model), (b, ckpt_b.model)):
                run_once(model, shape, path)  # a model that cannot take the shape is exit 2, not a NaN check
            with ui.step(f"comparing {a} with {b}"), running_model(shape):
                reports = [compare_models(ckpt_a.model, ckpt_b.model, shape, dtype=want or torch.float64, **check)]
            title = f"{a} vs {b}"
        _show_reports(ui, reports, title)
        details = {"files": [a, b] if b else [a], "input_shape": list(shape)}
        if failed_reports(reports):
            raise check_failed(
                "outputs differ beyond the tolerances: " + "; ".join(r.summary() for r in failed_reports(reports)),
                reports,
                **details,
            )
        ui.print("[green]passed[/green]")
        ui.emit({"passed": True, **details, "checks": [r.to_dict() for r in reports]})


# --- export ----------------------------------------------------------------------------------------
@app.command(cls=Command)
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
    from .export import export_onnx
    from .rewrite import expanded_layers

    ui = UI("export", as_json, quiet, debug)
    with guard(ui):
        out = ckpt_io.check_output_path(output, [src], (".onnx",))
        ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust_pickle)
        shape = input_shape_of(ckpt, input_shape)
        reports: list = []
        model = ckpt.model
        if list(expanded_layers(model)):
            model, reports = _contract_checked(ui, ckpt, shape, atol, rtol)
        with ui.step(f"exporting {out} and checking it with onnxruntime"), running_model(shape, ckpt.input_shape):
            try:
                _, report = export_onnx(
                    model,
                    out,
                    shape,
                    opset=opset,
                    dynamic_batch=dynamic_batch,
                    dynamic_size=dynamic_size,
                    metadata=_onnx_metadata(ctx, ckpt, shape, ckpt.folded_bn),
                    atol=atol,
                    rtol=rtol,
                )
            except CheckFailed as e:
                if getattr(e, "report", None) is not None:
                    reports.append(e.report)
                    _show_reports(ui, reports, "checks")
                    raise check_failed(str(e) + "; nothing was written", reports) from None
                raise
        if report is not None:
            reports.append(report)
        _show_reports(ui, reports, "checks")
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


# --- inspect ---------------------------------------------------------------------------------------
@app.command(cls=Command)
def inspect(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(metavar="SRC", help="Checkpoint, state dict, pickled model or ONNX file.")],
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show what a file is: format, architecture, input shape, expanded layers, parameters, provenance."""
    from .rewrite import contract as contract_model
    from .rewrite import expanded_layers

    ui = UI("inspect", as_json, quiet, debug)
    with guard(ui):
        fmt = ckpt_io.sniff_format(src)
        if fmt == "onnx":
            info = ckpt_io.describe_onnx(src)
            meta = info.pop("metadata")
            ui.print(kv_table(list(info.items()), title=src))
            if meta:
                ui.print(kv_table([(k, _short_meta(k, v)) for k, v in meta.items()], title="metadata_props"))
            ui.note(f"note: {ONNX_PARAMETERS_NOTE}")
            ui.emit({**info, "parameters_note": ONNX_PARAMETERS_NOTE, "metadata": meta})
            return
        try:
            ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust_pickle)
        except ckpt_io.NeedsArchError:
            info = ckpt_io.describe_state_dict(src)
            if info is None:
                raise
            ui.print(kv_table(list(info.items()), title=src))
            ui.note("a plain state dict: pass --arch (and --arch-kwargs) to see the model")
            ui.emit({**info, "arch": None})
            return
        # The fit residual of --init preserve is known when the layer is fitted: the plan records it.
        planned = {e.get("path"): e for e in (ckpt.plan or {}).get("layers", []) if isinstance(e, dict)}
        rows = []
        for path, layer in expanded_layers(ckpt.model):
            rows.append(
                {
                    "path": path,
                    "kind": layer.kind,
                    "factors": layer.extra_repr(),
                    "params": sum(p.numel() for p in layer.parameters()),
                    "compact_params": sum(p.numel() for p in layer.contract().parameters()),
                    "fit_residual": planned.get(path, {}).get("fit_residual", layer.fit_residual),
                }
            )
        total = count_params(ckpt.model)
        compact = count_params(contract_model(ckpt.model)) if rows else total
        header = ckpt.header()
        ui.print(
            kv_table(
                [
                    (
                        "format",
                        f"{ckpt.format}" + (f" v{ckpt.format_version}" if ckpt.format_version else ""),
                    ),
                    (
                        "architecture",
                        f"{ckpt.arch or 'unknown (pass --arch)'} {json.dumps(ckpt.arch_kwargs)}",
                    ),
                    (
                        "input shape",
                        ",".join(map(str, ckpt.input_shape)) if ckpt.input_shape else "unknown (pass --input-shape)",
                    ),
                    (
                        "parameters",
                        f"{fmt_count(total)}" + (f" (compact: {fmt_count(compact)})" if rows else ""),
                    ),
                    ("expanded layers", len(rows)),
                    ("plan", f"{ckpt.plan['strategy']}, {fmt_rate(ckpt.plan['rate'])}" if ckpt.plan else None),
                    ("folded BatchNorm", len(ckpt.folded_bn) if ckpt.folded_bn else None),
                    ("extra", ", ".join(sorted(ckpt.extra)) or None),
                    ("sha256", ckpt.sha256),
                ],
                title=src,
            )
        )
        if rows:
            ui.print(layers_table(rows))
        if ckpt.provenance:
            ui.print(kv_table(list(ckpt.provenance.items()), title="provenance"))
        ui.emit({**header, "params": total, "compact_params": compact, "expanded_layers": rows})


# --- evaluate --------------------------------------------------------------------------------------
@app.command(cls=Command)
def evaluate(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Checkpoint (run in torch) or ONNX file (onnxruntime).")],
    data: Annotated[str, typer.Option("--data", metavar="SPEC", help="Data spec, e.g. digits, cifar10:DIR.")],
    split: Annotated[str, typer.Option(metavar="val|train", help="Which split to score.")] = "val",
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per batch.")] = 256,
    channels: ChannelsOpt = None,
    image_size: ImageSizeOpt = None,
    augment: AugmentOpt = None,
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
    from .datasets import load_data
    from .evaluate import evaluate_onnx, evaluate_torch

    ui = UI("evaluate", as_json, quiet, debug)
    with guard(ui):
        if split not in ("val", "train"):
            raise UsageError(f"--split must be val or train, not {split!r}")
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        opts = data_options(channels, image_size, augment, train_subset, download, val_fraction)
        if ckpt_io.sniff_format(src) == "onnx":
            shape = _onnx_shape(src)
            sets = load_data(data, shape, augment=False, options=opts)
            if shape and tuple(shape) != tuple(sets.input_shape):  # a fixed-shape graph: known before running
                raise data_mismatch(None, src, shape, data, sets.input_shape)
            with ui.step(f"scoring {src} on {data} ({split}) in onnxruntime"):
                result = evaluate_onnx(src, getattr(sets, split), batch_size, num_classes=sets.num_classes)
        else:
            ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust_pickle)
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
        ui.emit({"source": src, "data": data, "split": split, **result})


def _register_train() -> None:
    """``expandctl train`` lives in :mod:`expandctl.train.command` (errors through ``cli_common.guard``)."""
    from .train.command import train

    app.command("train", cls=Command)(train)


_register_train()


def _register_analysis() -> None:
    """``expandctl analyze ...`` and ``expandctl plot`` live in :mod:`expandctl.analysis.command`."""
    from .analysis.command import analyze_app, plot

    app.add_typer(analyze_app, name="analyze")
    app.command("plot", cls=Command)(plot)


_register_analysis()


def _register_compare() -> None:
    """``expandctl compare`` lives in :mod:`expandctl.experiments.command`."""
    from .experiments.command import compare

    app.command("compare", cls=Command)(compare)


_register_compare()


def _register_quantize() -> None:
    """``expandctl quantize`` lives in :mod:`expandctl.quantize_command`."""
    from .quantize_command import quantize

    app.command("quantize", cls=Command)(quantize)


_register_quantize()


def _onnx_shape(path: str) -> tuple[int, ...] | None:
    """The per-sample input shape an ONNX file was exported with: its graph input's fixed dimensions,
    else the ``expandctl.input_shape`` metadata (a file exported with dynamic height and width)."""
    shape = onnx_input_shape(path)
    if shape:
        return shape
    meta = ckpt_io.describe_onnx(path)["metadata"]
    with contextlib.suppress(ValueError, TypeError):
        recorded = json.loads(meta.get("expandctl.input_shape", "null"))
        if isinstance(recorded, list) and recorded and all(isinstance(d, int) and d > 0 for d in recorded):
            return tuple(recorded)
    return None


def _short_meta(key: str, value: str) -> str:
    """The plan and provenance are long JSON: summarise them (``--json`` has them whole)."""
    try:
        data = json.loads(value) if key in ("expandctl.plan", "expandctl.source_provenance") else None
    except ValueError:
        return value
    if key == "expandctl.plan" and isinstance(data, dict):
        done = [e["path"] for e in data.get("layers", []) if e.get("kind")]
        return f"{data.get('strategy')}, {fmt_rate(data.get('rate'))}, {len(done)} layers expanded (whole plan: --json)"
    if key == "expandctl.source_provenance" and isinstance(data, dict):
        return ", ".join(f"{k}={v}" for k, v in data.items() if k in ("command", "time", "expandctl_version"))
    return value


def main() -> None:
    """Console-script entry point: click's own usage errors also honour ``--json``."""
    global _ARGV
    _ARGV = sys.argv[1:]
    try:
        rv = app(prog_name="expandctl", standalone_mode=False)
    except typer.TyperException as e:  # click's usage errors (missing option, bad value...)
        if "--json" in sys.argv[1:]:
            # The same keys as every other error (console.UI.error), so a pipeline parses one shape.
            ctx = getattr(e, "ctx", None)
            command = ctx.command_path.partition(" ")[2] if ctx is not None else None
            payload = {
                "ok": False,
                "command": command or None,
                "error": e.format_message(),
                "exit_code": e.exit_code,
                "error_type": type(e).__name__,
            }
            sys.stdout.write(json.dumps(payload) + "\n")
        e.show()
        rv = e.exit_code
    except typer.Abort:
        rv = EXIT_INTERRUPTED
    finally:
        _ARGV = None
    sys.exit(rv if isinstance(rv, int) else 0)

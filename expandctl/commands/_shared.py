"""What the commands share: the command line for provenance, check-report tables, ONNX helpers. CLI only."""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Iterator, Sequence
from typing import Annotated

import torch
import typer

from .. import checkpoint as ckpt_io
from ..console import UI, report_settings, report_table
from ..errors import CheckFailed, UsageError
from ..shapes import onnx_input_shape
from ..workflows import contract_checked, onnx_metadata

DynamicSizeOpt = Annotated[
    bool,
    typer.Option(
        "--dynamic-size",
        help="Symbolic image size (length; height, width; depth too) in the ONNX graph; refused for models "
        "with a fixed-size layer. Checked at the exported size and at twice it.",
    ),
]


_ARGV: list[str] | None = None  # set by expandctl.cli.main(): the exact command line, for provenance


def command_line(ctx: typer.Context) -> str:
    """The command line as typed (through :func:`expandctl.cli.main`), else rebuilt from the parsed parameters
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


def show_reports(ui: UI, reports: Sequence, title: str) -> None:
    if not reports:
        return
    table = report_table(reports)
    table.title = title
    ui.detail(table)
    ui.detail(report_settings(reports))
    for n in dict.fromkeys(n for r in reports for n in r.notes):
        ui.note(f"note: {n}")


@contextlib.contextmanager
def reports_on_failure(ui: UI) -> Iterator[None]:
    """A failed check's reports as a table before its one-line error (the workflows attach them)."""
    try:
        yield
    except CheckFailed as e:
        if getattr(e, "reports", None) is not None:
            show_reports(ui, e.reports, e.reports_title)
        raise


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "float64": torch.float64, "fp32": torch.float32, "fp64": torch.float64}
    if name.lower() not in table:
        raise UsageError(f"--dtype must be float32 or float64, got {name!r}")
    return table[name.lower()]


def onnx_metadata_of(ctx: typer.Context, ckpt: ckpt_io.Checkpoint, shape, folded: Sequence) -> dict[str, str]:
    """Provenance carried into the ONNX file's metadata_props (see docs/cli.md)."""
    return onnx_metadata(ckpt, shape, folded, command_line(ctx))


def contract_checked_cli(
    ui: UI, ckpt: ckpt_io.Checkpoint, shape, atol, rtol, **check_kw
) -> tuple[torch.nn.Module, list]:
    """The compact model and the expanded-vs-contracted reports; raises CheckFailed on a mismatch."""
    with reports_on_failure(ui):
        return contract_checked(ckpt, shape, atol, rtol, ui, **check_kw)


def onnx_shape(path: str) -> tuple[int, ...] | None:
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

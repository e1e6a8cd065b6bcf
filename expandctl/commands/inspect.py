"""``expandctl inspect``: what a checkpoint or ONNX file holds.

The workflow is :func:`expandctl.workflows.inspect_file`; this module parses, calls it and prints. The library
is imported inside the command so that ``--help`` loads no torch. Registered in :mod:`expandctl.cli`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..console import UI, fmt_count, fmt_rate, kv_table, layers_table
from .runtime import ModelFlags, command


@command("inspect", load=True)
def inspect(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Checkpoint, state dict, pickled model or ONNX file.")],
    *,
    ui: UI,
    model: ModelFlags,
) -> None:
    """Show what a file is: format, architecture, input shape, expanded layers, parameters, provenance."""
    from ..checkpoint.describe import ONNX_PARAMETERS_NOTE
    from ..workflows import inspect_file

    result = inspect_file(src, **model.library(), progress=ui)
    if result.kind == "onnx":
        ui.print(kv_table(list(result.info.items()), title=src))
        if result.metadata:
            ui.print(kv_table([(k, _short_meta(k, v)) for k, v in result.metadata.items()], title="metadata_props"))
        ui.note(f"note: {ONNX_PARAMETERS_NOTE}")
    elif result.kind == "state_dict":
        ui.print(kv_table(list(result.info.items()), title=src))
        ui.note("a plain state dict: pass --arch (and --arch-kwargs) to see the model")
    else:
        ui.print(kv_table(_summary(result), title=src))
        if result.layers:
            ui.print(layers_table(result.layers))
        if result.checkpoint.provenance:
            ui.print(kv_table(list(result.checkpoint.provenance.items()), title="provenance"))
    ui.emit(result.to_dict())


def _summary(result) -> list[tuple]:
    """The rows of a checkpoint's table: what it is, what it builds, what it holds."""
    ckpt, expanded = result.checkpoint, bool(result.layers)
    compact = f" (compact: {fmt_count(result.compact_params)})" if expanded else ""
    return [
        ("format", f"{ckpt.format}" + (f" v{ckpt.format_version}" if ckpt.format_version else "")),
        ("architecture", f"{ckpt.arch or 'unknown (pass --arch)'} {json.dumps(ckpt.arch_kwargs)}"),
        (
            "input shape",
            ",".join(map(str, ckpt.input_shape)) if ckpt.input_shape else "unknown (pass --input-shape)",
        ),
        ("parameters", f"{fmt_count(result.params)}{compact}"),
        ("expanded layers", len(result.layers)),
        ("plan", f"{ckpt.plan['strategy']}, {fmt_rate(ckpt.plan['rate'])}" if ckpt.plan else None),
        ("folded BatchNorm", len(ckpt.folded_bn) if ckpt.folded_bn else None),
        ("extra", ", ".join(sorted(ckpt.extra)) or None),
        ("sha256", ckpt.sha256),
    ]


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

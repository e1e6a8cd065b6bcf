"""``expandctl inspect``: what a checkpoint or ONNX file holds.

Parses, calls the library and prints; registered in :mod:`expandctl.cli`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .. import checkpoint as ckpt_io
from ..checkpoint.describe import ONNX_PARAMETERS_NOTE
from ..console import UI, fmt_count, fmt_rate, kv_table, layers_table
from ..sizes import count_params
from .options import ArchKwOpt, ArchOpt, DebugOpt, JsonOpt, QuietOpt, TrustOpt
from .runtime import guard, load_for_cli


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
    from ..rewrite import contract as contract_model
    from ..rewrite import expanded_layers

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

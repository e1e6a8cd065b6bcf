"""``expandctl expand``: plan, expand and write a checkpoint.

The workflow is :func:`expandctl.workflows.expand_checkpoint`; this module parses, calls it and prints.
Registered in :mod:`expandctl.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import checkpoint as ckpt_io
from ..console import UI, fmt_count, fmt_rate, plan_table
from ..errors import UsageError
from ..workflows import expand_checkpoint, fresh_checkpoint
from .options import ArchKwOpt, ArchOpt, DebugOpt, JsonOpt, QuietOpt, ShapeOpt, TrustOpt
from .runtime import command_line, guard, load_for_cli, parse_json_object, parse_shape


def _strategy_help() -> str:
    """``--strategy`` help, read from the registry (a new kind shows up here by registering)."""
    from ..layers import EXPANSIONS

    kinds = "; ".join(f"{k}: {EXPANSIONS[k][0].summary}" for k in EXPANSIONS)
    return f"'+'-joined expansion kinds ({kinds})."


def _rate_help() -> str:
    from ..layers import EXPANSIONS

    by_rate: dict = {}
    for k, classes in EXPANSIONS.items():
        by_rate.setdefault(classes[0].default_rate, []).append(k)
    defaults = ", ".join(f"{'/'.join(ks)} {'unused' if r is None else f'{r:g}'}" for r, ks in by_rate.items())
    return f"Expansion rate r >= 1 (hidden widths r*m, r*n); default per kind: {defaults}."


STRATEGY_HELP = _strategy_help()
RATE_HELP = _rate_help()


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
        typer.Option(metavar="R", help=RATE_HELP),
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
    from ..layers import INIT_MODES

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
            command=None if dry_run else command_line(ctx),
            progress=ui,
        )
        plan = result.plan
        if dry_run:
            ui.detail(plan_table(plan))
            for w in result.warnings:
                ui.warn(w)
            ui.print(
                f"{len(plan.expanded)} of {len(plan.entries)} candidate layers would be expanded: "
                f"{fmt_count(plan.params_before)} -> {fmt_count(plan.params_after)} parameters in them; "
                "nothing written"
            )
            for w in result.warnings:
                ui.warn(w)
            if not plan.expanded:
                where = ("""in the JSON object's "plan"."layers"[].reason""" if ui.json
                         else "shown without --quiet" if ui.quiet else "in the table above")  # fmt: skip
                err = plan.nothing_selected(
                    f"each layer's reason is {where}. Try another --strategy, --pointwise or --include"
                )
                err.details = {"plan": plan.to_dict()}
                raise err
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

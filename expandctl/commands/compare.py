"""``expandctl compare``: the options to :func:`expandctl.workflows.compare.compare`, its runs and report printed.

Output follows the other commands (:mod:`expandctl.console`): a line per run as it finishes and the
report's table and verdict on stdout; ``--json``: exactly one JSON object on stdout at the end
(the report, also written to ``OUT/report.json``; an error object on failure).

Torch-free at import: the library is imported inside the command, so that ``--help`` loads no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..console import UI
from ..errors import UsageError
from .options import (
    ADAPTER_OPTIONS,
    LOAD_OPTIONS,
    OUTPUT_OPTIONS,
    DeviceOpt,
    KdTemperatureOpt,
    LrOpt,
    MomentumOpt,
    NesterovOpt,
    OptimizerOpt,
    PreciseBnOpt,
    ShapeOpt,
    WeightDecayOpt,
    data_help,
    with_options,
)
from .runtime import guard, load_for_cli, parse_json_object, parse_shape

__all__ = ["compare"]


def _table(summary: dict) -> Table:
    from ..experiments.report import TABLE_HEADER, table_row

    t = Table(title="expandctl compare: contracted models on the validation split", title_justify="left")
    for col in TABLE_HEADER:
        t.add_column(col, overflow="fold", justify="left" if col == "strategy" else "right")
    for r in summary["strategies"]:
        cells = table_row(r)
        if r["status"] != "ok":
            cells = [cells[0], cells[1], f"[dim]{escape(cells[2])}[/dim]", *cells[3:]]
        elif r["strategy"] in summary["better"]:
            cells[3] = f"[green]{cells[3]}[/green]"
        elif r["strategy"] in summary["worse"]:
            cells[3] = f"[red]{cells[3]}[/red]"
        t.add_row(*cells)
    return t


def _dry_run(ui: UI, plan) -> None:
    """What compare would run, and nothing else: no folder is written."""
    from ..experiments.compare import fmt_strategy_rate, run_name

    t = Table(title="expandctl compare --dry-run: the runs it would do", title_justify="left")
    for col in ("strategy", "rate", "params trained", "expanded layers", "runs"):
        t.add_column(col, overflow="fold", justify="left" if col in ("strategy", "expanded layers") else "right")
    for s in plan.runnable:
        d = plan.details[s]
        runs = [run_name(st, seed) for st, seed in plan.todo if st == s]
        layers = ", ".join(d["layers"]) or "-"
        t.add_row(s, fmt_strategy_rate(d["rate"]), f"{d['params']:,}", escape(layers), str(len(runs)))
    ui.detail(t)
    for s, why in plan.skipped.items():
        ui.print(escape(f"{s}: skipped, {why}"))
    done, out = plan.finished, plan.out
    ui.print(escape(
        f"would run {len(plan.todo) - len(done)} runs ({len(plan.runnable)} strategies x {plan.seeds} seeds"
        + (f", {len(done)} already finished in {out}" if done else "") + f") in {out}; nothing trained or written"
    ))  # fmt: skip
    ui.emit(plan.to_dict())


def _show(ui: UI, result) -> None:
    summary = result.report
    if not ui.quiet:
        ui.print(_table(summary))
        for r in summary["strategies"]:
            if r["status"] != "ok":
                ui.print(escape(f"{r['strategy']}: {r['status']}, {r['reason']}"))
    ui.print(escape(f"verdict: {summary['verdict']}"))
    for note in summary.get("cost_notes") or ():
        ui.warn(f"cost: {note}")
    ui.print(escape(f"wrote {', '.join(result.files.values())}"))
    ui.emit(result.to_dict())


def _on_event(ui: UI):
    """Each run as it starts (a note) and finishes (a line)."""
    from ..experiments.compare import run_name

    def on_event(kind: str, strategy: str, seed: int, record: dict | None) -> None:
        if kind == "done":
            ui.print(escape(
                f"{run_name(strategy, seed)}: {100 * record['final_acc']:.2f}% contracted, "
                f"{record['seconds_per_epoch']:.2f} s/epoch, {record['peak_memory_mib']:.0f} MiB peak"
                + (" (resumed)" if record["resumed"] else "")
            ))  # fmt: skip
        elif kind == "start":
            ui.note(f"training {run_name(strategy, seed)}")

    return on_event


@with_options(ADAPTER_OPTIONS, {"input_shape": (ShapeOpt, None)}, LOAD_OPTIONS, OUTPUT_OPTIONS)
def compare(
    model: Annotated[
        Path | None,
        typer.Argument(metavar="MODEL", help="The compact model (any checkpoint expandctl loads); or give --arch."),
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help=data_help("Data spec, as for train (required)"))] = None,
    strategies: Annotated[
        str,
        typer.Option(
            metavar="LIST",
            help="Comma-separated strategies: compact (the baseline, always run) and '+'-joined expansion kinds "
            "(see expandctl expand --strategy), e.g. compact,ck,cl,ck+fc.",
        ),
    ] = "compact,ck,cl",
    seeds: Annotated[int, typer.Option(metavar="N", help="Seeds 0..N-1 per strategy.")] = 3,
    epochs: Annotated[int, typer.Option(help="Epochs per run.")] = 30,
    out: Annotated[
        Path,
        typer.Option("--out", help="Study folder: run files, report.md/.json, figures (shared by --jobs, --shard)."),
    ] = Path("compare"),
    jobs: Annotated[int, typer.Option(metavar="J", help="Runs trained at once (one process, one thread each).")] = 1,
    shard: Annotated[
        str | None,
        typer.Option(metavar="I/N", help="Run only the I-th of N slices (1-based): one per machine sharing --out."),
    ] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Train nothing; write the report.")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the runs it would do (rate and parameters of each strategy, the "
            "strategies skipped and why); train and write nothing.",
        ),
    ] = False,
    threads: Annotated[
        int, typer.Option(metavar="N", help="Torch CPU threads per run (train's --threads, for each run).")
    ] = 1,
    nproc_per_run: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Processes per run: each run data-parallel under torchrun (as `torchrun --nproc_per_node N "
            "expandctl train`); the effective batch is N x --batch-size.",
        ),
    ] = 1,
    rate: Annotated[
        float | None,
        typer.Option(
            metavar="R",
            help="Expansion rate of every strategy; default: each kind's own, as in expand (ck/cl/fc 4, dbb/orepa 1).",
        ),
    ] = None,
    include: Annotated[list[str] | None, typer.Option("--include", metavar="GLOB", help="Expand only these.")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", metavar="GLOB", help="Never expand these.")] = None,
    pointwise: Annotated[bool, typer.Option("--pointwise", help="Also expand 1x1 convolutions with cl.")] = False,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 128,
    accumulate: Annotated[int, typer.Option(metavar="N", help="Mini-batches per optimizer step.")] = 1,
    lr: LrOpt = 0.01,
    optimizer: OptimizerOpt = "sgd",
    momentum: MomentumOpt = 0.9,
    nesterov: NesterovOpt = False,
    schedule: Annotated[str, typer.Option(help="paper, step or cosine (see expandctl train).")] = "paper",
    weight_decay: WeightDecayOpt = 0.0,
    decay_on: Annotated[str, typer.Option(help="factors or product (see expandctl train).")] = "factors",
    teacher: Annotated[Path | None, typer.Option(help="Distil every run from this checkpoint (Hinton KD).")] = None,
    kd_alpha: Annotated[float, typer.Option(help="Weight of the distillation term.")] = 0.9,
    kd_temperature: KdTemperatureOpt = 4.0,
    nonlinear_warmup: Annotated[int, typer.Option(metavar="EPOCHS", help="Epochs with ReLUs between factors.")] = 0,
    precise_bn: PreciseBnOpt = 0,
    forward: Annotated[str, typer.Option(help="fused or explicit (see expandctl train).")] = "fused",
    device: DeviceOpt = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader worker processes per run.")] = 0,
    **opts,
) -> None:
    """Train compact and each expansion with several seeds, same recipe; report what helps, at what cost."""
    flags = {k: v for k, v in {**locals(), **opts}.items() if k != "opts" and k not in OUTPUT_OPTIONS}
    from ..experiments.compare import RECIPE_FIELDS
    from ..workflows.compare import CompareOptions
    from ..workflows.compare import compare as run_compare

    ui = UI("compare", opts["as_json"], opts["quiet"], opts["debug"])
    with guard(ui):
        flags.update(model=str(model) if model else None, teacher=str(teacher) if teacher else None,
                     include=tuple(include or ()), exclude=tuple(exclude or ()),
                     input_shape=parse_shape(opts["input_shape"]),
                     arch_kwargs=parse_json_object(opts["arch_kwargs"]) if model is None else None)  # fmt: skip
        recipe = {k: flags.pop(k) for k in RECIPE_FIELDS}
        options = CompareOptions(**flags, train=recipe)  # every other flag is a field of the same name
        if not (report_only and model is None and opts["arch"] is None and data is None) and not data:
            raise UsageError("--data is required: the data set to train and score on (e.g. --data digits)")

        def load(path: str):
            return load_for_cli(ui, path, opts["arch"], opts["arch_kwargs"], opts["trust_pickle"])

        result = run_compare(options, load=load, progress=ui, on_event=_on_event(ui))
        (_dry_run if dry_run else _show)(ui, result)

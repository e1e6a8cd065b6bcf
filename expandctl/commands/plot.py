"""``expandctl plot``: overlay the curves of several training runs (:func:`expandctl.workflows.plot.plot_runs`).

Torch-free at import: the library is imported inside the command, so that ``--help`` loads no torch.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..console import UI
from ..errors import UsageError
from .options import OUTPUT_OPTIONS, with_options
from .runtime import guard

__all__ = ["plot"]

COLUMNS = ("label", "run", "epochs", "train loss", "train acc", "val loss", "val acc", "best val acc")


@with_options(OUTPUT_OPTIONS)
def plot(
    runs: Annotated[
        list[str], typer.Argument(metavar="RUN_DIR", help="Run folders of expandctl train (metrics.jsonl).")
    ],
    output: Annotated[str, typer.Option("-o", "--output", metavar="PNG", help="Figure to write.")] = "runs.png",
    labels: Annotated[
        str | None, typer.Option(metavar="A,B,...", help="Legend labels, one per run (default: the folder names).")
    ] = None,
    title: Annotated[str | None, typer.Option(help="Figure title.")] = None,
    **opts,
) -> None:
    """Overlay the training and validation curves of several runs (loss, error, gradient confusion)."""
    from ..workflows.plot import plot_runs

    ui = UI("plot", opts["as_json"], opts["quiet"], opts["debug"])
    with guard(ui):
        names = None if labels is None else [s.strip() for s in labels.split(",")]
        if names is not None and len(names) != len(runs):
            raise UsageError(f"--labels gives {len(names)} labels for {len(runs)} runs; give one per run")
        result = plot_runs(runs, output, names, title)
        table = Table(title="runs", title_justify="left")
        for col in COLUMNS:
            table.add_column(col, overflow="fold")
        for r in result.runs:
            last = r["final"]
            table.add_row(
                r["label"], r["run"], str(r["epochs"]), _num(last.get("train_loss")), _pct(last.get("train_acc")),
                _num(last.get("val_loss")), _pct(last.get("val_acc")), _pct(r["best_val_acc"]),
            )  # fmt: skip
        ui.detail(table)
        ui.print(f"wrote {result.output}")
        ui.emit(result.to_dict())


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def _pct(x) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "-"

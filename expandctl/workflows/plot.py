"""``expandctl plot`` as a library function: overlay the curves of several training runs. Never prints.

>>> from expandctl.workflows.plot import plot_runs
>>> plot_runs(["runs/compact", "runs/ck"], "runs.png").to_dict()["runs"][0]["best_val_acc"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ckpt_io
from ..analysis.plots import plot_runs as draw_runs
from ..analysis.plots import read_metrics
from ..errors import UsageError

__all__ = ["PlotResult", "plot_runs", "run_labels"]


@dataclass
class PlotResult:
    """The figure written and, per run, its label, length, last epoch's metrics and best validation accuracy."""

    output: Path
    runs: list[dict]

    def to_dict(self) -> dict:
        return {"output": str(self.output), "runs": self.runs}


def run_labels(runs: Sequence[str], labels: Sequence[str] | None = None) -> list[str]:
    """``labels`` (one per run), else each run folder's name (the paths as given where two names are equal)."""
    if labels is not None:
        if len(labels) != len(runs):
            raise UsageError(f"{len(labels)} labels for {len(runs)} runs; give one per run")
        return list(labels)
    names = [Path(r).resolve().name if Path(r).is_dir() else Path(r).resolve().parent.name for r in runs]
    if len(set(names)) < len(names):  # e.g. a/run and b/run: the paths as typed tell them apart
        names = list(runs)
    return names


def plot_runs(
    runs: Sequence[str], output: str | Path = "runs.png", labels: Sequence[str] | None = None, title: str | None = None
) -> PlotResult:
    """Overlay the training and validation curves (loss, error, gradient confusion) of the run folders of
    ``expandctl train`` (their metrics.jsonl) in one figure, written atomically to ``output`` (.png)."""
    out = ckpt_io.check_output_path(output, [], (".png",))
    names = run_labels(runs, labels)
    histories = [read_metrics(run) for run in runs]
    with ckpt_io.atomic_write(out) as tmp:
        draw_runs(list(zip(names, histories)), tmp, title)
    summary = []
    for name, run, history in zip(names, runs, histories):
        accs = [row["val_acc"] for row in history if isinstance(row.get("val_acc"), (int, float))]
        best = max(accs) if accs else None
        summary.append({"label": name, "run": run, "epochs": len(history), "final": history[-1], "best_val_acc": best})
    return PlotResult(out, summary)

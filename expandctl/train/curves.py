"""``curves.png``: training and validation loss and accuracy per epoch (matplotlib, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(history: Sequence[dict], path: str | Path, title: str | None = None) -> None:
    """Two panels (loss, accuracy in %), train and validation, written to ``path`` as PNG.

    Uses ``matplotlib.figure.Figure`` directly: the Agg canvas, no global pyplot figure, so it is safe
    on headless machines and from any thread.
    """
    from matplotlib.figure import Figure  # lazy: matplotlib takes a second to import; only when plotting

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split, style in (("train", "-"), ("val", "--")):
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in history], style, marker=".", label=split)
        ax_acc.plot(epochs, [100 * row[f"{split}_acc"] for row in history], style, marker=".", label=split)
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png", dpi=100)

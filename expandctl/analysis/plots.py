"""Figures of the analyses: gradient-confusion densities, loss landscapes, runs side by side.

Each function writes one PNG with ``matplotlib.figure.Figure`` (the Agg canvas, no pyplot state):
safe on headless machines. Paths are written as given; the CLI passes a temporary file of
:func:`expandctl.checkpoint.atomic_write`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError

__all__ = [
    "scott_bandwidth",
    "gaussian_kde",
    "plot_confusion",
    "plot_landscape",
    "read_metrics",
    "plot_runs",
]

#: Bandwidth used when the samples have no spread (all equal): a narrow bump instead of a division by 0.
MIN_BANDWIDTH = 1e-3


def scott_bandwidth(samples: Sequence[float]) -> float:
    """Scott's rule in 1D, as ``scipy.stats.gaussian_kde`` uses it: ``std (ddof=1) * n ** (-1/5)``."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size < 2:
        return MIN_BANDWIDTH
    h = float(x.std(ddof=1)) * x.size ** (-1 / 5)
    return h if h > 0 else MIN_BANDWIDTH


def gaussian_kde(samples: Sequence[float], points: Sequence[float], bandwidth: float | None = None) -> np.ndarray:
    """Gaussian kernel density estimate of ``samples`` at ``points`` (Scott's bandwidth by default)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise ValueError("a density needs at least one sample")
    h = scott_bandwidth(x) if bandwidth is None else float(bandwidth)
    z = (np.asarray(points, dtype=np.float64)[:, None] - x[None, :]) / h
    return np.exp(-0.5 * z**2).sum(axis=1) / (x.size * h * math.sqrt(2 * math.pi))


def _figure(size):
    from matplotlib.figure import Figure  # lazy: matplotlib loads only when a figure is drawn

    return Figure(figsize=size, layout="constrained")


def plot_confusion(series: Mapping[str, Sequence[float]], path: str | Path, title: str | None = None) -> None:
    """Kernel density of pairwise cosine similarities, one curve per labelled series, with a rug of
    the samples and the minimum marked (the paper's Fig. 2, right)."""
    fig = _figure((6, 4))
    ax = fig.subplots()
    for k, (label, sims) in enumerate(series.items()):
        sims = np.asarray(sims, dtype=np.float64)
        h = scott_bandwidth(sims)
        lo, hi = max(-1.0, sims.min() - 4 * h), min(1.0, sims.max() + 4 * h)
        xs = np.linspace(lo, hi, 400) if hi > lo else np.array([lo - h, lo, lo + h])
        color = f"C{k}"
        ax.plot(
            xs, gaussian_kde(sims, xs, h), color=color, label=f"{label} (min {sims.min():.3f}, mean {sims.mean():.3f})"
        )
        ax.plot(sims, np.zeros_like(sims), "|", color=color, alpha=0.5, markersize=10)
        ax.axvline(sims.min(), color=color, linestyle=":", alpha=0.8)
    ax.axvline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel("cosine similarity of mini-batch gradients")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    fig.savefig(path, format="png", dpi=100)


def plot_landscape(result: Mapping, path: str | Path, title: str | None = None) -> None:
    """A :func:`~expandctl.analysis.landscape.loss_landscape` result: loss and error (%) against the
    step along the direction (1D), or their contour plots over the plane (2D)."""
    if result["dims"] == 1:
        fig = _figure((6, 4))
        ax = fig.subplots()
        ax.plot(result["alphas"], result["loss"], "-", marker=".", color="C0", label="loss")
        ax.set_xlabel("step along the filter-normalised direction")
        ax.set_ylabel("loss", color="C0")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(result["alphas"], [100 * e for e in result["error"]], "--", marker=".", color="C1", label="error")
        ax2.set_ylabel("error (%)", color="C1")
        ax2.set_ylim(0, 100)
    else:
        fig = _figure((11, 4.5))
        axes = fig.subplots(1, 2)
        a, b = np.meshgrid(result["alphas"], result["betas"], indexing="ij")
        for ax, key, scale, label in ((axes[0], "loss", 1, "loss"), (axes[1], "error", 100, "error (%)")):
            z = np.asarray(result[key], dtype=np.float64) * scale
            if np.ptp(z) > 0:
                lines = ax.contour(a, b, z, levels=15, cmap="viridis")
                ax.clabel(lines, inline=True, fontsize=7, fmt="%.3g")
            ax.plot([0], [0], "k+", markersize=10)
            ax.set_xlabel("direction 1")
            ax.set_ylabel("direction 2")
            ax.set_title(label, fontsize="medium")
            ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png", dpi=100)


def read_metrics(run: str | Path) -> list[dict]:
    """The epochs of a training run: ``RUN/metrics.jsonl`` (or that file given directly)."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{str(path)!r} does not exist; give a run folder written by expandctl train")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number} is not valid JSON ({e.msg}); is the file truncated?") from None
        if not isinstance(row, dict) or "epoch" not in row:
            raise UsageError(f"{path}:{number} is not a metrics row (no 'epoch')")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path} holds no epochs yet")
    return rows


def _series(history: Sequence[Mapping], key: str, scale: float = 1.0) -> tuple[list, list]:
    pts = [(row["epoch"], scale * row[key]) for row in history if isinstance(row.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: Sequence[tuple[str, Sequence[Mapping]]], path: str | Path, title: str | None = None) -> None:
    """Runs overlaid, one colour each: loss and error (%) per epoch, training solid and validation
    (test) dashed, plus the minimum gradient confusion when a run recorded it (``train
    --grad-confusion``): the curves of the paper's figures, compact vs expanded, product vs normal L2."""
    from matplotlib.ticker import MaxNLocator  # lazy: as _figure

    confusion = any("grad_confusion_min" in row for _, h in runs for row in h)
    fig = _figure((15 if confusion else 10, 4))
    axes = list(fig.subplots(1, 3 if confusion else 2))
    for k, (label, history) in enumerate(runs):
        color = f"C{k % 10}"
        for split, style in (("train", "-"), ("val", "--")):
            axes[0].plot(*_series(history, f"{split}_loss"), style, color=color, label=f"{label} {split}")
            x, acc = _series(history, f"{split}_acc")
            axes[1].plot(x, [100 - 100 * a for a in acc], style, color=color, label=f"{label} {split}")
        x, conf = _series(history, "grad_confusion_min")
        if confusion and conf:
            axes[2].plot(x, conf, "-", marker=".", color=color, label=label)
    labels = ["loss", "error (%)", "min gradient cosine similarity"]
    for ax, label in zip(axes, labels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png", dpi=100)

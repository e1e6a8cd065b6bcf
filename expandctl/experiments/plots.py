"""The figures of an ``expandctl compare`` report: validation curves with seed bands, and the gain
of each strategy beside its cost. matplotlib is imported only here, when a report is drawn."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..checkpoint import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9})
    return plt


def _colors(names) -> dict[str, str]:
    """compact in dark gray, the strategies in the tab10 colours, in table order."""
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    others = [n for n in names if n != "compact"]
    return {"compact": "#444444", **{n: palette[i % len(palette)] for i, n in enumerate(others)}}


def _save(fig, path: Path) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _plt().close(fig)


def plot_curves(path: Path, runs: dict[str, list[dict]], title: str) -> None:
    """Validation error after each epoch (log scale: late differences of a point or less stay
    visible), mean over seeds, band from the lowest to the highest seed."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    plt = _plt()
    colors = _colors(list(runs))
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for name, rs in runs.items():
        n = min(len(r["history"]) for r in rs)
        ys = [[100 * (1 - r["history"][e]["val_acc"]) for e in range(n)] for r in rs]
        epochs = list(range(1, n + 1))
        cols = list(zip(*ys))
        ax.plot(epochs, [statistics.fmean(c) for c in cols], color=colors[name], lw=1.6,
                label=f"{name} (n={len(rs)})")  # fmt: skip
        ax.fill_between(epochs, [min(c) for c in cols], [max(c) for c in cols], color=colors[name], alpha=0.18)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation error (%), log scale",
           title=f"{title}: validation error per epoch\nmean over seeds, band = min..max over seeds")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def plot_gain(path: Path, summary: dict, title: str) -> None:
    """Left: accuracy difference to compact (points), +- its standard error, seeds as dots. Right:
    seconds per epoch and peak memory as multiples of compact's."""
    plt = _plt()
    rows = [r for r in summary["strategies"] if r["status"] == "ok" and r["vs_compact"]]
    base = next(r for r in summary["strategies"] if r["strategy"] == "compact" and r["status"] == "ok")
    colors = _colors([r["strategy"] for r in summary["strategies"]])
    names = [r["strategy"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1, 1]})
    for i, r in enumerate(rows):
        v = r["vs_compact"]
        adjusted = v.get("p_adjusted")  # reports written before the paired test have none
        label = f"{r['strategy']}: {v['difference']:+.2f} points"
        if adjusted is not None or v["p"] is not None:
            label += f", Holm p={adjusted:.2g}" if adjusted is not None else f", Welch p={v['p']:.2g}"
        ax.bar(i, v["difference"], yerr=v["std_error"] or 0, color=colors[r["strategy"]], alpha=0.8, capsize=5,
               label=label)  # fmt: skip
        dots = [a - base["accuracy"]["mean"] for a in r["accuracy"]["values"]]
        ax.scatter([i] * len(dots), dots, color="black", s=12, zorder=3)
    ax.axhline(0, color="black", lw=1)
    ax.set_xticks(range(len(names)), names)
    ax.set(xlabel="strategy", ylabel="accuracy - compact's mean (points)",
           title="gain over compact (bar: mean \u00b1 standard error;\ndots: seeds)")  # fmt: skip
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best")

    width = 0.38
    xs = range(len(names))
    sec = [r["seconds_ratio"] or 0 for r in rows]
    mem = [r["memory_ratio"] or 0 for r in rows]
    bx.bar([x - width / 2 for x in xs], sec, width, color="#555555", label="seconds per epoch")
    bx.bar([x + width / 2 for x in xs], mem, width, color="#bbbbbb", label="peak memory")
    for x, a, b in zip(xs, sec, mem):
        bx.text(x - width / 2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=8)
        bx.text(x + width / 2, b, f"{b:.2f}", ha="center", va="bottom", fontsize=8)
    bx.axhline(1, color="black", lw=1, ls="--", label="compact = 1")
    bx.set_xticks(list(xs), names)
    memory = "GPU memory" if base["memory_kind"] == "cuda" else "process RSS"
    bx.set(xlabel="strategy", ylabel="multiple of compact's (x)",
           title=f"training cost relative to compact\n(compact: {base['seconds_per_epoch']:.2f} s/epoch, "
                 f"{base['peak_memory_mib']:.0f} MiB {memory})")  # fmt: skip
    bx.set_ylim(0, max([*sec, *mem, 1.0]) * 1.45)  # room for the legend above the bars
    bx.grid(alpha=0.3, axis="y")
    bx.legend(loc="upper left", ncol=3, fontsize=8)
    fig.suptitle(f"{title}: does expansion help? ({summary['runs']['finished']} runs)", fontsize=12)
    fig.tight_layout()
    _save(fig, path)

"""The figures of an ``expandctl compare`` report: validation curves with seed bands, and the gain
of each strategy beside its cost. matplotlib is imported only here, when a report is drawn."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..checkpoint import atomic_write


def _plt():
    import matplotlib  # lazy: only when a report is drawn; the backend is chosen before pyplot loads

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
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # lazy: as _plt

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
    seconds per epoch and peak memory as multiples of compact's, with their spread over the runs."""
    _save(gain_figure(summary, title), path)


def gain_figure(summary: dict, title: str):
    """The figure of :func:`plot_gain`; each legend sits below its panel, clear of bars and dots."""
    plt = _plt()
    rows = [r for r in summary["strategies"] if r["status"] == "ok" and r["vs_compact"]]
    base = next(r for r in summary["strategies"] if r["strategy"] == "compact" and r["status"] == "ok")
    colors = _colors([r["strategy"] for r in summary["strategies"]])
    names = [r["strategy"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 5.2), gridspec_kw={"width_ratios": [1, 1]})
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
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)

    width = 0.38
    xs = range(len(names))
    sec = [r["seconds_ratio"] or 0 for r in rows]
    mem = [r["memory_ratio"] or 0 for r in rows]
    sec_range = [r.get("seconds_ratio_range") or [s, s] for r, s in zip(rows, sec)]
    mem_range = [r.get("memory_ratio_range") or [m, m] for r, m in zip(rows, mem)]

    def whiskers(values, ranges):  # min..max over the runs, around the mean
        return [[max(0.0, v - lo) for v, (lo, _) in zip(values, ranges)], [max(0.0, hi - v) for v, (_, hi) in
                                                                           zip(values, ranges)]]  # fmt: skip

    bx.bar([x - width / 2 for x in xs], sec, width, color="#555555", label="seconds per epoch (mean; min..max)",
           yerr=whiskers(sec, sec_range), capsize=3, ecolor="#d62728")  # fmt: skip
    bx.bar([x + width / 2 for x in xs], mem, width, color="#bbbbbb", label="peak memory (mean; min..max)",
           yerr=whiskers(mem, mem_range), capsize=3, ecolor="#d62728")  # fmt: skip
    for x, a, b, (alo, ahi), (blo, bhi) in zip(xs, sec, mem, sec_range, mem_range):
        spread_a = f"\n{alo:.2f}-{ahi:.2f}" if ahi - alo > 0.005 else ""
        spread_b = f"\n{blo:.2f}-{bhi:.2f}" if bhi - blo > 0.005 else ""
        bx.text(x - width / 2, max(a, ahi), f"{a:.2f}{spread_a}", ha="center", va="bottom", fontsize=7)
        bx.text(x + width / 2, max(b, bhi), f"{b:.2f}{spread_b}", ha="center", va="bottom", fontsize=7)
    bx.axhline(1, color="black", lw=1, ls="--", label="compact = 1")
    bx.set_xticks(list(xs), names)
    memory = "GPU memory" if base["memory_kind"] == "cuda" else "process RSS"
    lo, hi = base.get("seconds_ratio_range") or (1.0, 1.0)
    own = f" ({lo:.2f}-{hi:.2f}x over its runs)" if hi - lo > 0.005 else ""  # compact's own spread
    bx.set(xlabel="strategy", ylabel="multiple of compact's (x)",
           title=f"training cost relative to compact\n(compact: {base['seconds_per_epoch']:.2f} s/epoch{own},\n"
                 f"{base['peak_memory_mib']:.0f} MiB {memory})")  # fmt: skip
    top = max([*sec, *mem, *(hi for _, hi in sec_range), *(hi for _, hi in mem_range), 1.0])
    bx.set_ylim(0, top * 1.25)  # room for the value labels above the bars
    bx.grid(alpha=0.3, axis="y")
    bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{title}: does expansion help? ({summary['runs']['finished']} runs)", fontsize=12)
    fig.tight_layout()
    return fig

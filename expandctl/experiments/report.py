"""The report of a compare study (``expandctl compare``), from its run files only: the statistics per
strategy (:func:`summarize`), the verdict sentence, the Markdown table and the figures (:func:`write_report`).
Any process, on any machine sharing the study folder, can write it. Never prints."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import atomic_write
from .compare import ALPHA, COMPACT, POWER, Study, fmt_strategy_rate, run_name, run_path, strategy_rate
from .plots import plot_curves, plot_gain
from .runs import read_run
from .stats import (
    detectable_difference,
    holm,
    mean_std,
    paired_p,
    paired_t,
    seeds_to_detect,
    std_error_of_difference,
    welch_p,
    welch_t,
)

__all__ = ["summarize", "write_report", "render_markdown", "table_row", "TABLE_HEADER", "WIDE_COST_SPREAD"]


def _seconds_per_epoch(run: dict) -> float:
    return sum(h["seconds"] for h in run["history"]) / len(run["history"])


def _ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else x / base


#: A cost ratio whose runs spread wider than this (max - min, in multiples of compact) gets a note.
WIDE_COST_SPREAD = 0.2


def _spread(values: Sequence[float], base: float | None) -> list[float] | None:
    """``[min, max]`` of each run's cost as a multiple of compact's mean: how far one number can be trusted."""
    return [min(values) / base, max(values) / base] if values and base else None


def _cost_notes(rows: list[dict]) -> list[str]:
    """A sentence for each cost ratio whose runs disagree widely: the machine's load changed between runs."""
    notes = []
    for r in rows:
        for key, what in (("seconds_ratio_range", "seconds per epoch"), ("memory_ratio_range", "peak memory")):
            spread = r.get(key)
            if r["status"] == "ok" and spread and spread[1] - spread[0] > WIDE_COST_SPREAD:
                notes.append(
                    f"{r['strategy']}: {what} ranges {spread[0]:.2f}-{spread[1]:.2f}x compact's mean over its "
                    f"{r['n']} runs; the machine's load likely changed between runs, so this ratio is uncertain "
                    "(measure cost on an otherwise idle machine)"
                )
    return notes


def summarize(
    out: Path,
    strategies: Sequence[str],
    seeds: Sequence[int],
    skipped: dict[str, str] | None = None,
    alpha: float = ALPHA,
) -> dict:
    """The study's numbers, from the run files of ``strategies`` x ``seeds`` present in ``out``."""
    out = Path(out)
    skipped = skipped or {}
    study = Study.load(out) if (out / "study.json").is_file() else None
    runs = {s: [read_run(run_path(out, s, seed)) for seed in seeds if run_path(out, s, seed).is_file()]
            for s in strategies if s not in skipped}  # fmt: skip
    planned = [run_name(s, seed) for s in runs for seed in seeds]
    missing = [n for n in planned if not (out / "runs" / f"{n}.json").is_file()]
    base = runs.get(COMPACT, [])
    base_acc = [100 * r["final_acc"] for r in base]
    base_sec = mean_std([_seconds_per_epoch(r) for r in base])[0] if base else None
    base_mem = mean_std([r["peak_memory_mib"] for r in base])[0] if base else None
    rows = []
    for s in strategies:
        if s in skipped:
            rows.append({"strategy": s, "status": "skipped", "reason": skipped[s], "n": 0})
            continue
        rs = runs[s]
        if not rs:
            rows.append({"strategy": s, "status": "missing", "reason": "no finished run yet", "n": 0})
            continue
        acc = [100 * r["final_acc"] for r in rs]
        m, sd = mean_std(acc)
        sec = mean_std([_seconds_per_epoch(r) for r in rs])[0]
        mem = mean_std([r["peak_memory_mib"] for r in rs])[0]
        row = {
            "strategy": s, "status": "ok", "reason": None, "n": len(rs), "seeds": [r["seed"] for r in rs],
            "accuracy": {"mean": m, "std": sd, "values": acc},
            "vs_compact": None,
            "seconds_per_epoch": sec, "seconds_ratio": _ratio(sec, base_sec),
            "peak_memory_mib": mem, "memory_ratio": _ratio(mem, base_mem), "memory_kind": rs[0]["memory_kind"],
            "seconds_ratio_range": _spread([_seconds_per_epoch(r) for r in rs], base_sec),
            "memory_ratio_range": _spread([r["peak_memory_mib"] for r in rs], base_mem),
            "params_trained": rs[0]["params_trained"], "params_compact": rs[0]["params_compact"],
            "rate": strategy_rate(s, study.rate if study else None),
            "expanded_layers": rs[0]["expanded_layers"],
            "contraction_max_rel_float64": max((r["contraction_max_rel_float64"] or 0.0) for r in rs) if s != COMPACT
            else None,
        }  # fmt: skip
        if s != COMPACT and base_acc:
            row["vs_compact"] = _versus(rs, base, alpha)
        rows.append(row)
    tested = [r for r in rows if r.get("vs_compact")]
    for r, p in zip(tested, holm([r["vs_compact"]["p_paired"] for r in tested])):
        r["vs_compact"]["p_adjusted"] = p
    better, worse, verdict = _verdict(rows, alpha, len(planned) - len(missing), len(planned))
    cost_notes = _cost_notes(rows)
    return {
        "study": study.to_dict() if study else None,
        "strategies": rows,
        "seeds": list(seeds),
        "alpha": alpha,
        "better": better,
        "worse": worse,
        "verdict": verdict,
        "cost_notes": cost_notes,
        "runs": {"planned": len(planned), "finished": len(planned) - len(missing), "missing": missing},
    }


def _versus(runs: list[dict], base: list[dict], alpha: float) -> dict:
    """A strategy's runs against compact's: the difference of the means, Welch's p, the paired test
    over the seeds both have (every run of a seed shares the unexpanded layers' initialisation and
    the data order), and the smallest difference this many seeds could detect (two-sided, ``alpha``,
    power :data:`POWER`), from the paired differences' spread (Welch's where fewer than two seeds pair)."""
    acc = [100 * r["final_acc"] for r in runs]
    base_acc = [100 * r["final_acc"] for r in base]
    by_seed = {r["seed"]: 100 * r["final_acc"] for r in base}
    pairs = [(100 * r["final_acc"], by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    mine, theirs = [a for a, _ in pairs], [b for _, b in pairs]
    paired, welch = paired_t(mine, theirs) if pairs else None, welch_t(acc, base_acc)
    if paired is not None:
        detectable = detectable_difference(paired[2], paired[1], alpha, POWER)
    elif welch is not None:
        detectable = detectable_difference(std_error_of_difference(acc, base_acc), welch[1], alpha, POWER)
    else:
        detectable = 0.0 if (len(pairs) >= 2 or (len(acc) >= 2 and len(base_acc) >= 2)) else None
    return {
        "difference": statistics.fmean(acc) - statistics.fmean(base_acc),
        "std_error": std_error_of_difference(acc, base_acc),
        "p": welch_p(acc, base_acc),
        "paired_seeds": len(pairs),
        "p_paired": paired_p(mine, theirs) if pairs else None,
        "p_adjusted": None,  # Holm over the strategies (summarize)
        "detectable": detectable,
        "paired_std": statistics.stdev([a - b for a, b in pairs]) if len(pairs) >= 2 else None,
    }


def _fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"


def _verdict(rows: list[dict], alpha: float, finished: int, planned: int) -> tuple[list[str], list[str], str]:
    """Which strategies beat (or lose to) compact at a Holm-adjusted paired ``p < alpha``, as a
    sentence that names the correction, what the seeds could detect and how many would resolve the
    largest difference seen."""
    ok = {r["strategy"]: r for r in rows if r["status"] == "ok"}
    prefix = "" if finished == planned else f"Partial ({finished} of {planned} runs finished): "
    if COMPACT not in ok:
        return [], [], prefix + "no compact run has finished, so there is nothing to compare against yet."
    compared = [r for r in ok.values() if r["vs_compact"]]
    tested = [r for r in compared if r["vs_compact"]["p_adjusted"] is not None]
    test = (f"p < {alpha:g}, paired t-test over seeds, Holm-Bonferroni adjusted over {len(tested)} "
            f"strateg{'y' if len(tested) == 1 else 'ies'}")  # fmt: skip

    def says(r):
        v = r["vs_compact"]
        return f"{r['strategy']} ({v['difference']:+.2f} points, adjusted p={_fmt_p(v['p_adjusted'])})"

    def significant(r):
        return r["vs_compact"]["p_adjusted"] < alpha

    better = [r for r in tested if r["vs_compact"]["difference"] > 0 and significant(r)]
    worse = [r for r in tested if r["vs_compact"]["difference"] < 0 and significant(r)]
    if not tested and min(r["n"] for r in ok.values()) < 2:
        text = "too few seeds for a test (it needs 2 seeds of compact and a strategy); rerun with --seeds 3 or more."
    elif not tested:
        text = ("the paired test is undefined: every strategy differs from compact by the same amount on every seed "
                "(or fewer than 2 seeds pair); try more data, epochs or seeds.")  # fmt: skip
    elif better:
        text = f"{', '.join(says(r) for r in better)} beat{'s' if len(better) == 1 else ''} compact at {test}."
    else:
        n = sorted({r["vs_compact"]["paired_seeds"] for r in tested})
        seeds = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
        top = max(tested, key=lambda r: r["vs_compact"]["difference"])
        text = f"no strategy beat compact at {test}, with {seeds} seeds (largest difference: {says(top)})."
    if worse:
        text += f" Worse than compact at {test}: {', '.join(says(r) for r in worse)}."
    if tested:
        text += _resolution(tested, alpha)
    text = prefix + text
    return [r["strategy"] for r in better], [r["strategy"] for r in worse], text[0].upper() + text[1:]


def _resolution(tested: list[dict], alpha: float) -> str:
    """What the seeds could detect, and how many seeds the largest unresolved difference needs."""
    v_top = max(tested, key=lambda r: abs(r["vs_compact"]["difference"]))
    v = v_top["vs_compact"]
    detectable = [r["vs_compact"]["detectable"] for r in tested if r["vs_compact"]["detectable"] is not None]
    text = ""
    if detectable:
        low, high = min(detectable), max(detectable)
        span = f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}"
        text += (f" These seeds detect a difference of {span} points (alpha {alpha:g} two-sided, power {POWER:g}, "
                 "before the correction).")  # fmt: skip
    if v["p_adjusted"] >= alpha and v["paired_std"] is not None and v["difference"] != 0:
        n = seeds_to_detect(v["paired_std"], v["difference"], alpha, POWER)
        if n is not None:
            text += (f" About {n} seeds would resolve {v_top['strategy']}'s {v['difference']:+.2f} points at this "
                     "spread.")  # fmt: skip
    return text


def table_row(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [r["strategy"], "0", f"{r['status']} (below)", *[""] * (len(TABLE_HEADER) - 3)]
    a, v = r["accuracy"], r["vs_compact"]

    def ratio(x):
        return "-" if x is None else f"{x:.2f}"

    return [
        r["strategy"], str(r["n"]), f"{a['mean']:.2f} +- {a['std']:.2f}",
        "-" if v is None else f"{v['difference']:+.2f}", "-" if v is None else _fmt_p(v["p"]),
        "-" if v is None else _fmt_p(v["p_paired"]), "-" if v is None else _fmt_p(v["p_adjusted"]),
        "-" if v is None or v["detectable"] is None else f"{v['detectable']:.2f}",
        ratio(r["seconds_ratio"]), ratio(r["memory_ratio"]), f"{r['params_trained']:,}",
    ]  # fmt: skip


TABLE_HEADER = ("strategy", "runs", "accuracy (%)", "vs compact (points)", "Welch p", "paired p", "Holm p",
                "detectable (points)", "s/epoch (x compact)", "peak memory (x compact)", "params trained")  # fmt: skip


def render_markdown(summary: dict) -> str:
    study = summary["study"] or {}
    rows = summary["strategies"]
    base = next((r for r in rows if r["strategy"] == COMPACT and r["status"] == "ok"), None)
    lines = [
        f"# expandctl compare: {study.get('arch', '?')} on {study.get('data', '?')}",
        "",
        "Generated by `expandctl compare` from the run files in `runs/`; do not edit by hand.",
        "Accuracy: top-1 of the *contracted* model on the validation split, mean +- std over seeds; "
        "differences to compact in points, with Welch's t-test p, the paired t-test's p over seeds, "
        f"that p Holm-Bonferroni adjusted over the strategies (the verdict's), and the smallest difference "
        f"the seeds could detect (alpha {summary['alpha']:g} two-sided, power {POWER:g}).",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|---|" + "---:|" * (len(TABLE_HEADER) - 1),
        *("| " + " | ".join(table_row(r)) + " |" for r in rows),
        "",
        *[
            line
            for r in rows
            if r["status"] != "ok"
            for line in (f"{r['strategy']}: {r['status']}, {r['reason']}.", "")
        ],
        f"**Verdict:** {summary['verdict']}",
        "",
        *[line for note in summary.get("cost_notes") or () for line in (f"Cost: {note}.", "")],
    ]
    if base:
        kind = "peak GPU memory allocated" if base["memory_kind"] == "cuda" else "peak resident memory of the process"
        lines += [f"Compact: {base['seconds_per_epoch']:.2f} s per epoch, {base['peak_memory_mib']:.0f} MiB "
                  f"({kind}), {base['params_trained']:,} parameters.", ""]  # fmt: skip
    if study:
        recipe = {k: v for k, v in study["train"].items() if v not in (None, False)}
        rates = "; ".join(f"{r['strategy']} {fmt_strategy_rate(r.get('rate'))}" for r in rows if r["status"] == "ok"
                          and r["strategy"] != COMPACT)  # fmt: skip
        lines += [f"Recipe: `{json.dumps(recipe)}`; rates: {rates or '-'}; seeds {summary['seeds']}.", ""]
    return "\n".join(lines)


def write_report(out: Path, summary: dict) -> dict[str, str]:
    """``report.md``, ``report.json`` and the figures (when a run has finished), atomically."""
    out = Path(out)
    files = {"markdown": out / "report.md", "json": out / "report.json"}
    with atomic_write(files["markdown"]) as tmp:
        tmp.write_text(render_markdown(summary))
    with atomic_write(files["json"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    runs = {r["strategy"]: [read_run(run_path(out, r["strategy"], s)) for s in r["seeds"]]
            for r in summary["strategies"] if r["status"] == "ok"}  # fmt: skip
    if runs:
        title = f"{(summary['study'] or {}).get('arch', '')} on {(summary['study'] or {}).get('data', '')}"
        files["curves"] = out / "curves.png"
        plot_curves(files["curves"], runs, title)
        if any(r["vs_compact"] for r in summary["strategies"] if r["status"] == "ok"):
            files["gain"] = out / "gain.png"
            plot_gain(files["gain"], summary, title)
    return {k: str(v) for k, v in files.items()}

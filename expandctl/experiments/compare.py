"""Does expansion help *this* model on *this* data? Compact vs expansion strategies, several seeds.

A study folder ``OUT`` holds one recipe (``settings.json``: the architecture, data, expansion and
training options) and one run per strategy and seed:

* ``OUT/runs/<strategy>-s<seed>.json``: a finished run (the contracted model's accuracy on the
  validation split, per-epoch curves, seconds per epoch, peak memory, parameter counts);
* ``OUT/work/<strategy>-s<seed>/``: the run while it trains (``last.pt`` to resume, ``log.txt``) and
  its contracted model afterwards (``contracted.pt``); ``OUT/work/locks/``: one lock per run.

Every run of a seed starts from the same initialisation of the layers it does not expand (the
architecture rebuilt with ``torch.manual_seed(seed)``; the factors drawn from the same seed) and
sees the same data order (the loader's generator is seeded with the seed), so strategies differ
only by their expansion. Each run trains in a child process of its own (:mod:`.worker`): its
peak memory is its own, and ``--jobs`` runs several at once. The bookkeeping is :mod:`.runs`, the
statistics :mod:`.stats`; the report (:func:`summarize`, :func:`write_report`) reads only the run
files, so any process, on any machine sharing ``OUT``, can write it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import atomic_write
from ..errors import ExpandctlError, NothingToExpandError, UsageError
from .runs import check_settings, claim, read_run
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

__all__ = [
    "COMPACT",
    "ALPHA",
    "Study",
    "RunFailed",
    "parse_strategies",
    "parse_shard",
    "run_name",
    "run_path",
    "work_dir",
    "set_aside_damaged",
    "plan_strategies",
    "strategy_rate",
    "schedule",
    "execute",
    "summarize",
    "write_report",
    "render_markdown",
]

#: The baseline: the model as it is, trained with the same recipe.
COMPACT = "compact"
#: Significance level of the verdict.
ALPHA = 0.05
#: Power of the smallest detectable difference (``vs_compact.detectable``).
POWER = 0.8
#: The TrainConfig fields that make the recipe (every run of a study shares them).
RECIPE_FIELDS = (
    "epochs", "batch_size", "accumulate", "lr", "optimizer", "momentum", "nesterov", "schedule", "weight_decay",
    "decay_on", "teacher", "kd_alpha", "kd_temperature", "nonlinear_warmup", "forward", "device", "workers",
    "channels", "image_size", "augment", "train_subset", "download", "trust_pickle", "val_fraction", "precise_bn",
)  # fmt: skip
#: Fields that change the timing but not the result: a later invocation may change them.
NOT_COMPARED = ("workers", "download", "trust_pickle")


class RunFailed(ExpandctlError):
    """A run's process failed; ``exit_code`` is its own (1 diverged or check failed, 2 bad input, ...)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Study:
    """The recipe of a study folder: what is built, expanded, trained and scored."""

    arch: str
    arch_kwargs: dict
    input_shape: list[int]
    data: str
    train: dict  # RECIPE_FIELDS of expandctl.train.TrainConfig
    rate: float | None = None  # None: each kind's default rate, as expand gives it
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    pointwise: bool = False
    model: str | None = None  # the MODEL file the architecture was read from (for the record)

    def settings(self) -> dict:
        """What must be equal for two invocations to share a folder."""
        d = dataclasses.asdict(self)
        d.pop("model")
        d["train"] = {k: v for k, v in self.train.items() if k not in NOT_COMPARED}
        return d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, out: Path) -> Study:
        path = Path(out) / "study.json"
        if not path.is_file():
            raise UsageError(f"{out} holds no study ({path.name} is missing); run expandctl compare with --out {out}")
        return cls(**json.loads(path.read_text()))

    def save(self, out: Path) -> None:
        """Check the folder's settings (first invocation: record them), then write the full recipe."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out / "settings.json", self.settings())
        with atomic_write(out / "study.json") as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# Names and plans
# --------------------------------------------------------------------------------------------------
def parse_strategies(text: str) -> list[str]:
    """``"compact,ck,cl+fc"`` -> ``["compact", "ck", "cl+fc"]``: each expansion checked against the
    registry (:func:`expandctl.rewrite.parse_strategy`); ``compact`` first, added if missing."""
    from ..rewrite import parse_strategy

    names: list[str] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        name = COMPACT if part == COMPACT else "+".join(parse_strategy(part))
        if name not in names:
            names.append(name)
    if not names or names == [COMPACT]:
        raise UsageError(f"--strategies {text!r} names no expansion to compare with compact (e.g. compact,ck,cl)")
    if COMPACT in names:
        names.remove(COMPACT)
    return [COMPACT, *names]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``: the second of four slices (1-based)."""
    if text is None:
        return 1, 1
    i, _, n = text.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i = n = 0
    if not (n >= 1 and 1 <= i <= n):
        raise UsageError(f"--shard {text!r} must be I/N with 1 <= I <= N (e.g. 1/4 for the first of four machines)")
    return i, n


def run_name(strategy: str, seed: int) -> str:
    return f"{strategy}-s{seed}"


def run_path(out: Path, strategy: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{run_name(strategy, seed)}.json"


def work_dir(out: Path, strategy: str, seed: int) -> Path:
    return Path(out) / "work" / run_name(strategy, seed)


def set_aside_damaged(out: Path, strategies: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, str]]:
    """Run files of ``strategies`` x ``seeds`` that do not read as a finished run (truncated or corrupt
    JSON, a record without its fields: a copy cut short, a disk that filled) are renamed to
    ``<name>.json.damaged``, so that the run is trained again; nothing else in ``out`` is touched.
    Returns ``(run name, why)`` for each. (Run files are written atomically, so expandctl itself
    never leaves one half-written.)"""
    damaged = []
    for strategy in strategies:
        for seed in seeds:
            path = run_path(out, strategy, seed)
            if not path.is_file():
                continue
            try:
                record = read_run(path)
                missing = [k for k in ("final_acc", "seed", "history") if k not in record]
                why = f"its record lacks {', '.join(missing)}" if missing else None
            except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
                why = f"it is not valid JSON ({e})"
            if why is not None:
                os.replace(path, path.with_name(path.name + ".damaged"))
                damaged.append((run_name(strategy, seed), why))
    return damaged


def lock_path(out: Path, strategy: str, seed: int) -> Path:
    return Path(out) / "work" / "locks" / f"{run_name(strategy, seed)}.lock"


def plan_strategies(
    study: Study, strategies: Sequence[str], refuse: bool = True
) -> tuple[list[str], dict[str, str], dict[str, dict]]:
    """``(runnable, skipped, details)``: the strategies that select at least one layer of the model
    (compact always), the reason for each that selects none, and for each runnable one its rate, the
    layers it expands, its parameter count and the size warnings of its plan. A strategy whose
    expanded model cannot fit in this machine's memory raises :class:`UsageError` (``refuse=False``,
    a dry run: a warning instead), before any run starts."""
    from ..models import build_arch
    from ..rewrite import plan
    from ..sizes import check_expanded_size, count_params

    model = build_arch(study.arch, study.arch_kwargs)
    compact = count_params(model)
    runnable, skipped = [COMPACT], {}
    details = {COMPACT: {"rate": None, "layers": [], "params": compact, "warnings": []}}
    for s in strategies:
        if s == COMPACT:
            continue
        p = plan(model, s, study.rate, study.include, study.exclude, study.pointwise)
        if p.expanded:
            runnable.append(s)
            details[s] = {
                "rate": strategy_rate(s, study.rate),
                "layers": [e.path for e in p.expanded],
                "params": compact - p.params_before + p.params_after,
                "warnings": check_expanded_size(model, p, f"the {s} model", refuse=refuse),
            }
        else:
            skipped[s] = p.why_nothing()
    if len(runnable) == 1:
        raise NothingToExpandError(
            "no strategy selects a layer of this model: "
            + "; ".join(f"{s}: {why}" for s, why in skipped.items())
            + ". Try other --strategies, --pointwise or --include"
        )
    return runnable, skipped, details


def strategy_rate(strategy: str, rate: float | None) -> float | dict | None:
    """The rate ``strategy`` expands with: ``rate``, else its kind's default (``expand``'s too): one
    number, ``{kind: rate}`` for kinds with different defaults, ``None`` for kinds that take none."""
    from ..layers import EXPANSIONS
    from ..rewrite import parse_strategy

    if strategy == COMPACT:
        return None
    if rate is not None:
        return rate
    rates = {k: EXPANSIONS[k][0].default_rate for k in parse_strategy(strategy)}
    given = {k: r for k, r in rates.items() if r is not None}
    values = set(given.values())
    return None if not values else values.pop() if len(values) == 1 else given


def fmt_strategy_rate(rate: float | dict | None) -> str:
    if rate is None:
        return "-"
    if isinstance(rate, dict):
        return ", ".join(f"{k} {r:g}" for k, r in rate.items())
    return f"{rate:g}"


def schedule(strategies: Sequence[str], seeds: Sequence[int], shard: tuple[int, int] = (1, 1)) -> list[tuple[str, int]]:
    """Every ``(strategy, seed)``, seeds outermost (a partial study covers every strategy), then the
    shard's slice: every N-th run from the I-th on, so that slices take about equal time."""
    runs = [(s, seed) for seed in seeds for s in strategies]
    i, n = shard
    return runs[i - 1 :: n]


# --------------------------------------------------------------------------------------------------
# Running: one child process per run, at most ``jobs`` at once
# --------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when the compare process dies, and its run resumes next time
    (elsewhere an orphan keeps its lock until it finishes, which is just as safe)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("error: ")]
    return (errors[-1][len("error: ") :] if errors else lines[-1] if lines else "no output").strip()


def execute(
    out: Path,
    todo: Sequence[tuple[str, int]],
    jobs: int = 1,
    threads: int = 1,
    on_event: Callable[[str, str, int, dict | None], None] | None = None,
    poll: float = 0.2,
    nproc_per_run: int = 1,
) -> dict:
    """Run every ``(strategy, seed)`` of ``todo`` that has no run file yet, ``jobs`` child processes
    at a time, each claiming its run's lock first. A run locked by another process (another
    ``--jobs`` worker, a shard on another machine) is waited for; if its holder dies, it is run here.

    ``on_event(kind, strategy, seed, result)`` reports ``"start"``, ``"done"`` (with the run's
    record) and ``"reused"``. Returns ``{"ran": [...], "reused": [...], "waited": [...]}``.
    Raises :class:`RunFailed` when a run fails (the others are stopped; they resume next time).
    """
    out = Path(out)
    emit = on_event or (lambda *a: None)
    pending, deferred, ever_deferred = list(todo), [], set()
    running: dict[subprocess.Popen, tuple[str, int]] = {}
    done: dict[str, list[str]] = {"ran": [], "reused": [], "waited": []}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        while pending or deferred or running:
            while pending and len(running) < jobs:
                strategy, seed = run = pending.pop(0)
                name = run_name(strategy, seed)
                if run_path(out, strategy, seed).is_file():
                    done["waited" if run in ever_deferred else "reused"].append(name)
                    emit("reused", strategy, seed, None)
                    continue
                lock = claim(lock_path(out, strategy, seed))
                if lock is None:
                    deferred.append(run)
                    ever_deferred.add(run)
                    continue
                try:
                    if run_path(out, strategy, seed).is_file():  # finished between the check and the claim
                        done["reused"].append(name)
                        continue
                    work = work_dir(out, strategy, seed)
                    work.mkdir(parents=True, exist_ok=True)
                    with open(work / "log.txt", "ab") as log:
                        cmd = [sys.executable, "-m", "expandctl.experiments.worker", str(out), strategy, str(seed),
                               "--threads", str(threads)]  # fmt: skip
                        if nproc_per_run > 1:  # the run itself data-parallel, as `torchrun ... expandctl train`
                            nproc = f"--nproc_per_node={nproc_per_run}"
                            launcher = ["-m", "torch.distributed.run", "--standalone", nproc]
                            cmd[1:3] = [*launcher, "-m", "expandctl.experiments.worker"]
                        # The child inherits the locked descriptor: the lock is its own until it exits.
                        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                pass_fds=(lock.fd,), env=env, preexec_fn=_die_with_parent)  # fmt: skip
                finally:
                    lock.release()
                running[proc] = run
                emit("start", strategy, seed, None)
            if not running:
                if deferred:  # runs other processes hold: wait, then look again
                    time.sleep(max(poll, 1.0))
                    pending, deferred = deferred, []
                continue
            time.sleep(poll)
            for proc in [p for p in running if p.poll() is not None]:
                strategy, seed = running.pop(proc)
                if proc.returncode != 0:
                    log = work_dir(out, strategy, seed) / "log.txt"
                    why = _last_error(log) if proc.returncode > 0 else f"killed by signal {-proc.returncode}"
                    raise RunFailed(
                        f"run {run_name(strategy, seed)} failed: {why} (its log: {log}); the finished runs are "
                        "kept, and rerunning the command continues",
                        proc.returncode if 0 < proc.returncode < 256 else 70,
                    )
                done["ran"].append(run_name(strategy, seed))
                emit("done", strategy, seed, read_run(run_path(out, strategy, seed)))
    finally:
        for proc in running:  # interrupted or failed: stop the others; their last.pt resumes them
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return done


# --------------------------------------------------------------------------------------------------
# The report: from the run files only
# --------------------------------------------------------------------------------------------------
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
    from .plots import plot_curves, plot_gain

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

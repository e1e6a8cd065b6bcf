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
statistics :mod:`.stats`; the report (:mod:`.report`: :func:`summarize`, :func:`write_report`) reads only the run
files, so any process, on any machine sharing ``OUT``, can write it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import atomic_write
from ..errors import ExpandctlError, NothingToExpandError, UsageError
from ..layers import EXPANSIONS
from ..models import build_arch
from ..rewrite import parse_strategy, plan
from ..sizes import check_expanded_size, count_params
from .runs import check_settings, claim, read_run

__all__ = [
    "COMPACT",
    "ALPHA",
    "Study",
    "RunFailed",
    "CompareInterrupted",
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


class CompareInterrupted(ExpandctlError):
    """Ctrl-C (exit 130): finished runs are kept, cut-off runs resume from their last.pt."""

    exit_code = 130


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
    names: list[str] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        name = COMPACT if part == COMPACT else "+".join(parse_strategy(part))
        if name not in names:
            names.append(name)
    if not names or names == [COMPACT]:
        raise UsageError(
            f"strategies {text!r} names no expansion to compare with compact (e.g. compact,ck,cl)", option="strategies"
        )
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
        raise UsageError(
            f"shard {text!r} must be I/N with 1 <= I <= N (e.g. 1/4 for the first of four machines)", option="shard"
        )
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

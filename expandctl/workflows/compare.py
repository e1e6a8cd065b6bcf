"""``expandctl compare`` as a library function: train compact and each expansion strategy with several
seeds, same recipe, in a study folder, and report what helps at what cost (:mod:`expandctl.experiments`).
Never prints: ``progress`` gets the warnings and notes, ``on_event`` each run as it starts and finishes.

>>> from expandctl.workflows.compare import CompareOptions, compare
>>> r = compare(CompareOptions(arch="smallnet", data="digits", strategies="compact,ck", train={"epochs": 5}))
>>> r.to_dict()["report"]["verdict"]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import checkpoint as ckpt_io
from ..errors import UsageError
from ..experiments import compare as study_lib
from ..experiments.report import summarize, write_report
from ..experiments.runs import check_settings
from ..models import build_arch, resolve_arch
from ..progress import Progress, Silent
from ..train import TrainConfig

__all__ = ["CompareOptions", "ComparePlan", "CompareResult", "compare"]

#: The recipe options recorded in lower case (as train reads them).
_LOWERED = ("optimizer", "schedule", "decay_on", "forward", "device", "augment")


class CompareProgress(Progress, Protocol):
    def note(self, text: str) -> None: ...


class _Silent(Silent):
    def note(self, text: str) -> None:
        pass


@dataclass(frozen=True)
class CompareOptions:
    """The options of ``expandctl compare`` (fields named like its flags). ``model`` (a checkpoint) or
    ``arch`` gives the compact model; ``data`` and ``train`` (the recipe) are
    :class:`expandctl.train.TrainConfig`'s; with ``report_only`` and none of them, the folder's own recipe.
    Checked when made."""

    model: str | None = None
    data: str | None = None
    strategies: str = "compact,ck,cl"
    seeds: int = 3
    out: Path = Path("compare")
    jobs: int = 1
    shard: str | None = None
    report_only: bool = False
    dry_run: bool = False
    threads: int = 1
    nproc_per_run: int = 1
    rate: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    pointwise: bool = False
    arch: str | None = None
    arch_kwargs: dict | None = None
    input_shape: tuple[int, ...] | None = None
    #: The training options every run shares (:data:`expandctl.experiments.compare.RECIPE_FIELDS` of
    #: :class:`expandctl.train.TrainConfig`: epochs, lr, ..., channels, trust_pickle); those left out take
    #: TrainConfig's defaults.
    train: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, least in (("seeds", 1), ("jobs", 1), ("nproc_per_run", 1), ("threads", 1)):
            if getattr(self, name) < least:
                raise UsageError(f"{name} must be at least 1", option=name)
        if self.train.get("precise_bn", 0) < 0:
            raise UsageError("precise_bn must be >= 0 (0: off)", option="precise_bn")

    def recipe(self) -> dict[str, Any]:
        """The training recipe every run shares (the options of a folder made before ``val_fraction`` or
        ``precise_bn`` existed are left out when not given, so that such a folder keeps its settings)."""
        unknown = sorted(set(self.train) - set(study_lib.RECIPE_FIELDS))
        if unknown:
            raise UsageError(f"train takes only training options, not {', '.join(unknown)}", option="train")
        defaults = TrainConfig(src="", data=self.data or "").to_dict()
        recipe = {k: self.train[k] if k in self.train else defaults[k] for k in study_lib.RECIPE_FIELDS}
        recipe.update({k: recipe[k].lower() for k in _LOWERED if recipe[k]})
        recipe["teacher"] = str(Path(recipe["teacher"]).resolve()) if recipe["teacher"] else None
        if recipe["val_fraction"] is None:
            recipe.pop("val_fraction")
        if not recipe["precise_bn"]:
            recipe.pop("precise_bn")
        return recipe


@dataclass
class ComparePlan:
    """A dry run: the runs ``compare`` would do; ``to_dict()`` is ``compare --dry-run --json``'s object."""

    out: Path
    seeds: int
    todo: list[tuple[str, int]]
    runnable: list[str]
    skipped: dict[str, str]
    details: dict[str, dict]
    finished: list[str]

    def to_dict(self) -> dict:
        return {
            "dry_run": True, "out": str(self.out), "runs": [study_lib.run_name(s, seed) for s, seed in self.todo],
            "finished": self.finished, "skipped": self.skipped,
            "strategies": [{"strategy": s, **self.details[s]} for s in self.runnable],
        }  # fmt: skip


@dataclass
class CompareResult:
    """The runs trained, reused and waited for, the runs set aside as damaged, the report and its files."""

    out: Path
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    waited: list[str] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (run, why)
    report: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "ran": self.ran, "reused": self.reused, "waited": self.waited,
                "damaged": [n for n, _ in self.damaged], "report": self.report, "files": self.files}  # fmt: skip


OnEvent = Callable[[str, str, int, "dict | None"], None]


def compare(
    options: CompareOptions,
    *,
    load: Callable[[str], ckpt_io.Checkpoint] | None = None,
    progress: CompareProgress | None = None,
    on_event: OnEvent | None = None,
) -> CompareResult | ComparePlan:
    """Plan the study of ``options`` and, unless a dry run, train its missing runs (``options.jobs`` at once)
    and write the report. ``load`` reads ``options.model`` (default :func:`expandctl.load_checkpoint`).
    Ctrl-C raises :class:`expandctl.experiments.compare.CompareInterrupted`: finished runs are kept."""
    o, progress = options, progress or _Silent()
    names = study_lib.parse_strategies(o.strategies)
    part = study_lib.parse_shard(o.shard)
    study = _study_of(o, load)
    runnable, skipped, details = study_lib.plan_strategies(study, names, refuse=not o.dry_run)
    seeds = list(range(o.seeds))
    for s in runnable:
        for w in details[s]["warnings"]:
            progress.warn(w)
    if o.dry_run:
        todo = study_lib.schedule(runnable, seeds, part)
        finished = [n for n in (study_lib.run_name(s, seed) for s, seed in todo)
                    if (Path(o.out) / "runs" / f"{n}.json").is_file()]  # fmt: skip
        return ComparePlan(Path(o.out), o.seeds, todo, runnable, skipped, details, finished)
    result = CompareResult(Path(o.out), damaged=study_lib.set_aside_damaged(o.out, runnable, seeds))
    for name, why in result.damaged:
        progress.warn(
            f"{o.out}/runs/{name}.json is damaged ({why}): set aside as {name}.json.damaged; the run is redone"
        )
    if not o.report_only:
        study.save(o.out)  # refuses a folder whose runs used another recipe
        _train(o, study_lib.schedule(runnable, seeds, part), runnable, part, result, progress, on_event)
    result.report = summarize(o.out, names, seeds, skipped)
    result.files = write_report(o.out, result.report)
    return result


def _study_of(o: CompareOptions, load) -> study_lib.Study:
    """The study's recipe: the folder's own (``report_only`` and no model, arch or data given), else from the
    options (the training options checked before any run starts)."""
    if o.report_only and not (Path(o.out) / "study.json").is_file():
        raise UsageError(
            f"report_only: {o.out} holds no study yet; run expandctl compare without it first", option="report_only"
        )
    if o.report_only and o.model is None and o.arch is None and o.data is None:
        return study_lib.Study.load(o.out)
    if not o.data:
        raise UsageError("data is required (e.g. 'digits'): what to train and score on", option="data")
    recipe = o.recipe()
    TrainConfig.from_dict({k: v for k, v in recipe.items() if k != "precise_bn"}, src="", data=o.data).validate()
    arch, kwargs, shape = _architecture(o, load)
    study = study_lib.Study(arch=arch, arch_kwargs=kwargs, input_shape=list(shape), model=o.model, data=o.data,
                            train=recipe, rate=o.rate, include=list(o.include), exclude=list(o.exclude),
                            pointwise=o.pointwise)  # fmt: skip
    if o.report_only:  # the report must describe the runs in the folder: the same recipe
        check_settings(Path(o.out) / "settings.json", study.settings())
    return study


def _architecture(o: CompareOptions, load) -> tuple[str, dict, Sequence[int]]:
    """The compact model's architecture spec, keyword arguments and input shape: from ``o.model`` or ``o.arch``."""
    if o.model is None and o.arch is None:
        raise UsageError(
            "give the compact model (a checkpoint) to compare, or arch to build one (e.g. arch smallnet)", option="arch"
        )
    if o.model is not None:
        ckpt = (load or ckpt_io.load_checkpoint)(o.model)
        if not ckpt.arch:
            raise UsageError(
                f"cannot tell which architecture {o.model} is; pass arch so that runs can rebuild it", option="arch"
            )
        spec, kwargs, shape = ckpt.arch, dict(ckpt.arch_kwargs or {}), ckpt.input_shape
    else:
        spec, kwargs = resolve_arch(o.arch)[0], dict(o.arch_kwargs or {})
        shape = ckpt_io.infer_input_shape(spec, kwargs, build_arch(spec, kwargs))
    shape = o.input_shape or shape
    if not shape:
        raise UsageError(
            "the model's input shape is not recorded and cannot be inferred; pass input_shape C,H,W",
            option="input_shape",
        )
    return spec, kwargs, shape


def _train(o: CompareOptions, todo, runnable, part, result: CompareResult, progress, on_event) -> None:
    """Train the runs of ``todo`` that have no run file yet; record what was run, reused and waited for."""
    shard = f", shard {part[0]}/{part[1]}" if part != (1, 1) else ""
    progress.note(f"{len(todo)} runs ({len(runnable)} strategies x {o.seeds} seeds{shard}) in {o.out}, "
                  f"{o.jobs} at a time")  # fmt: skip
    try:
        done = study_lib.execute(o.out, todo, jobs=o.jobs, threads=o.threads, on_event=on_event,
                                 nproc_per_run=o.nproc_per_run)  # fmt: skip
    except KeyboardInterrupt:
        raise study_lib.CompareInterrupted(
            f"interrupted; the finished runs in {o.out} are kept: rerun the same command to continue"
        ) from None
    result.ran, result.reused, result.waited = done["ran"], done["reused"], done["waited"]
    if result.reused:
        progress.note(f"reused {len(result.reused)} finished runs")

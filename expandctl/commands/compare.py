"""``expandctl compare``: parse the options, run the study (:mod:`.compare`), print the report.

Output follows the other commands (:mod:`expandctl.console`): a line per run as it finishes and the
report's table and verdict on stdout; ``--json``: exactly one JSON object on stdout at the end
(the report, also written to ``OUT/report.json``; an error object on failure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..console import UI
from ..errors import ExpandctlError, UsageError
from ..experiments import compare as study_lib
from ..experiments.runs import check_settings
from .options import (
    ArchKwOpt,
    ArchOpt,
    AugmentOpt,
    ChannelsOpt,
    DebugOpt,
    DownloadOpt,
    ImageSizeOpt,
    JsonOpt,
    KdTemperatureOpt,
    LrOpt,
    MomentumOpt,
    NesterovOpt,
    OptimizerOpt,
    PreciseBnOpt,
    QuietOpt,
    ShapeOpt,
    TrainSubsetOpt,
    TrustOpt,
    ValFractionOpt,
    WeightDecayOpt,
)
from .runtime import guard, load_for_cli, parse_json_object, parse_shape

__all__ = ["compare", "CompareInterrupted"]


class CompareInterrupted(ExpandctlError):
    """Ctrl-C (exit 130): finished runs are kept, cut-off runs resume from their last.pt."""

    exit_code = 130


def _study(model, arch, arch_kwargs, input_shape, trust_pickle, ui: UI, **rest) -> study_lib.Study:
    """The recipe: architecture (from MODEL or --arch), input shape, data and training options."""
    from ..checkpoint import infer_input_shape
    from ..models import build_arch, resolve_arch

    if model is None and arch is None:
        raise UsageError(
            "give the compact model (a checkpoint) to compare, or --arch to build one (e.g. --arch smallnet)"
        )
    if model is not None:
        ckpt = load_for_cli(ui, str(model), arch, arch_kwargs, trust_pickle)
        if not ckpt.arch:
            raise UsageError(f"cannot tell which architecture {model} is; pass --arch so that runs can rebuild it")
        spec, kwargs, shape = ckpt.arch, dict(ckpt.arch_kwargs or {}), ckpt.input_shape
    else:
        spec, kwargs = resolve_arch(arch)[0], parse_json_object(arch_kwargs) or {}
        shape = infer_input_shape(spec, kwargs, build_arch(spec, kwargs))
    shape = parse_shape(input_shape) or shape
    if not shape:
        raise UsageError("the model's input shape is not recorded and cannot be inferred; pass --input-shape C,H,W")
    return study_lib.Study(arch=spec, arch_kwargs=kwargs, input_shape=list(shape),
                           model=str(model) if model else None, **rest)  # fmt: skip


def _table(summary: dict) -> Table:
    t = Table(title="expandctl compare: contracted models on the validation split", title_justify="left")
    for col in study_lib.TABLE_HEADER:
        t.add_column(col, overflow="fold", justify="left" if col == "strategy" else "right")
    for r in summary["strategies"]:
        cells = study_lib.table_row(r)
        if r["status"] != "ok":
            cells = [cells[0], cells[1], f"[dim]{escape(cells[2])}[/dim]", *cells[3:]]
        elif r["strategy"] in summary["better"]:
            cells[3] = f"[green]{cells[3]}[/green]"
        elif r["strategy"] in summary["worse"]:
            cells[3] = f"[red]{cells[3]}[/red]"
        t.add_row(*cells)
    return t


def _dry_run(ui: UI, todo, runnable, skipped, details, out: Path, seeds: int) -> None:
    """What compare would run, and nothing else: no folder is written."""
    t = Table(title="expandctl compare --dry-run: the runs it would do", title_justify="left")
    for col in ("strategy", "rate", "params trained", "expanded layers", "runs"):
        t.add_column(col, overflow="fold", justify="left" if col in ("strategy", "expanded layers") else "right")
    for s in runnable:
        d = details[s]
        runs = [study_lib.run_name(st, seed) for st, seed in todo if st == s]
        layers = ", ".join(d["layers"]) or "-"
        t.add_row(s, study_lib.fmt_strategy_rate(d["rate"]), f"{d['params']:,}", escape(layers), str(len(runs)))
    ui.detail(t)
    for s, why in skipped.items():
        ui.print(escape(f"{s}: skipped, {why}"))
    done = [n for n in (study_lib.run_name(s, seed) for s, seed in todo) if (out / "runs" / f"{n}.json").is_file()]
    ui.print(escape(
        f"would run {len(todo) - len(done)} runs ({len(runnable)} strategies x {seeds} seeds"
        + (f", {len(done)} already finished in {out}" if done else "") + f") in {out}; nothing trained or written"
    ))  # fmt: skip
    ui.emit({
        "dry_run": True, "out": str(out), "runs": [study_lib.run_name(s, seed) for s, seed in todo],
        "finished": done, "skipped": skipped,
        "strategies": [{"strategy": s, **details[s]} for s in runnable],
    })  # fmt: skip


def compare(
    model: Annotated[
        Path | None,
        typer.Argument(metavar="MODEL", help="The compact model (any checkpoint expandctl loads); or give --arch."),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Data spec, as for train (required): digits, cifar10:DIR, ...")
    ] = None,
    strategies: Annotated[
        str,
        typer.Option(
            metavar="LIST",
            help="Comma-separated strategies: compact (the baseline, always run) and '+'-joined expansion kinds "
            "(see expandctl expand --strategy), e.g. compact,ck,cl,ck+fc.",
        ),
    ] = "compact,ck,cl",
    seeds: Annotated[int, typer.Option(metavar="N", help="Seeds 0..N-1 per strategy.")] = 3,
    epochs: Annotated[int, typer.Option(help="Epochs per run.")] = 30,
    out: Annotated[
        Path,
        typer.Option("--out", help="Study folder: run files, report.md/.json, figures (shared by --jobs, --shard)."),
    ] = Path("compare"),
    jobs: Annotated[int, typer.Option(metavar="J", help="Runs trained at once (one process, one thread each).")] = 1,
    shard: Annotated[
        str | None,
        typer.Option(metavar="I/N", help="Run only the I-th of N slices (1-based): one per machine sharing --out."),
    ] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Train nothing; write the report.")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the runs it would do (rate and parameters of each strategy, the "
            "strategies skipped and why); train and write nothing.",
        ),
    ] = False,
    threads: Annotated[
        int, typer.Option(metavar="N", help="Torch CPU threads per run (train's --threads, for each run).")
    ] = 1,
    nproc_per_run: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Processes per run: each run data-parallel under torchrun (as `torchrun --nproc_per_node N "
            "expandctl train`); the effective batch is N x --batch-size.",
        ),
    ] = 1,
    rate: Annotated[
        float | None,
        typer.Option(
            metavar="R",
            help="Expansion rate of every strategy; default: each kind's own, as in expand (ck/cl/fc 4, dbb/orepa 1).",
        ),
    ] = None,
    include: Annotated[list[str] | None, typer.Option("--include", metavar="GLOB", help="Expand only these.")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", metavar="GLOB", help="Never expand these.")] = None,
    pointwise: Annotated[bool, typer.Option("--pointwise", help="Also expand 1x1 convolutions with cl.")] = False,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 128,
    accumulate: Annotated[int, typer.Option(metavar="N", help="Mini-batches per optimizer step.")] = 1,
    lr: LrOpt = 0.01,
    optimizer: OptimizerOpt = "sgd",
    momentum: MomentumOpt = 0.9,
    nesterov: NesterovOpt = False,
    schedule: Annotated[str, typer.Option(help="paper, step or cosine (see expandctl train).")] = "paper",
    weight_decay: WeightDecayOpt = 0.0,
    decay_on: Annotated[str, typer.Option(help="factors or product (see expandctl train).")] = "factors",
    teacher: Annotated[Path | None, typer.Option(help="Distil every run from this checkpoint (Hinton KD).")] = None,
    kd_alpha: Annotated[float, typer.Option(help="Weight of the distillation term.")] = 0.9,
    kd_temperature: KdTemperatureOpt = 4.0,
    nonlinear_warmup: Annotated[int, typer.Option(metavar="EPOCHS", help="Epochs with ReLUs between factors.")] = 0,
    precise_bn: PreciseBnOpt = 0,
    forward: Annotated[str, typer.Option(help="fused or explicit (see expandctl train).")] = "fused",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader worker processes per run.")] = 0,
    channels: ChannelsOpt = None,
    image_size: ImageSizeOpt = None,
    augment: AugmentOpt = None,
    train_subset: TrainSubsetOpt = None,
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    input_shape: ShapeOpt = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train compact and each expansion with several seeds, same recipe; report what helps, at what cost."""
    from ..train import TrainConfig

    ui = UI("compare", as_json, quiet, debug)
    with guard(ui):
        names = study_lib.parse_strategies(strategies)
        part = study_lib.parse_shard(shard)
        for ok, message in ((seeds >= 1, "--seeds must be at least 1"), (jobs >= 1, "--jobs must be at least 1"),
                            (nproc_per_run >= 1, "--nproc-per-run must be at least 1"),
                            (threads >= 1, "--threads must be at least 1"),
                            (precise_bn >= 0, "--precise-bn must be >= 0 (0: off)")):  # fmt: skip
            if not ok:
                raise UsageError(message)
        if report_only and not (out / "study.json").is_file():
            raise UsageError(f"--report-only: {out} holds no study yet; run expandctl compare without it first")
        if report_only and model is None and arch is None and data is None:
            study = study_lib.Study.load(out)  # the folder's own recipe
        else:
            if not data:
                raise UsageError("--data is required: the data set to train and score on (e.g. --data digits)")
            recipe = {
                "epochs": epochs, "batch_size": batch_size, "accumulate": accumulate, "lr": lr,
                "optimizer": optimizer.lower(), "momentum": momentum, "nesterov": nesterov,
                "schedule": schedule.lower(), "weight_decay": weight_decay, "decay_on": decay_on.lower(),
                "teacher": str(teacher.resolve()) if teacher else None, "kd_alpha": kd_alpha,
                "kd_temperature": kd_temperature, "nonlinear_warmup": nonlinear_warmup, "forward": forward.lower(),
                "device": device.lower(), "workers": workers, "channels": channels, "image_size": image_size,
                "augment": augment.lower() if augment else None, "train_subset": train_subset, "download": download,
                "trust_pickle": trust_pickle,
            }  # fmt: skip
            if val_fraction is not None:  # only when given: folders made before the option keep their settings
                recipe["val_fraction"] = val_fraction
            TrainConfig.from_dict(recipe, src="", data=data).validate()  # bad options fail here, before any run starts
            if precise_bn:  # only then: a folder made before the option existed keeps its recipe
                recipe["precise_bn"] = precise_bn
            study = _study(model, arch, arch_kwargs, input_shape, trust_pickle, ui, data=data, train=recipe,
                           rate=rate, include=list(include or ()), exclude=list(exclude or ()),
                           pointwise=pointwise)  # fmt: skip
            if report_only:  # the report must describe the runs in the folder: the same recipe
                check_settings(out / "settings.json", study.settings())
        runnable, skipped, details = study_lib.plan_strategies(study, names, refuse=not dry_run)
        seed_list = list(range(seeds))
        for s in runnable:
            for w in details[s]["warnings"]:
                ui.warn(w)
        if dry_run:
            _dry_run(ui, study_lib.schedule(runnable, seed_list, part), runnable, skipped, details, out, seeds)
            return
        damaged = study_lib.set_aside_damaged(out, runnable, seed_list)
        for name, why in damaged:
            ui.warn(f"{out}/runs/{name}.json is damaged ({why}): set aside as {name}.json.damaged; the run is redone")
        result = {"ran": [], "reused": [], "waited": []}
        if not report_only:
            study.save(out)  # refuses a folder whose runs used another recipe
            todo = study_lib.schedule(runnable, seed_list, part)
            ui.note(
                f"{len(todo)} runs ({len(runnable)} strategies x {seeds} seeds"
                + (f", shard {part[0]}/{part[1]}" if part != (1, 1) else "")
                + f") in {out}, {jobs} at a time"
            )
            count = {"done": 0}

            def on_event(kind: str, strategy: str, seed: int, record: dict | None) -> None:
                if kind == "done":
                    count["done"] += 1
                    ui.print(escape(
                        f"{study_lib.run_name(strategy, seed)}: {100 * record['final_acc']:.2f}% contracted, "
                        f"{record['seconds_per_epoch']:.2f} s/epoch, {record['peak_memory_mib']:.0f} MiB peak"
                        + (" (resumed)" if record["resumed"] else "")
                    ))  # fmt: skip
                elif kind == "start":
                    ui.note(f"training {study_lib.run_name(strategy, seed)}")

            try:
                result = study_lib.execute(
                    out, todo, jobs=jobs, threads=threads, on_event=on_event, nproc_per_run=nproc_per_run
                )
            except KeyboardInterrupt:
                raise CompareInterrupted(
                    f"interrupted; the finished runs in {out} are kept: rerun the same command to continue"
                ) from None
            if result["reused"]:
                ui.note(f"reused {len(result['reused'])} finished runs")
        summary = study_lib.summarize(out, names, seed_list, skipped)
        files = study_lib.write_report(out, summary)
        if not quiet:
            ui.print(_table(summary))
            for r in summary["strategies"]:
                if r["status"] != "ok":
                    ui.print(escape(f"{r['strategy']}: {r['status']}, {r['reason']}"))
        ui.print(escape(f"verdict: {summary['verdict']}"))
        for note in summary.get("cost_notes") or ():
            ui.warn(f"cost: {note}")
        ui.print(escape(f"wrote {', '.join(files.values())}"))
        ui.emit({"out": str(out), **result, "damaged": [n for n, _ in damaged], "report": summary, "files": files})

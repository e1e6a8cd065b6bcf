"""``expandctl analyze grad-confusion|landscape`` and ``expandctl plot``: parse, call the library, print.

The main app registers them (``app.add_typer(analyze_app, name="analyze")``, ``app.command("plot")``).
Errors and output follow the other commands (docs/cli.md): one ``error:`` line and an exit code,
``--json`` prints exactly one object. Figures are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import checkpoint as ckpt_io
from ..console import UI, fmt_count, kv_table
from ..errors import UsageError
from ..probe import check_fits, resolve_device
from .options import (
    ArchKwOpt,
    ArchOpt,
    AugmentOpt,
    ChannelsOpt,
    DebugOpt,
    DownloadOpt,
    ImageSizeOpt,
    JsonOpt,
    QuietOpt,
    TrainSubsetOpt,
    TrustOpt,
    ValFractionOpt,
)
from .runtime import Command, data_options, guard, load_for_cli

__all__ = ["analyze_app", "grad_confusion", "landscape", "plot"]

analyze_app = typer.Typer(
    name="analyze",
    help="Gradient confusion and loss landscapes of a checkpoint (the paper's analyses; docs/analysis.md).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

CkptArg = Annotated[
    str, typer.Argument(metavar="CKPT", help="Checkpoint (expanded or compact), any file expandctl loads.")
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data", metavar="SPEC", help="Data spec: digits, mnist5k, synthetic, cifar10:DIR... (docs/train.md)."
    ),
]
SplitOpt = Annotated[str, typer.Option(metavar="train|val", help="Which split to measure on.")]
DeviceOpt = Annotated[str, typer.Option(metavar="auto|cpu|cuda", help="Where to run (auto: CUDA when visible).")]


def _output(output: str | None, src: str, suffix: str) -> Path:
    """``-o FILE.png``; ``-o DIR`` or nothing: ``<CKPT stem>.<suffix>.png`` in DIR or beside CKPT."""
    default = f"{Path(src).stem}.{suffix}.png"
    if output is None:
        out = Path(src).with_name(default)
    elif Path(output).is_dir():
        out = Path(output) / default
    else:
        out = Path(output)
    return ckpt_io.check_output_path(out, [src], (".png",))


def _model_and_data(ui: UI, src, data, split, arch, arch_kwargs, trust, device, options=None):
    """The checkpoint's model on ``device`` and the split, checked to fit each other."""
    from ..data import load_data

    if split not in ("train", "val"):
        raise UsageError(f"--split must be train or val (got {split!r})")
    device = resolve_device(device)
    ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust)
    crop_flip = options is not None and options.augment == "crop-flip"  # off unless asked: analyses compare
    sets = load_data(data, ckpt.input_shape, augment=crop_flip, options=options)
    dataset = getattr(sets, split)
    model = ckpt.model.to(device)
    what = f"the model in {src}"
    check_fits(model, dataset, data, sets.num_classes, sets.input_shape, device, what, ckpt.input_shape)
    model.eval()
    return ckpt, model, dataset


def _write(path: Path, draw) -> None:
    with ckpt_io.atomic_write(path) as tmp:
        draw(tmp)


# --- analyze grad-confusion ------------------------------------------------------------------------
@analyze_app.command("grad-confusion", cls=Command)
def grad_confusion(
    src: CkptArg,
    data: DataOpt,
    pairs: Annotated[int, typer.Option(metavar="N", help="Random mini-batch pairs.")] = 100,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per mini-batch.")] = 128,
    split: SplitOpt = "train",
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the batch and pair draws.")] = 0,
    wrt: Annotated[
        str,
        typer.Option(
            metavar="trained|compact",
            help="Gradients w.r.t. the trained parameters (an expanded layer's factors) or w.r.t. each "
            "expanded layer's composed weight (the compact model's parameters).",
        ),
    ] = "trained",
    mode: Annotated[
        str,
        typer.Option(metavar="train|eval", help="Forward mode: train (BatchNorm batch statistics, as SGD) or eval."),
    ] = "train",
    output: Annotated[
        str | None,
        typer.Option(
            "-o", "--output", metavar="PNG|DIR", help="Density plot (default <CKPT stem>.grad-confusion.png)."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    channels: ChannelsOpt = None,
    image_size: ImageSizeOpt = None,
    augment: AugmentOpt = None,
    train_subset: TrainSubsetOpt = None,
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Cosine similarity of the gradients of random mini-batch pairs: min, mean and a density plot."""
    from ..analysis.confusion import gradient_confusion
    from ..analysis.plots import plot_confusion

    ui = UI("analyze grad-confusion", as_json, quiet, debug)
    with guard(ui):
        out = _output(output, src, "grad-confusion")
        opts = data_options(channels, image_size, augment, train_subset, download, val_fraction)
        _, model, dataset = _model_and_data(ui, src, data, split, arch, arch_kwargs, trust_pickle, device, opts)
        with ui.step(f"gradients of {pairs} mini-batch pairs"):
            r = gradient_confusion(
                model, dataset, pairs=pairs, batch_size=batch_size, seed=seed, wrt=wrt.lower(), mode=mode.lower()
            )
        title = f"{Path(src).name} on {data} ({split}), {r['pairs']} pairs of {batch_size}"
        _write(out, lambda tmp: plot_confusion({Path(src).name: r["similarities"]}, tmp, title))
        ui.detail(
            kv_table(
                [
                    ("min", f"{r['min']:.4f}"),
                    ("mean", f"{r['mean']:.4f}"),
                    ("std", f"{r['std']:.4f}"),
                    (
                        "pairs",
                        f"{r['pairs']} among {r['batches']} batches of {batch_size} ({data} {split}, seed {seed})",
                    ),
                    (
                        "gradients",
                        f"w.r.t. the {r['wrt']} parameters ({fmt_count(r['params'])} values), {r['mode']} mode",
                    ),
                ],
                title=f"gradient confusion of {src}",
            )
        )
        ui.print(f"wrote {out}")
        ui.emit({"source": src, "data": data, "split": split, "seed": seed, **r, "output": str(out)})


# --- analyze landscape -----------------------------------------------------------------------------
@analyze_app.command("landscape", cls=Command)
def landscape(
    src: CkptArg,
    data: DataOpt,
    dims: Annotated[int, typer.Option(metavar="1|2", help="1: a curve along one direction; 2: a contour plot.")] = 1,
    steps: Annotated[int, typer.Option(metavar="N", help="Grid points per direction (odd: 0 is on the grid).")] = 21,
    span: Annotated[float, typer.Option(metavar="X", help="The grid runs from -X to X along each direction.")] = 1.0,
    max_batches: Annotated[
        int | None, typer.Option(metavar="N", help="Evaluate each point on the first N batches only (default all).")
    ] = None,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per evaluation batch.")] = 256,
    split: SplitOpt = "train",
    space: Annotated[
        str,
        typer.Option(
            metavar="compact|factors",
            help="Perturb the contracted model (compact, comparable across compact and expanded) or the factors.",
        ),
    ] = "compact",
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the random directions.")] = 0,
    output: Annotated[
        str | None,
        typer.Option("-o", "--output", metavar="PNG|DIR", help="Plot (default <CKPT stem>.landscape-<dims>d.png)."),
    ] = None,
    device: DeviceOpt = "auto",
    channels: ChannelsOpt = None,
    image_size: ImageSizeOpt = None,
    augment: AugmentOpt = None,
    train_subset: TrainSubsetOpt = None,
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Loss and error along filter-normalised random directions around the weights (Li et al. 2018)."""
    from ..analysis.landscape import loss_landscape
    from ..analysis.plots import plot_landscape

    ui = UI("analyze landscape", as_json, quiet, debug)
    with guard(ui):
        if dims not in (1, 2):
            raise UsageError(f"--dims must be 1 or 2 (got {dims})")
        out = _output(output, src, f"landscape-{dims}d")
        opts = data_options(channels, image_size, augment, train_subset, download, val_fraction)
        _, model, dataset = _model_and_data(ui, src, data, split, arch, arch_kwargs, trust_pickle, device, opts)
        with ui.step(f"evaluating {steps**dims} points"):
            r = loss_landscape(
                model,
                dataset,
                dims=dims,
                steps=steps,
                span=span,
                seed=seed,
                max_batches=max_batches,
                batch_size=batch_size,
                space=space.lower(),
            )
        title = f"{Path(src).name} on {data} ({split}, {r['samples']} images), {r['space']} weights"
        _write(out, lambda tmp: plot_landscape(r, tmp, title))
        flat_loss = r["loss"] if dims == 1 else [v for row in r["loss"] for v in row]
        ui.detail(
            kv_table(
                [
                    ("loss at 0", f"{r['loss_at_0']:.4f} (error {100 * r['error_at_0']:.2f}%)"),
                    ("loss range", f"{min(flat_loss):.4f} .. {max(flat_loss):.4f}"),
                    (
                        "grid",
                        f"{dims}D, {steps} steps in [-{span:g}, {span:g}], {r['space']} weights, seed {seed}, "
                        f"{r['samples']} images of {data} {split}",
                    ),
                ],
                title=f"loss landscape of {src}",
            )
        )
        if dims == 1:
            table = Table(title_justify="left")
            for col in ("alpha", "loss", "error"):
                table.add_column(col, justify="right")
            for a, loss, err in zip(r["alphas"], r["loss"], r["error"]):
                table.add_row(f"{a:+.3f}", f"{loss:.4f}", f"{100 * err:.2f}%")
            ui.detail(table)
        ui.print(f"wrote {out}")
        ui.emit({"source": src, "data": data, "split": split, **r, "output": str(out)})


# --- plot ------------------------------------------------------------------------------------------
def plot(
    runs: Annotated[
        list[str], typer.Argument(metavar="RUN_DIR", help="Run folders of expandctl train (metrics.jsonl).")
    ],
    output: Annotated[str, typer.Option("-o", "--output", metavar="PNG", help="Figure to write.")] = "runs.png",
    labels: Annotated[
        str | None, typer.Option(metavar="A,B,...", help="Legend labels, one per run (default: the folder names).")
    ] = None,
    title: Annotated[str | None, typer.Option(help="Figure title.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Overlay the training and validation curves of several runs (loss, error, gradient confusion)."""
    from ..analysis.plots import plot_runs, read_metrics

    ui = UI("plot", as_json, quiet, debug)
    with guard(ui):
        out = ckpt_io.check_output_path(output, [], (".png",))
        names = _labels(runs, labels)
        histories = [read_metrics(run) for run in runs]
        _write(out, lambda tmp: plot_runs(list(zip(names, histories)), tmp, title))
        table = Table(title="runs", title_justify="left")
        for col in ("label", "run", "epochs", "train loss", "train acc", "val loss", "val acc", "best val acc"):
            table.add_column(col, overflow="fold")
        summary = []
        for name, run, history in zip(names, runs, histories):
            last = history[-1]
            accs = [row["val_acc"] for row in history if isinstance(row.get("val_acc"), (int, float))]
            best = max(accs) if accs else None
            summary.append({"label": name, "run": run, "epochs": len(history), "final": last, "best_val_acc": best})
            table.add_row(
                name, run, str(len(history)), _num(last.get("train_loss")), _pct(last.get("train_acc")),
                _num(last.get("val_loss")), _pct(last.get("val_acc")), _pct(best),
            )  # fmt: skip
        ui.detail(table)
        ui.print(f"wrote {out}")
        ui.emit({"output": str(out), "runs": summary})


def _labels(runs: list[str], labels: str | None) -> list[str]:
    if labels is not None:
        names = [s.strip() for s in labels.split(",")]
        if len(names) != len(runs):
            raise UsageError(f"--labels gives {len(names)} labels for {len(runs)} runs; give one per run")
        return names
    names = [Path(r).resolve().name if Path(r).is_dir() else Path(r).resolve().parent.name for r in runs]
    if len(set(names)) < len(names):  # e.g. a/run and b/run: the paths as typed tell them apart
        names = list(runs)
    return names


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def _pct(x) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "-"

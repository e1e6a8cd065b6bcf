"""``expandctl analyze grad-confusion|landscape``: the options to the verbs of :mod:`expandctl.workflows.analyze`,
their results to a table and ``--json``.

Torch-free at import: the library is imported inside the commands, so that ``--help`` loads no torch.
Errors and output follow the other commands (docs/cli.md): one ``error:`` line and an exit code,
``--json`` prints exactly one object. Figures are written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated

import typer
from rich.table import Table

from ..console import UI, fmt_count, kv_table
from .options import (
    ADAPTER_OPTIONS,
    LOAD_OPTIONS,
    OUTPUT_OPTIONS,
    DataOpt,
    DeviceOpt,
    SplitOpt,
    with_options,
)
from .runtime import Command, data_options, guard, load_for_cli

__all__ = ["analyze_app", "grad_confusion", "landscape"]

analyze_app = typer.Typer(
    name="analyze",
    help="Gradient confusion and loss landscapes of a checkpoint (the paper's analyses; docs/analysis.md).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

CkptArg = Annotated[
    str, typer.Argument(metavar="CKPT", help="Checkpoint (expanded or compact), any file expandctl loads.")
]
analysis = with_options(ADAPTER_OPTIONS, LOAD_OPTIONS, OUTPUT_OPTIONS)


def _analyze(name: str, verb: Callable, options, src: str, opts: dict, show: Callable) -> None:
    """Run one analysis: ``options(data_options=...)`` from the flags, the checkpoint loaded as every
    command loads one, ``show(ui, result)`` for people, the result's dict for ``--json``."""
    ui = UI(f"analyze {name}", opts["as_json"], opts["quiet"], opts["debug"])
    with guard(ui):
        adapters = data_options(**{k: opts[k] for k in ADAPTER_OPTIONS})
        load = partial(_load, ui, opts["arch"], opts["arch_kwargs"], opts["trust_pickle"])
        result = verb(src, options(data_options=adapters), load=load, progress=ui)
        show(ui, result)
        ui.print(f"wrote {result.output}")
        ui.emit(result.to_dict())


def _load(ui: UI, arch, arch_kwargs, trust: bool, path: str):
    return load_for_cli(ui, path, arch, arch_kwargs, trust)


# --- analyze grad-confusion ------------------------------------------------------------------------
@analyze_app.command("grad-confusion", cls=Command)
@analysis
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
    **opts,
) -> None:
    """Cosine similarity of the gradients of random mini-batch pairs: min, mean and a density plot."""
    from ..workflows.analyze import GradConfusionOptions
    from ..workflows.analyze import grad_confusion as verb

    options = partial(GradConfusionOptions, data=data, split=split, seed=seed, output=output, device=device,
                      pairs=pairs, batch_size=batch_size, wrt=wrt, mode=mode)  # fmt: skip
    _analyze("grad-confusion", verb, options, src, opts, _show_confusion)


def _show_confusion(ui: UI, result) -> None:
    r, o = result.measured, result.options
    rows = [
        ("min", f"{r['min']:.4f}"),
        ("mean", f"{r['mean']:.4f}"),
        ("std", f"{r['std']:.4f}"),
        ("pairs", f"{r['pairs']} among {r['batches']} batches of {o.batch_size} ({o.data} {o.split}, seed {o.seed})"),
        ("gradients", f"w.r.t. the {r['wrt']} parameters ({fmt_count(r['params'])} values), {r['mode']} mode"),
    ]
    ui.detail(kv_table(rows, title=f"gradient confusion of {result.source}"))


# --- analyze landscape -----------------------------------------------------------------------------
@analyze_app.command("landscape", cls=Command)
@analysis
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
    **opts,
) -> None:
    """Loss and error along filter-normalised random directions around the weights (Li et al. 2018)."""
    from ..workflows.analyze import LandscapeOptions
    from ..workflows.analyze import landscape as verb

    options = partial(LandscapeOptions, data=data, split=split, seed=seed, output=output, device=device, dims=dims,
                      steps=steps, span=span, max_batches=max_batches, batch_size=batch_size, space=space)  # fmt: skip
    _analyze("landscape", verb, options, src, opts, _show_landscape)


def _show_landscape(ui: UI, result) -> None:
    r, o = result.measured, result.options
    flat_loss = r["loss"] if o.dims == 1 else [v for row in r["loss"] for v in row]
    grid = (f"{o.dims}D, {o.steps} steps in [-{o.span:g}, {o.span:g}], {r['space']} weights, seed {o.seed}, "
            f"{r['samples']} images of {o.data} {o.split}")  # fmt: skip
    rows = [
        ("loss at 0", f"{r['loss_at_0']:.4f} (error {100 * r['error_at_0']:.2f}%)"),
        ("loss range", f"{min(flat_loss):.4f} .. {max(flat_loss):.4f}"),
        ("grid", grid),
    ]
    ui.detail(kv_table(rows, title=f"loss landscape of {result.source}"))
    if o.dims == 1:
        table = Table(title_justify="left")
        for col in ("alpha", "loss", "error"):
            table.add_column(col, justify="right")
        for a, loss, err in zip(r["alphas"], r["loss"], r["error"]):
            table.add_row(f"{a:+.3f}", f"{loss:.4f}", f"{100 * err:.2f}%")
        ui.detail(table)

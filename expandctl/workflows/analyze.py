"""``expandctl analyze grad-confusion|landscape`` as library functions: load the checkpoint and the data
split, measure (:mod:`expandctl.analysis`), draw the figure. Never prints.

>>> from expandctl.workflows.analyze import GradConfusionOptions, grad_confusion
>>> r = grad_confusion("run/best.pt", GradConfusionOptions(data="digits", pairs=100))
>>> r.to_dict()["min"], r.output
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn as nn
from torch.utils.data import Dataset

from .. import checkpoint as ckpt_io
from ..analysis.confusion import gradient_confusion
from ..analysis.landscape import loss_landscape
from ..analysis.plots import plot_confusion, plot_landscape
from ..data import DataOptions, load_data
from ..errors import UsageError
from ..probe import check_fits, resolve_device
from ..progress import Progress, Silent

__all__ = [
    "GradConfusionOptions",
    "LandscapeOptions",
    "AnalysisResult",
    "grad_confusion",
    "landscape",
]

Loader = Callable[[str], ckpt_io.Checkpoint]


@dataclass(frozen=True)
class _AnalysisOptions:
    """What both analyses take: the data split, the figure and the device."""

    data: str
    split: str = "train"
    seed: int = 0
    output: str | None = None  # a .png file or a folder; default <checkpoint stem>.<analysis>.png beside it
    device: str = "auto"
    data_options: DataOptions | None = None


@dataclass(frozen=True)
class GradConfusionOptions(_AnalysisOptions):
    pairs: int = 100
    batch_size: int = 128
    wrt: str = "trained"  # or "compact"
    mode: str = "train"  # or "eval"


@dataclass(frozen=True)
class LandscapeOptions(_AnalysisOptions):
    dims: int = 1
    steps: int = 21
    span: float = 1.0
    max_batches: int | None = None
    batch_size: int = 256
    space: str = "compact"  # or "factors"


@dataclass
class AnalysisResult:
    """An analysis of the checkpoint ``source``: what it measured (:func:`expandctl.analysis.gradient_confusion`'s
    or :func:`expandctl.analysis.loss_landscape`'s dict) and the figure it wrote."""

    source: str
    options: GradConfusionOptions | LandscapeOptions
    measured: dict
    output: Path

    def to_dict(self) -> dict:
        o = self.options
        given = {"data": o.data, "split": o.split, **({"seed": o.seed} if isinstance(o, GradConfusionOptions) else {})}
        return {"source": self.source, **given, **self.measured, "output": str(self.output)}


def output_path(output: str | None, src: str, suffix: str) -> Path:
    """``FILE.png``; a folder or nothing: ``<src stem>.<suffix>.png`` in it or beside ``src``."""
    default = f"{Path(src).stem}.{suffix}.png"
    if output is None:
        out = Path(src).with_name(default)
    elif Path(output).is_dir():
        out = Path(output) / default
    else:
        out = Path(output)
    return ckpt_io.check_output_path(out, [src], (".png",))


def model_and_data(src: str, o: _AnalysisOptions, load: Loader | None = None) -> tuple[nn.Module, Dataset]:
    """The checkpoint's model on ``o.device`` in eval mode and the split, checked to fit each other."""
    if o.split not in ("train", "val"):
        raise UsageError(f"split must be train or val (got {o.split!r})", option="split")
    device = resolve_device(o.device)
    ckpt = (load or ckpt_io.load_checkpoint)(src)
    crop_flip = o.data_options is not None and o.data_options.augment == "crop-flip"  # off unless asked
    sets = load_data(o.data, ckpt.input_shape, augment=crop_flip, options=o.data_options)
    dataset = getattr(sets, o.split)
    model = ckpt.model.to(device)
    what = f"the model in {src}"
    check_fits(model, dataset, o.data, sets.num_classes, sets.input_shape, device, what, ckpt.input_shape)
    model.eval()
    return model, dataset


def _write(path: Path, draw: Callable[[Path], None]) -> None:
    with ckpt_io.atomic_write(path) as tmp:
        draw(tmp)


def grad_confusion(
    src: str, options: GradConfusionOptions, *, load: Loader | None = None, progress: Progress | None = None
) -> AnalysisResult:
    """Cosine similarity of the gradients of random mini-batch pairs of the checkpoint ``src`` (``load``
    reads it; default :func:`expandctl.load_checkpoint`), and their density plot written atomically."""
    o, progress = options, progress or Silent()
    out = output_path(o.output, src, "grad-confusion")
    model, dataset = model_and_data(src, o, load)
    with progress.step(f"gradients of {o.pairs} mini-batch pairs"):
        r = gradient_confusion(model, dataset, pairs=o.pairs, batch_size=o.batch_size, seed=o.seed,
                               wrt=o.wrt.lower(), mode=o.mode.lower())  # fmt: skip
    title = f"{Path(src).name} on {o.data} ({o.split}), {r['pairs']} pairs of {o.batch_size}"
    _write(out, lambda tmp: plot_confusion({Path(src).name: r["similarities"]}, tmp, title))
    return AnalysisResult(src, o, r, out)


def landscape(
    src: str, options: LandscapeOptions, *, load: Loader | None = None, progress: Progress | None = None
) -> AnalysisResult:
    """Loss and error of the checkpoint ``src`` along filter-normalised random directions around its weights
    (Li et al. 2018), and the curve (1D) or contour (2D) plot written atomically."""
    o, progress = options, progress or Silent()
    if o.dims not in (1, 2):
        raise UsageError(f"dims must be 1 or 2 (got {o.dims})", option="dims")
    out = output_path(o.output, src, f"landscape-{o.dims}d")
    model, dataset = model_and_data(src, o, load)
    grid = {k: v for k, v in asdict(o).items() if k in ("dims", "steps", "span", "seed", "max_batches", "batch_size")}
    with progress.step(f"evaluating {o.steps**o.dims} points"):
        r = loss_landscape(model, dataset, **grid, space=o.space.lower())
    title = f"{Path(src).name} on {o.data} ({o.split}, {r['samples']} images), {r['space']} weights"
    _write(out, lambda tmp: plot_landscape(r, tmp, title))
    return AnalysisResult(src, o, r, out)

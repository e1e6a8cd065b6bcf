"""Every option that more than one command takes, declared once (imported by the command modules).

Torch-free: ``--help`` reads these without loading the library.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated

import typer

from ..data.registry import sources, spec_help

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (also on error), nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or notes.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        metavar="SPEC",
        help="Architecture: a torchvision name (resnet18), smallnet, or module:callable "
        "(mypkg.models:MyNet; timm: timm:create_model with model_name in --arch-kwargs). "
        "Needed for plain state dicts; overrides what a checkpoint records.",
    ),
]
ArchKwOpt = Annotated[
    str | None,
    typer.Option(
        "--arch-kwargs", metavar="JSON", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'."
    ),
]
ShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        metavar="C,H,W",
        help="Per-sample input shape C,H,W (no batch). Default: recorded in the checkpoint, or inferred "
        "(3,224,224 for torchvision classifiers; SmallNet from its arguments).",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        envvar="EXPANDCTL_TRUST_PICKLE",
        help="Allow pickles that name classes outside torch/torchvision (runs code from the file: "
        "only for files you trust). Also EXPANDCTL_TRUST_PICKLE=1.",
    ),
]
ChannelsOpt = Annotated[
    int | None,
    typer.Option(
        "--channels", metavar="1|3", help="Convert images to 1 (gray, by luma) or 3 channels (gray replicated)."
    ),
]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", metavar="N", help="Resize images to N x N.")]
AugmentOpt = Annotated[
    str | None,
    typer.Option(
        "--augment",
        metavar="none|crop-flip",
        help="Training-split augmentation (default per set: crop-flip for cifar and imagefolder, else none).",
    ),
]
TrainSubsetOpt = Annotated[
    int | None,
    typer.Option("--train-subset", metavar="N", help="Use N training images: stratified by class, fixed seed."),
]


def _downloadable() -> str:
    """The sources ``--download`` can fetch, from the registry: ``a, b or c``."""
    names = [s.name for s in sources() if s.downloadable]
    return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


DownloadOpt = Annotated[
    bool,
    typer.Option(
        "--download",
        help=f"Fetch a missing {_downloadable()} into the cache ($EXPANDCTL_DATA, default ~/.cache/expandctl/data).",
    ),
]
ValFractionOpt = Annotated[
    float | None,
    typer.Option(
        "--val-fraction",
        metavar="F",
        help="imagefolder:DIR with class folders directly under DIR: hold out this share of each class for "
        "validation (default 0.2; the same seeded split in train and evaluate).",
    ),
]
PreciseBnOpt = Annotated[
    int,
    typer.Option(
        "--precise-bn",
        metavar="N",
        help="Recompute every BatchNorm's running statistics over N training batches with the final weights "
        "(branch BatchNorms included; 0: off). See docs/train.md.",
    ),
]
AtolOpt = Annotated[
    float | None, typer.Option("--atol", metavar="X", help="Absolute tolerance (default by dtype, see docs).")
]
RtolOpt = Annotated[
    float | None,
    typer.Option("--rtol", metavar="X", help="Tolerance relative to the largest output (default by dtype)."),
]
DynamicSizeOpt = Annotated[
    bool,
    typer.Option(
        "--dynamic-size",
        help="Symbolic image size (length; height, width; depth too) in the ONNX graph; refused for models "
        "with a fixed-size layer. Checked at the exported size and at twice it.",
    ),
]


def data_help(role: str = "Data spec") -> str:
    """Every ``--data`` help: what the data is for, then the registered sources (:mod:`expandctl.data.registry`)."""
    return f"{role}: {spec_help()}"


DataOpt = Annotated[str, typer.Option("--data", metavar="SPEC", help=data_help())]


# --- options of expand, contract, verify, export, inspect, evaluate (add here) ---

#: The trailing options that :func:`expandctl.commands.runtime.command` adds to a command, by parameter name:
#: (declaration, default). How the command loads its model (``load=True``), then how it prints (always).
LOAD_OPTIONS = {"arch": (ArchOpt, None), "arch_kwargs": (ArchKwOpt, None), "trust_pickle": (TrustOpt, False)}
OUTPUT_OPTIONS = {"as_json": (JsonOpt, False), "quiet": (QuietOpt, False), "debug": (DebugOpt, False)}
#: The data adapters (``--augment`` included), declared once: train, compare, analyze take them all.
ADAPTER_OPTIONS = {
    "channels": (ChannelsOpt, None), "image_size": (ImageSizeOpt, None), "augment": (AugmentOpt, None),
    "train_subset": (TrainSubsetOpt, None), "download": (DownloadOpt, False), "val_fraction": (ValFractionOpt, None),
}  # fmt: skip
#: The data adapters of a command that scores a model (never augmented): ``command(data_adapters=True)``.
DATA_ADAPTER_OPTIONS = {k: v for k, v in ADAPTER_OPTIONS.items() if k != "augment"}


# --- options of train (add here) ---
# The optimizer options train and compare share (compare passes them to each run's training).
LrOpt = Annotated[float, typer.Option("--lr", help="Base learning rate.")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd or adamw.")]
MomentumOpt = Annotated[float, typer.Option("--momentum", help="SGD momentum.")]
NesterovOpt = Annotated[bool, typer.Option("--nesterov", help="Nesterov momentum (SGD).")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="L2 strength.")]
KdTemperatureOpt = Annotated[float, typer.Option("--kd-temperature", help="Distillation temperature.")]


# --- options of quantize, compare, analyze, plot (add here) ---
SplitOpt = Annotated[str, typer.Option(metavar="train|val", help="Which split to measure on.")]
DeviceOpt = Annotated[str, typer.Option(metavar="auto|cpu|cuda", help="Where to run (auto: CUDA when visible).")]


def extended_signature(func: Callable, *groups: dict[str, tuple], drop: tuple[str, ...] = ()) -> inspect.Signature:
    """``func``'s signature with each group's options appended as keyword-only parameters (Typer reads
    ``__signature__``), less ``**kwargs`` and the names in ``drop``: a group is declared once, here."""
    sig = inspect.signature(func, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in drop]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        for group in groups
        for name, (annotation, default) in group.items()
    ]
    return sig.replace(parameters=[*own, *extra])


def with_options(*groups: dict[str, tuple]) -> Callable[[Callable], Callable]:
    """Append each group's options to a command's parameters; the command takes them as ``**opts``
    (keyword arguments named like the flags, e.g. ``opts["as_json"]``)."""

    def add(func: Callable) -> Callable:
        func.__signature__ = extended_signature(func, *groups)
        return func

    return add

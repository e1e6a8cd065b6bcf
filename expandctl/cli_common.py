"""What every expandctl command shares: exit codes, common options, error handling, loading.

The top-level CLI (:mod:`expandctl.cli`) and the command modules it registers
(:mod:`expandctl.train.command`, :mod:`expandctl.analysis.command`) all import from here.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Annotated

import typer
import typer.core

from . import checkpoint as ckpt_io
from .console import UI
from .errors import ExpandctlError, UsageError
from .shapes import backend_message, fmt_shape, running_model  # noqa: F401 (running_model: re-exported)

#: Exit codes (documented in docs/cli.md). 1-4 come from the error classes' ``exit_code``.
EXIT_CODES = {
    0: "success",
    1: "check failed: an equivalence, ONNX export or INT8 accuracy (quantize --max-drop) check did not pass "
    "(nothing was written)",
    2: "usage error or bad input: missing/corrupt/unknown file, bad option, weights that do not fit --arch",
    3: "unsafe input refused: a pickle naming classes outside torch/torchvision (use --trust-pickle)",
    4: "unsupported model or layer: nothing to expand, a layer that cannot be expanded or exported, "
    "a fixed-size layer under --dynamic-size",
    5: "I/O error: a file could not be read or written (permissions, disk full)",
    70: "internal error: a bug in expandctl or a library it calls (rerun with --debug and report it)",
    130: "interrupted (Ctrl-C)",
}
EXIT_IO, EXIT_INTERNAL, EXIT_INTERRUPTED = 5, 70, 130


class Command(typer.core.TyperCommand):
    """Usage lines name required arguments plainly (``SRC``), as the docs do; Typer writes ``{SRC}``,
    which reads like a literal brace to type. Every expandctl command is registered with it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:  # one style of value placeholder in --help: SRC, --data SPEC, --epochs N
            if isinstance(param, typer.core.TyperArgument):
                param.display_type_rich = _no_type  # "SRC", not "SRC <str>"
            elif not getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = placeholder(param)

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(.*)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


#: The placeholder of an option that names none: by its name, else by its type.
PLACEHOLDERS = {
    "data": "SPEC", "teacher_arch": "SPEC", "teacher_arch_kwargs": "JSON", "optimizer": "sgd|adamw",
    "schedule": "paper|step|cosine", "decay_on": "factors|product", "forward": "fused|explicit",
    "device": "auto|cpu|cuda", "out": "DIR",
}  # fmt: skip


def placeholder(param) -> str:
    if param.name in PLACEHOLDERS:
        return PLACEHOLDERS[param.name]
    desc = getattr(param, "type_descriptor", None)
    if desc is not None and desc.is_path:
        return "PATH"
    kind = param.bare_type() if hasattr(param, "bare_type") else ""
    return {"int": "N", "float": "X"}.get(kind, "TEXT")


def _no_type(ctx) -> str:
    return ""


# --- options ----------------------------------------------------------------------------------------
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
DownloadOpt = Annotated[
    bool,
    typer.Option(
        "--download",
        help="Fetch a missing mnist, fashion-mnist, cifar10 or cifar100 into the cache "
        "($EXPANDCTL_DATA, default ~/.cache/expandctl/data).",
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


@contextlib.contextmanager
def guard(ui: UI) -> Iterator[None]:
    """Turn every failure into ``error: <sentence>`` on stderr (JSON on stdout) and an exit code."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except ExpandctlError as e:
        ui.error(str(e), e.exit_code, getattr(e, "details", None), e)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        ui.error("interrupted; no output was written", EXIT_INTERRUPTED, exc=e)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except OSError as e:
        where = f" {str(e.filename)!r}" if e.filename else ""
        ui.error(f"cannot access{where}: {e.strerror or e}; check permissions and free space", EXIT_IO, exc=e)
        raise typer.Exit(EXIT_IO) from None
    except Exception as e:
        ui.error(
            f"internal error ({type(e).__name__}: {backend_message(e, 300)}); rerun with --debug for the traceback "
            "and report it",
            EXIT_INTERNAL,
            exc=e,
        )
        raise typer.Exit(EXIT_INTERNAL) from None


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"--input-shape {text!r} is not a list of positive integers like 3,224,224 (no batch size)")
    return shape


def parse_json_object(text: str | None, option: str = "--arch-kwargs") -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"{option} is not valid JSON ({e.msg} at character {e.pos}); e.g. '{{\"num_classes\": 10}}'"
        ) from None
    if not isinstance(value, dict):
        raise UsageError(f"{option} must be a JSON object like '{{\"num_classes\": 10}}', got {text!r}")
    return value


def load_for_cli(ui: UI, path: str, arch, arch_kwargs, trust: bool) -> ckpt_io.Checkpoint:
    with ui.step(f"loading {path}"):
        ckpt = ckpt_io.load_checkpoint(path, arch, parse_json_object(arch_kwargs), trust)
    from .verify import check_finite

    try:
        check_finite(ckpt.model)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    return ckpt


def input_shape_of(ckpt: ckpt_io.Checkpoint, override: str | None, fallback=None) -> tuple[int, ...]:
    shape = parse_shape(override) or ckpt.input_shape or fallback
    if not shape:
        raise UsageError(
            f"the input shape of {str(ckpt.path)!r} is not recorded and cannot be inferred; pass --input-shape C,H,W"
        )
    return tuple(shape)


def data_options(channels=None, image_size=None, augment=None, train_subset=None, download=False, val_fraction=None):
    """The data adapter options of ``train``, ``evaluate`` and ``analyze``, validated."""
    from .datasets import DataOptions

    augment = augment.lower() if augment else None
    return DataOptions(channels, image_size, augment, train_subset, download, val_fraction).validate()

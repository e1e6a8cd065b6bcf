"""``expandctl quantize`` as a library function: a float ONNX file, or a checkpoint exported first (an
expanded one contracted and checked before), quantized to INT8 and scored against the float model
(:func:`expandctl.quantize.quantize`), with the accuracy gates. Never prints.

>>> from expandctl.workflows.quantize import QuantizeOptions, quantize_model
>>> r = quantize_model("run/best.pt", QuantizeOptions(data="digits", output="model.int8.onnx", max_drop=1.0))
>>> r.to_dict()["drop_points"]
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ckpt_io
from ..data import DataOptions, DataSplits, load_data
from ..errors import CheckFailed, UsageError
from ..export import export_onnx
from ..progress import Progress, Silent
from ..quantize import METHODS, QuantizeResult, check_float_onnx, check_min_accuracy, quantize
from ..rewrite import expanded_layers
from ..shapes import data_mismatch, first_layer_channels, onnx_dynamic_size, running_model
from .checks import contract_checked, onnx_file_shape, onnx_metadata

__all__ = ["QuantizeOptions", "QuantizeReport", "quantize_model"]


@dataclass(frozen=True)
class QuantizeOptions:
    """The options of ``expandctl quantize`` (fields named like its flags); checked when made."""

    data: str  # calibration (train split) and scoring (val split)
    output: str  # the INT8 .onnx file
    calib_size: int = 512
    calibration: str = "minmax"  # one of expandctl.quantize.METHODS
    seed: int = 0
    max_drop: float | None = None  # percentage points
    min_accuracy: float | None = None  # percent
    per_channel: bool = True
    batch_size: int = 256
    latency_batch: int = 32
    latency_rounds: int = 30
    data_options: DataOptions | None = None
    input_shape: tuple[int, ...] | None = None  # of a checkpoint that does not record it
    atol: float | None = None
    rtol: float | None = None

    def __post_init__(self) -> None:
        if self.calibration not in METHODS:
            raise UsageError(
                f"calibration must be one of {', '.join(METHODS)}, not {self.calibration!r}", option="calibration"
            )
        if self.calib_size < 1:
            raise UsageError(
                f"the calibration set is empty (calib_size {self.calib_size}); give at least 1 image",
                option="calib_size",
            )
        if self.max_drop is not None and self.max_drop < 0:
            raise UsageError(
                f"max_drop must be a number of percentage points >= 0, not {self.max_drop:g}", option="max_drop"
            )
        check_min_accuracy(self.min_accuracy)
        for name in ("batch_size", "latency_batch", "latency_rounds"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1", option=name)


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` read and wrote: ``result`` is :func:`expandctl.quantize.quantize`'s."""

    source: str
    data: str
    input_shape: tuple[int, ...] | None
    output: Path
    result: QuantizeResult

    @property
    def notes(self) -> list[str]:
        return self.result.notes

    def to_dict(self) -> dict:
        shape = list(self.input_shape) if self.input_shape else None
        return {"source": self.source, "data": self.data, "input_shape": shape, **self.result.to_dict()}


def quantize_model(
    src: str,
    options: QuantizeOptions,
    *,
    load: Callable[[str], ckpt_io.Checkpoint] | None = None,
    command: str | None = None,
    progress: Progress | None = None,
) -> QuantizeReport:
    """Quantize ``src`` (a float ONNX file, or a checkpoint that ``load`` reads, default
    :func:`expandctl.load_checkpoint`) to ``options.output``. A failed gate or check raises
    :class:`CheckFailed` (its ``.details``: the whole result) and writes nothing. ``command`` is recorded in
    the exported file's metadata."""
    o, progress = options, progress or Silent()
    out = ckpt_io.check_output_path(o.output, [src], (".onnx",))
    with contextlib.ExitStack() as stack:
        if ckpt_io.sniff_format(src) == "onnx":
            float_path = Path(src)
            shape, sets = _onnx_input(src, o)
        else:
            float_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="expandctl-"))) / "float.onnx"
            shape, sets = _export_float(src, o, float_path, load, command, progress)
        step = f"calibrating on {o.calib_size} {o.data} images ({o.calibration}), scoring float and INT8"
        with progress.step(step):
            result = quantize(float_path, out, sets, o.data, calib_size=o.calib_size, method=o.calibration,
                              seed=o.seed, per_channel=o.per_channel, max_drop=o.max_drop,
                              min_accuracy=o.min_accuracy, batch_size=o.batch_size, latency_batch=o.latency_batch,
                              latency_rounds=o.latency_rounds)  # fmt: skip
    return QuantizeReport(src, o.data, shape, out, result)


def _onnx_input(src: str, o: QuantizeOptions) -> tuple[tuple[int, ...] | None, DataSplits]:
    """A float ONNX file's input shape and the data, checked to fit it."""
    check_float_onnx(src)
    shape = onnx_file_shape(src)
    sets = load_data(o.data, shape, augment=False, options=o.data_options)
    given = tuple(sets.input_shape)
    if onnx_dynamic_size(src) and shape and len(shape) == len(given):  # any size, same channels
        shape = (shape[0], *given[1:])
    if shape and tuple(shape) != given:
        raise data_mismatch(None, src, shape, o.data, given)
    return shape, sets


def _export_float(src, o: QuantizeOptions, float_path: Path, load, command, progress) -> tuple:
    """The checkpoint's model (contracted and checked first when expanded) exported to ``float_path`` and
    checked with onnxruntime; its input shape and the data, checked to fit it before anything is done."""
    ckpt = (load or ckpt_io.load_checkpoint)(src)
    shape = tuple(o.input_shape or ckpt.input_shape or ())
    if not shape:
        raise UsageError(
            f"the input shape of {str(ckpt.path)!r} is not recorded and cannot be inferred; pass input_shape C,H,W",
            option="input_shape",
        )
    sets = load_data(o.data, shape, augment=False, options=o.data_options)
    if shape != tuple(sets.input_shape):  # before contracting and exporting
        raise data_mismatch(None, src, shape, o.data, sets.input_shape, first_layer_channels(ckpt.model))
    model = ckpt.model
    if list(expanded_layers(model)):
        model, _ = contract_checked(ckpt, shape, o.atol, o.rtol, progress)
    metadata = onnx_metadata(ckpt, shape, ckpt.folded_bn, command)
    with progress.step("exporting the float model and checking it with onnxruntime"), running_model(shape):
        try:
            export_onnx(model, float_path, shape, metadata=metadata, atol=o.atol, rtol=o.rtol)
        except CheckFailed as e:
            raise CheckFailed(f"{e}; nothing was written") from None
    return shape, sets

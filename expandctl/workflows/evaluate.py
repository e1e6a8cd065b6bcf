"""``expandctl evaluate`` as a library function: accuracy and loss of a checkpoint (run in torch) or an ONNX
file (onnxruntime) on a data split, with an optional accuracy gate. Never prints.

>>> from expandctl.workflows import EvaluateOptions, evaluate_file
>>> r = evaluate_file("compact.onnx", "digits", EvaluateOptions(min_accuracy=90))  # CheckFailed below 90%
>>> r.accuracy, r.metrics["loss"]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt_io
from ..data import DataOptions, load_data
from ..errors import CheckFailed, UsageError
from ..evaluate import evaluate_onnx, evaluate_torch
from ..progress import Progress, Silent
from ..shapes import data_mismatch, first_layer_channels
from .checks import load_checked, onnx_file_shape

__all__ = ["EvaluateOptions", "EvaluateResult", "evaluate_file"]


@dataclass(frozen=True)
class EvaluateOptions:
    """How :func:`evaluate_file` scores (the flags of ``expandctl evaluate``). ``data_options`` adapt the
    data to the model (never augmented); its ``val_fraction`` defaults to the one the run that wrote a
    checkpoint recorded."""

    split: str = "val"
    batch_size: int = 256
    min_accuracy: float | None = None
    data_options: DataOptions = field(default_factory=DataOptions)
    arch: str | None = None
    arch_kwargs: dict | None = None
    trust_pickle: bool = False

    def validate(self) -> EvaluateOptions:
        if self.split not in ("val", "train"):
            raise UsageError(f"split must be val or train, not {self.split!r}", option="split")
        if self.batch_size < 1:
            raise UsageError("batch_size must be at least 1", option="batch_size")
        self.data_options.validate()
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 100:
            raise UsageError(
                f"min_accuracy is a percentage between 0 and 100, not {self.min_accuracy:g}", option="min_accuracy"
            )
        return self


@dataclass
class EvaluateResult:
    """What :func:`evaluate_file` measured; ``to_dict()`` is ``expandctl evaluate --json``'s object.
    ``metrics``: runtime, accuracy, error, loss, correct, samples. ``recorded_val_fraction``: the held-out
    share taken from the checkpoint's training run (``None`` when the options or the default gave it)."""

    source: str
    data: str
    split: str
    metrics: dict
    min_accuracy: float | None
    num_classes: int
    recorded_val_fraction: float | None = None

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    @property
    def passed(self) -> bool:
        return self.min_accuracy is None or 100 * self.accuracy >= self.min_accuracy

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "data": self.data,
            "split": self.split,
            **self.metrics,
            "min_accuracy": self.min_accuracy,
        }


def evaluate_file(
    src: str | Path, data: str, options: EvaluateOptions | None = None, progress: Progress | None = None
) -> EvaluateResult:
    """Score ``src`` on ``data``'s ``options.split``. Below ``options.min_accuracy`` (percent) raises
    :class:`CheckFailed` whose ``.result`` is the :class:`EvaluateResult` and ``.details`` its scores."""
    o, progress, src = (options or EvaluateOptions()).validate(), progress or Silent(), str(src)
    data_opts, recorded = o.data_options, None
    if ckpt_io.sniff_format(src) == "onnx":
        shape = onnx_file_shape(src)
        sets = load_data(data, shape, augment=False, options=data_opts)
        if shape and tuple(shape) != tuple(sets.input_shape):  # a fixed-shape graph: known before running
            raise data_mismatch(None, src, shape, data, sets.input_shape)
        with progress.step(f"scoring {src} on {data} ({o.split}) in onnxruntime"):
            metrics = evaluate_onnx(src, getattr(sets, o.split), o.batch_size, num_classes=sets.num_classes)
    else:
        ckpt = load_checked(src, o.arch, o.arch_kwargs, o.trust_pickle, progress)
        run = ((ckpt.extra or {}).get("train") or {}).get("config") or {}
        if data_opts.val_fraction is None and run.get("val_fraction") is not None:
            # a run's checkpoint: score the split the run held out, not the default one
            recorded = run["val_fraction"]
            data_opts = dataclasses.replace(data_opts, val_fraction=recorded).validate()
        sets = load_data(data, ckpt.input_shape, augment=False, options=data_opts)
        channels_in = first_layer_channels(ckpt.model)
        with progress.step(f"scoring {src} on {data} ({o.split})"):
            try:
                metrics = evaluate_torch(ckpt.model, getattr(sets, o.split), o.batch_size, num_classes=sets.num_classes)
            except (RuntimeError, ValueError) as e:
                if isinstance(e, UsageError):
                    raise
                raise data_mismatch(e, src, ckpt.input_shape, data, sets.input_shape, channels_in) from None
    result = EvaluateResult(src, data, o.split, metrics, o.min_accuracy, sets.num_classes, recorded)
    if not result.passed:
        scored = {k: v for k, v in metrics.items() if k != "error"}  # "error" is the message under --json
        err = CheckFailed(
            f"{src}: accuracy {100 * result.accuracy:.2f}% on {data} {o.split} is below min_accuracy "
            f"{o.min_accuracy:g} (chance: {100 / sets.num_classes:.2f}%)",
            option="min_accuracy",
            details={"source": src, "data": data, "split": o.split, **scored, "min_accuracy": o.min_accuracy},
        )
        err.result = result
        raise err
    return result

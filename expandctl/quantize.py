"""INT8 post-training quantization of an exported model, with its accuracy cost measured and gated.

The steps the ``quantize`` command calls, each usable on its own:

1. :func:`check_float_onnx` refuses a file that is already quantized (its QDQ or integer operators
   would be quantized twice);
2. :func:`calibration_indices` draws the calibration images: ``n`` training images stratified by
   class with a seeded generator (:func:`expandctl.data.stratified_subset`), so a given data
   spec, ``n`` and seed always calibrate on the same images;
3. :func:`quantize_onnx` runs onnxruntime's static quantization: QDQ format, int8 weights
   (per-channel and symmetric by default), uint8 activations whose ranges come from the calibration
   images (min-max, entropy or percentile);
4. :func:`quantize` does it all: scores the float and the INT8 file on the validation split, times
   both in the same process (:func:`measure_latency`), writes the INT8 file with the calibration
   and both accuracies in its metadata, and refuses (:class:`CheckFailed`, nothing written) when
   the accuracy drop exceeds ``max_drop`` points.

Nothing here prints; onnxruntime's quantizer prints and logs, and is silenced.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch.utils.data import Dataset

from ._version import __version__
from .checkpoint import atomic_write
from .data.pipeline import stratified_subset
from .errors import CheckFailed, UsageError
from .evaluate import evaluate_onnx, read_batch
from .shapes import backend_message

__all__ = [
    "METHODS",
    "QuantizeResult",
    "calibration_indices",
    "check_float_onnx",
    "dataset_labels",
    "measure_latency",
    "quantize",
    "quantize_onnx",
    "quantized_ops",
]

#: ``--calibration`` values -> onnxruntime's ``CalibrationMethod`` names.
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: Operators that only a quantized graph holds (ONNX's QDQ pair, its integer ops, onnxruntime's QLinear*).
_QUANTIZED_PREFIXES = ("QLinear", "DynamicQuantize")
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm"}
#: Images per calibration batch fed to onnxruntime's calibrator.
CALIBRATION_BATCH = 64


def quantized_ops(path: str | Path) -> dict[str, int]:
    """``{op_type: count}`` of the quantization operators in an ONNX file (empty for a float model)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's errors are untyped
        raise UsageError(f"{str(path)!r} is not a readable ONNX file ({backend_message(e, 200)})") from None
    ops: dict[str, int] = {}
    graphs = [proto.graph, *(f for f in proto.functions)]
    for g in graphs:
        for node in g.node:
            if node.op_type in _QUANTIZED_OPS or node.op_type.startswith(_QUANTIZED_PREFIXES):
                ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def check_float_onnx(path: str | Path) -> None:
    """:class:`UsageError` if ``path`` is already quantized: quantizing it again would stack a second
    set of rounding steps on the first and report a meaningless 'float' accuracy."""
    ops = quantized_ops(path)
    if ops:
        found = ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))
        raise UsageError(f"{str(path)!r} is already quantized ({found}); quantize the float model it was made from")


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The integer labels of a split: held in memory by expandctl's sets, else read image by image."""
    for attr in ("labels", "targets"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return torch.as_tensor(labels).long()
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def calibration_indices(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` sorted indices into a split with ``labels``, stratified by class (each class in
    proportion) and drawn with ``seed``; the whole split when ``n`` is not smaller than it.
    An empty split or ``n < 1`` is a :class:`UsageError`: onnxruntime would otherwise compute
    ranges from nothing and write a model that outputs garbage."""
    if n < 1:
        raise UsageError(f"the calibration set is empty (--calib-size {n}); give at least 1 image (e.g. 512)")
    if len(labels) == 0:
        raise UsageError("the calibration set is empty: the data set's training split has no images")
    if n >= len(labels):
        return torch.arange(len(labels))
    return stratified_subset(labels, n, seed)


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a split's images at ``indices``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], input_name: str, batch: int = CALIBRATION_BATCH):
        self.dataset, self.indices, self.name, self.batch = dataset, [int(i) for i in indices], input_name, batch
        self.rewind()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.indices), self.batch):
            x, _ = read_batch(self.dataset, self.indices[start : start + self.batch])
            yield {self.name: x.float().numpy()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


def _calibration_batch(n: int, method: str, static: int | None = None) -> int:
    """onnxruntime's histogram calibrators (entropy, percentile) stack every batch's activations into
    one array and fail on a last, smaller batch: for them, the largest batch that divides ``n``.
    A file exported with a static batch size (``static``) takes only that."""
    if static is not None:
        return static
    if method == "minmax":
        return CALIBRATION_BATCH
    return max(b for b in range(1, min(n, CALIBRATION_BATCH) + 1) if n % b == 0)


def static_batch(path: str | Path) -> int | None:
    """The fixed batch size of an ONNX file's input (``export --static-batch``: 1), ``None`` if dynamic."""
    dim = _session(path).get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """onnxruntime's quantizer prints progress and logs advice on the root logger."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
    finally:
        logging.disable(previous)


def _session(path: str | Path, threads: int | None = None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_onnx(
    float_path: str | Path,
    dest: str | Path,
    dataset: Dataset,
    indices: Sequence[int],
    method: str = "minmax",
    per_channel: bool = True,
) -> list[str]:
    """Write the static INT8 quantization of ``float_path`` to ``dest`` (QDQ; int8 symmetric
    weights, per output channel unless ``per_channel=False``; uint8 activations calibrated on
    ``dataset[indices]`` with ``method``). Returns notes for the report. The float graph is first
    prepared with onnxruntime's ``quant_pre_process`` (shape inference, constant folding), as its
    documentation advises; a graph it cannot prepare is quantized as it is, and a note says so."""
    if method not in METHODS:
        raise UsageError(f"--calibration must be one of {', '.join(METHODS)}, not {method!r}")
    notes: list[str] = []
    name = _session(float_path).get_inputs()[0].name
    fixed = static_batch(float_path)
    with tempfile.TemporaryDirectory(prefix="expandctl-quantize-") as tmp:
        source = Path(tmp) / "prepared.onnx"
        try:
            with _silenced():
                quant_pre_process(str(float_path), str(source))
        except Exception as e:  # the pre-processor raises whatever its passes raise
            notes.append(f"onnxruntime's quant_pre_process failed ({backend_message(e, 160)}); quantized as exported")
            source = Path(float_path)
        reader = _Reader(dataset, indices, name, _calibration_batch(len(indices), method, fixed))
        cache = None
        if method == "entropy":
            cache = Path(tmp) / "ranges.json"
            with _silenced():
                _entropy_ranges(source, reader, cache, Path(tmp))
            reader = None
        with _silenced():
            quantize_static(
                str(source),
                str(dest),
                reader,
                calibration_cache_path=cache,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
    return notes


#: Histogram bins of the entropy calibration: TensorRT's 2048, searched for the best 128-bin clipping.
#: Through ``quantize_static`` onnxruntime uses 128 bins for 128 quantized bins, leaving no threshold
#: to search but the whole range: its "entropy" gave exactly min-max's scales on the SmallNets here.
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128


def _entropy_ranges(source: Path, reader, cache: Path, tmp: Path) -> None:
    """KL-divergence activation ranges (onnxruntime's calibrator, 2048 bins) saved as the tensor-range
    cache that ``quantize_static`` then reads instead of calibrating again."""
    calibrator = create_calibrator(
        source,
        sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),  # the op types quantize_static calibrates
        augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS, "symmetric": False},
    )
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


def measure_latency(
    float_path: str | Path, int8_path: str | Path, x: np.ndarray, rounds: int = 30, warmup: int = 3
) -> dict:
    """Median seconds per run of both files on the same input ``x`` in onnxruntime's CPU provider
    (``torch.get_num_threads()`` threads), interleaved round by round with the order alternating,
    so that a machine busy with something else slows both alike. ``ratio`` is INT8 / float of the
    medians; ``ratio_min``, of the fastest rounds (on a shared machine the least disturbed ones)."""
    sessions = {"float": _session(float_path), "int8": _session(int8_path)}
    feeds = {k: {s.get_inputs()[0].name: x.astype(np.float32)} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(warmup + rounds):
        for key in ("float", "int8") if r % 2 == 0 else ("int8", "float"):
            t0 = time.perf_counter()
            sessions[key].run(None, feeds[key])
            if r >= warmup:
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {
        "batch": int(x.shape[0]),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "float_ms": 1000 * med["float"],
        "int8_ms": 1000 * med["int8"],
        "ratio": med["int8"] / med["float"],
        "float_ms_min": 1000 * best["float"],
        "int8_ms_min": 1000 * best["int8"],
        "ratio_min": best["int8"] / best["float"],
    }


@dataclass
class QuantizeResult:
    """What :func:`quantize` measured. Accuracies are fractions; ``drop_points`` is the float minus
    the INT8 accuracy in percentage points (positive: INT8 is worse)."""

    float_eval: dict
    int8_eval: dict
    drop_points: float
    latency: dict
    calibration: dict
    quantization: dict
    float_bytes: int
    int8_bytes: int
    max_drop: float | None = None
    output: str | None = None
    notes: list[str] = field(default_factory=list)
    #: The INT8 accuracy (percent) below which the model is refused: a gate a model at chance fails.
    min_accuracy: float | None = None

    @property
    def accurate_enough(self) -> bool:
        return self.min_accuracy is None or 100.0 * self.int8_eval["accuracy"] >= self.min_accuracy

    @property
    def passed(self) -> bool:
        return (self.max_drop is None or self.drop_points <= self.max_drop) and self.accurate_enough

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def check_min_accuracy(value: float | None) -> None:
    if value is not None and not 0 <= value <= 100:
        raise UsageError(f"--min-accuracy is a percentage between 0 and 100, not {value:g}")


def _evaluate(path, dataset, batch_size, num_classes) -> dict:
    result = evaluate_onnx(path, dataset, batch_size, num_classes=num_classes)
    return {k: result[k] for k in ("accuracy", "loss", "correct", "samples")}


def quantize(
    float_path: str | Path,
    out: str | Path,
    sets,
    data: str,
    *,
    calib_size: int = 512,
    method: str = "minmax",
    seed: int = 0,
    per_channel: bool = True,
    max_drop: float | None = None,
    batch_size: int = 256,
    latency_batch: int = 32,
    latency_rounds: int = 30,
    min_accuracy: float | None = None,
) -> QuantizeResult:
    """Quantize ``float_path`` (a float ONNX classifier) calibrated on ``sets.train`` (a
    :class:`expandctl.data.DataSplits` loaded without augmentation; ``data`` is its spec, for
    the record), score both files on ``sets.val`` and write the INT8 file to ``out`` atomically.

    With ``max_drop`` (percentage points), a larger accuracy drop raises :class:`CheckFailed`
    (``.details`` holds the whole result) and nothing is written; so does an INT8 accuracy below
    ``min_accuracy`` (percent: a model that never learned passes any drop gate). An already-quantized input, an
    empty calibration set or a model that does not fit the data raise :class:`UsageError` first.
    """
    out = Path(out)
    check_float_onnx(float_path)
    if max_drop is not None and max_drop < 0:
        raise UsageError(f"--max-drop must be a number of percentage points >= 0, not {max_drop:g}")
    check_min_accuracy(min_accuracy)
    indices = calibration_indices(dataset_labels(sets.train), calib_size, seed)
    float_eval = _evaluate(float_path, sets.val, batch_size, sets.num_classes)  # also the fit check
    with tempfile.TemporaryDirectory(prefix="expandctl-int8-") as tmp:
        int8 = Path(tmp) / "model.int8.onnx"
        notes = quantize_onnx(float_path, int8, sets.train, indices, method, per_channel)
        int8_eval = _evaluate(int8, sets.val, batch_size, sets.num_classes)
        fixed = static_batch(float_path)  # a static-batch file runs only at its own batch size
        x, _ = read_batch(sets.val, range(min(fixed or latency_batch, len(sets.val))))
        latency = measure_latency(float_path, int8, x.float().numpy(), latency_rounds)
        counts = torch.bincount(dataset_labels(sets.train)[indices], minlength=sets.num_classes)
        result = QuantizeResult(
            float_eval=float_eval,
            int8_eval=int8_eval,
            drop_points=100.0 * (float_eval["correct"] - int8_eval["correct"]) / float_eval["samples"],
            latency=latency,
            calibration={
                "data": data,
                "split": "train",
                "size": len(indices),
                "requested": calib_size,
                "method": method,
                "seed": seed,
                "per_class": counts.tolist(),
            },
            quantization={
                "format": "QDQ",
                "weights": f"int8, symmetric, {'per channel' if per_channel else 'per tensor'}",
                "activations": "uint8, asymmetric, per tensor",
                "onnxruntime": ort.__version__,
            },
            float_bytes=Path(float_path).stat().st_size,
            int8_bytes=0,  # with the metadata, below
            max_drop=max_drop,
            notes=notes,
            min_accuracy=min_accuracy,
        )
        _set_metadata(int8, result, data)
        result.int8_bytes = int8.stat().st_size
        refused = None
        if not result.accurate_enough:
            refused = (
                f"INT8 accuracy {100 * int8_eval['accuracy']:.2f}% is below --min-accuracy {min_accuracy:g} "
                f"(float model: {100 * float_eval['accuracy']:.2f}%, chance: {100 / sets.num_classes:.2f}%)"
            )
        elif not result.passed:
            refused = (
                f"INT8 accuracy {100 * int8_eval['accuracy']:.2f}% is {result.drop_points:.2f} points below the "
                f"float model's {100 * float_eval['accuracy']:.2f}%, more than --max-drop {max_drop:g}"
            )
        if refused is not None:
            raise CheckFailed(f"{refused}; nothing was written", details=result.to_dict())
        with atomic_write(out) as temp:
            shutil.copyfile(int8, temp)
    result.output = str(out)
    return result


def _set_metadata(path: Path, result: QuantizeResult, data: str) -> None:
    """The float file's metadata (provenance) is kept by the quantizer; add what this step did."""
    proto = onnx.load(str(path))
    props = {p.key: p for p in proto.metadata_props}
    ours = {
        "expandctl.calibration": json.dumps({k: result.calibration[k] for k in ("data", "size", "method", "seed")}),
        "expandctl.quantization": json.dumps(result.quantization),
        "expandctl.float_accuracy": f"{result.float_eval['accuracy']:.6f}",
        "expandctl.int8_accuracy": f"{result.int8_eval['accuracy']:.6f}",
        "expandctl.accuracy_data": f"{data} val ({result.float_eval['samples']} images)",
        "expandctl.version": __version__,
    }
    for key, value in ours.items():
        prop = props.get(key) or proto.metadata_props.add(key=key)
        prop.value = value
    onnx.save(proto, str(path))

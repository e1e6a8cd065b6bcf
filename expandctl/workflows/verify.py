"""``expandctl verify`` as a library function: an expanded model against its contraction, or two files (two
checkpoints, or a checkpoint and an ONNX file) against each other. Never prints.

>>> from expandctl.workflows import VerifyOptions, verify_files
>>> verify_files("run/last.pt").passed                  # the chains vs their contraction, float64 and float32
>>> verify_files("run/last.pt", "compact.onnx", VerifyOptions(samples=8)).reports
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import checkpoint as ckpt_io
from ..errors import UsageError
from ..export import check_onnx_sizes
from ..progress import Progress, Silent
from ..rewrite import contract as contract_model
from ..rewrite import expanded_layers
from ..shapes import backend_message, fmt_shape, onnx_dynamic_size, run_once, running_model, second_size
from ..verify import check_contraction, check_failed, compare_models, failed_reports
from .checks import input_shape_for, load_checked, onnx_file_shape

__all__ = ["DTYPES", "VerifyOptions", "VerifyResult", "verify_files"]

#: The ``dtype`` names :class:`VerifyOptions` takes.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class VerifyOptions:
    """How :func:`verify_files` compares (the flags of ``expandctl verify``). ``dtype``: float32 or float64
    (default: both for one file, float64 for two checkpoints, float32 for ONNX)."""

    atol: float | None = None
    rtol: float | None = None
    samples: int = 4
    batch: int = 2
    dtype: str | None = None
    seed: int = 0
    input_shape: tuple[int, ...] | None = None
    arch: str | None = None
    arch_kwargs: dict | None = None
    trust_pickle: bool = False

    def torch_dtype(self) -> torch.dtype | None:
        if self.dtype is None:
            return None
        if self.dtype.lower() not in DTYPES:
            raise UsageError(f"dtype must be float32 or float64, got {self.dtype!r}", option="dtype")
        return DTYPES[self.dtype.lower()]


@dataclass
class VerifyResult:
    """What :func:`verify_files` compared; ``to_dict()`` is ``expandctl verify --json``'s object."""

    files: list[str]
    input_shape: tuple[int, ...]
    reports: list = field(default_factory=list)
    title: str = "checks"

    @property
    def passed(self) -> bool:
        return not failed_reports(self.reports)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "files": self.files,
            "input_shape": list(self.input_shape),
            "checks": [r.to_dict() for r in self.reports],
        }


def verify_files(
    a: str, b: str | None = None, options: VerifyOptions | None = None, progress: Progress | None = None
) -> VerifyResult:
    """Check that ``a``'s expanded chains equal their contraction (``b`` None), or that ``a`` and ``b`` (a
    checkpoint or an ONNX file) compute the same outputs on random inputs. A difference beyond the
    tolerances raises :class:`CheckFailed` carrying the reports (``.reports``, ``.reports_title``)."""
    o, progress = options or VerifyOptions(), progress or Silent()
    want = o.torch_dtype()
    a, b = str(a), None if b is None else str(b)
    fa = ckpt_io.sniff_format(a)
    fb = ckpt_io.sniff_format(b) if b is not None else None
    if fa == "onnx" and fb is not None and fb != "onnx":
        a, b, fa, fb = b, a, fb, fa  # the torch model is always the reference
    if fa == "onnx":
        raise UsageError(
            "verify needs a PyTorch checkpoint as reference; to check an ONNX file give it with its checkpoint "
            "(expandctl verify model.pt model.onnx)"
        )
    if fb == "onnx" and want == torch.float64:
        raise UsageError("onnxruntime runs the exported model in float32; drop dtype float64", option="dtype")
    load = {"arch": o.arch, "arch_kwargs": o.arch_kwargs, "trust_pickle": o.trust_pickle, "progress": progress}
    ckpt_a = load_checked(a, **load)
    ckpt_b = None
    if fb == "onnx" and o.input_shape is None:
        # The ONNX file says what it was exported with (graph input, else expandctl's metadata);
        # the checkpoint may record another shape its model also takes (contract --input-shape).
        shape = onnx_file_shape(b) or input_shape_for(ckpt_a)
    elif b is not None and o.input_shape is None and ckpt_a.input_shape is None:
        # A foreign pickle records no input shape; the second file (a .pt2 program) may.
        ckpt_b = load_checked(b, **load)
        shape = input_shape_for(ckpt_b)
    else:
        shape = input_shape_for(ckpt_a, o.input_shape)
    if b is None:
        reports, title = _against_contraction(a, ckpt_a, shape, want, o, progress)
    elif fb == "onnx":
        reports, title = _against_onnx(a, b, ckpt_a, shape, o, progress)
    else:
        ckpt_b = ckpt_b or load_checked(b, **load)
        reports, title = _against_checkpoint(a, b, ckpt_a, ckpt_b, shape, want, o, progress)
    result = VerifyResult([a, b] if b else [a], shape, reports, title)
    if not result.passed:
        raise check_failed(
            "outputs differ beyond the tolerances: " + "; ".join(r.summary() for r in failed_reports(reports)),
            reports,
            title,
            files=result.files,
            input_shape=list(shape),
        )
    return result


def _checks(o: VerifyOptions) -> dict:
    return {"samples": o.samples, "batch": o.batch, "seed": o.seed, "atol": o.atol, "rtol": o.rtol}


def _against_contraction(a, ckpt, shape, want, o, progress) -> tuple[list, str]:
    if not list(expanded_layers(ckpt.model)):
        raise UsageError(
            f"{a} has no expanded layers, so there is nothing to contract and compare; give a second file "
            f"(expandctl verify {a} other.pt|other.onnx)"
        )
    compact = contract_model(ckpt.model)
    dtypes = (want,) if want else (torch.float64, torch.float32)
    with progress.step("comparing the expanded model with its contraction"), running_model(shape, ckpt.input_shape):
        reports = check_contraction(ckpt.model, compact, shape, dtypes=dtypes, **_checks(o))
    return reports, f"{a}: expanded (explicit) vs contracted"


def _against_onnx(a, b, ckpt, shape, o, progress) -> tuple[list, str]:
    recorded = ckpt.input_shape
    if o.input_shape is None and recorded and tuple(recorded) != tuple(shape):
        # The ONNX file fixes another shape than the checkpoint records: if the checkpoint's
        # model cannot even take it, the two files are two different models.
        try:
            run_once(ckpt.model, shape, a)
        except UsageError as e:
            raise UsageError(
                f"{a} and {b} are two different models (input shapes differ: {b} takes "
                f"{fmt_shape(shape)}, {a} records {fmt_shape(recorded)} and fails on "
                f"{fmt_shape(shape)}: {backend_message(e.__cause__ or e)}); verify a checkpoint "
                "against the ONNX file contracted or exported from it"
            ) from None
    sizes = [shape, second_size(shape)] if onnx_dynamic_size(b) else [shape]  # a dynamic-size file: two
    with progress.step(f"comparing {a} with {b} in onnxruntime"), running_model(shape, ckpt.input_shape, a):
        report = check_onnx_sizes(ckpt.model, b, sizes, (o.batch,), o.atol, o.rtol, samples=o.samples, seed=o.seed)
    return [report], f"{a} vs {b} (onnxruntime)"


def _against_checkpoint(a, b, ckpt_a, ckpt_b, shape, want, o, progress) -> tuple[list, str]:
    sa, sb = ckpt_a.input_shape, ckpt_b.input_shape
    if o.input_shape is None and sa and sb and tuple(sa) != tuple(sb):
        raise UsageError(
            f"{a} takes inputs of shape {fmt_shape(sa)} and {b} takes {fmt_shape(sb)} (as their files "
            "record), so they are not two forms of one model; pass input_shape to compare them anyway",
            option="input_shape",
        )
    for path, model in ((a, ckpt_a.model), (b, ckpt_b.model)):
        run_once(model, shape, path)  # a model that cannot take the shape is exit 2, not a NaN check
    with progress.step(f"comparing {a} with {b}"), running_model(shape):
        report = compare_models(ckpt_a.model, ckpt_b.model, shape, dtype=want or torch.float64, **_checks(o))
    return [report], f"{a} vs {b}"

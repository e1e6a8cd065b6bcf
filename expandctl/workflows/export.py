"""``expandctl export`` as a library function: a checkpoint to one ONNX file, checked with onnxruntime (an
expanded checkpoint is contracted and checked first). Never prints; nothing is written when a check fails.

>>> from expandctl.workflows import ExportOptions, export_checkpoint
>>> r = export_checkpoint("compact.pt", "compact.onnx", ExportOptions(dynamic_size=True))
>>> r.reports  # (expanded vs contracted, then) PyTorch vs onnxruntime
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt_io
from ..progress import Progress, Silent
from ..rewrite import expanded_layers
from ..shapes import running_model
from .checks import contract_checked, export_checked, input_shape_for, load_checked, onnx_metadata

__all__ = ["ExportOptions", "ExportResult", "export_checkpoint"]


@dataclass(frozen=True)
class ExportOptions:
    """How :func:`export_checkpoint` exports (the flags of ``expandctl export``)."""

    opset: int | None = None
    dynamic_batch: bool = True
    dynamic_size: bool = False
    atol: float | None = None
    rtol: float | None = None
    input_shape: tuple[int, ...] | None = None
    arch: str | None = None
    arch_kwargs: dict | None = None
    trust_pickle: bool = False


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote; ``to_dict()`` is ``expandctl export --json``'s object."""

    output: Path
    source: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    dynamic_size: bool
    opset: int | None
    reports: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "source": self.source,
            "input_shape": list(self.input_shape),
            "dynamic_batch": self.dynamic_batch,
            "dynamic_size": self.dynamic_size,
            "opset": self.opset,
            "passed": True,
            "checks": [r.to_dict() for r in self.reports],
        }


def export_checkpoint(
    src: str | Path,
    output: str | Path,
    options: ExportOptions | None = None,
    *,
    command: str | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``src`` (contracted first if it has expanded layers, checked against its chains) to the ONNX file
    ``output``, checked against PyTorch with onnxruntime, with provenance (``command``: the command line that
    asked for it) in its metadata. A failed check raises :class:`CheckFailed` carrying every report."""
    o, progress = options or ExportOptions(), progress or Silent()
    out = ckpt_io.check_output_path(output, [src], (".onnx",))
    ckpt = load_checked(src, o.arch, o.arch_kwargs, o.trust_pickle, progress)
    shape = input_shape_for(ckpt, o.input_shape)
    reports: list = []
    model = ckpt.model
    if list(expanded_layers(model)):
        model, reports = contract_checked(ckpt, shape, o.atol, o.rtol, progress)
    with progress.step(f"exporting {out} and checking it with onnxruntime"), running_model(shape, ckpt.input_shape):
        export_checked(
            model,
            out,
            shape,
            reports,
            opset=o.opset,
            dynamic_batch=o.dynamic_batch,
            dynamic_size=o.dynamic_size,
            metadata=onnx_metadata(ckpt, shape, ckpt.folded_bn, command),
            atol=o.atol,
            rtol=o.rtol,
        )
    return ExportResult(out, str(src), shape, o.dynamic_batch, o.dynamic_size, o.opset, reports)

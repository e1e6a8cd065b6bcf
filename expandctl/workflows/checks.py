"""What the verbs share: progress reporting, loading a checked model, the input shape to run, failed-check
errors carrying their reports, provenance, the checked contraction and the checked ONNX export. Never prints."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn

from .. import checkpoint as ckpt_io
from ..errors import CheckFailed, UsageError
from ..export import export_onnx
from ..progress import Progress, Silent
from ..shapes import onnx_input_shape
from ..verify import check_failed, check_finite, contract_model_checked


def load_checked(
    path: str | Path,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust_pickle: bool = False,
    progress: Progress | None = None,
) -> ckpt_io.Checkpoint:
    """:func:`expandctl.checkpoint.load_checkpoint`, refusing a model with NaN or inf weights (named by path)."""
    with (progress or Silent()).step(f"loading {path}"):
        ckpt = ckpt_io.load_checkpoint(path, arch, arch_kwargs, trust_pickle)
    try:
        check_finite(ckpt.model)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    return ckpt


def input_shape_for(ckpt: ckpt_io.Checkpoint, input_shape=None, fallback=None) -> tuple[int, ...]:
    """The per-sample input shape to run ``ckpt`` on: ``input_shape``, else the recorded one, else ``fallback``."""
    shape = input_shape or ckpt.input_shape or fallback
    if not shape:
        raise UsageError(
            f"the input shape of {str(ckpt.path)!r} is not recorded and cannot be inferred; pass input_shape C,H,W",
            option="input_shape",
        )
    return tuple(shape)


def onnx_file_shape(path: str | Path) -> tuple[int, ...] | None:
    """The per-sample input shape an ONNX file was exported with: its graph input's fixed dimensions,
    else the ``expandctl.input_shape`` metadata (a file exported with dynamic height and width)."""
    shape = onnx_input_shape(path)
    if shape:
        return shape
    meta = ckpt_io.describe_onnx(path)["metadata"]
    with contextlib.suppress(ValueError, TypeError):
        recorded = json.loads(meta.get("expandctl.input_shape", "null"))
        if isinstance(recorded, list) and recorded and all(isinstance(d, int) and d > 0 for d in recorded):
            return tuple(recorded)
    return None


def save_derived(
    model: nn.Module,
    out: Path,
    ckpt: ckpt_io.Checkpoint,
    shape,
    plan,
    command: str | None,
    folded_bn: Sequence,
    progress: Progress,
) -> None:
    """Save ``model``, made from ``ckpt`` (its architecture and parent hash), as an expandctl checkpoint."""
    with progress.step(f"writing {out}"):
        ckpt_io.save(
            model,
            out,
            arch=ckpt.arch,
            arch_kwargs=ckpt.arch_kwargs,
            input_shape=shape,
            plan=plan,
            parent_sha256=ckpt.sha256,
            command=command,
            folded_bn=folded_bn,
        )


def onnx_metadata(ckpt: ckpt_io.Checkpoint, shape, folded: Sequence, command: str | None = None) -> dict[str, str]:
    """Provenance carried into the ONNX file's metadata_props (see docs/cli.md)."""
    return {
        "expandctl.plan": json.dumps(ckpt.plan),
        "expandctl.source_sha256": ckpt.sha256 or "",
        "expandctl.source": ckpt.path.name if ckpt.path else "",
        "expandctl.arch": json.dumps({"spec": ckpt.arch, "kwargs": ckpt.arch_kwargs}),
        "expandctl.input_shape": json.dumps(list(shape)),
        "expandctl.folded_bn": json.dumps(list(folded)),
        "expandctl.source_provenance": json.dumps(ckpt.provenance, default=str),
        "expandctl.command": command or "",
    }


def export_checked(model: nn.Module, out: Path, shape, reports: list, **export_kw) -> None:
    """Export ``model`` to ONNX and append onnxruntime's report to ``reports``; a mismatch raises the
    :class:`CheckFailed` of :func:`check_failed` carrying every report so far (nothing is written)."""
    try:
        _, report = export_onnx(model, out, shape, **export_kw)
    except CheckFailed as e:
        if getattr(e, "report", None) is not None:
            reports.append(e.report)
            raise check_failed(str(e) + "; nothing was written", reports) from None
        raise
    if report is not None:
        reports.append(report)


def contract_checked(
    ckpt: ckpt_io.Checkpoint, shape, atol=None, rtol=None, progress: Progress | None = None, **check_kw
) -> tuple[nn.Module, list]:
    """The compact model and the expanded-vs-contracted reports; raises CheckFailed on a mismatch."""
    return contract_model_checked(
        ckpt.model, shape, atol, rtol, progress, recorded=ckpt.input_shape, written="nothing was written",
        tolerances="--atol/--rtol", **check_kw,
    )  # fmt: skip

"""ONNX export, checked against the torch model before the file appears at its destination.

The file is written to a temporary path next to the destination, validated there (``onnx.checker``,
then onnxruntime against torch, at two batch sizes when the batch is dynamic) and only then renamed
into place: a file at ``path`` has passed its check (STYLE.md: never leave a file that looks
validated but is not).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from . import __version__
from .errors import CheckFailed, UnsupportedError, UsageError
from .verify import Report, _check_args, _leaves, compare_onnx

__all__ = ["export_onnx"]

#: Protobuf cannot hold more than 2 GB: larger models keep their weights in ``<name>.data``.
SINGLE_FILE_LIMIT = 2 * 1024**3

#: Example batch sizes: 2 for a dynamic batch (torch.export specialises sizes 0 and 1) and a second
#: size to prove the dimension really is dynamic; 1, the usual deployment shape, for a static one.
_DYNAMIC_BATCHES = (2, 3)
_STATIC_BATCH = 1


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    metadata: dict[str, str] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    check: bool = True,
) -> tuple[Path, Report | None]:
    """Export an eval-mode float32 CPU copy of ``model`` for inputs ``(batch, *input_shape)``.

    Uses the torch.export-based exporter; if it fails on this model, the TorchScript exporter, which
    the report's ``notes`` and the ``expandctl.exporter`` metadata entry record. The batch dimension
    is named ``batch`` and dynamic unless ``dynamic_batch=False`` (then fixed at 1). ``metadata`` is
    stored in the model's ``metadata_props``. With ``check``, onnxruntime must match the model
    (:func:`expandctl.verify.compare_onnx`, at batch 2 and 3 when dynamic) or :class:`CheckFailed`
    (carrying ``.report``) is raised and ``path`` is left as it was. Returns ``(path, report)``, the
    report ``None`` without ``check``. A missing output directory is a :class:`UsageError`; a model
    neither exporter handles, :class:`UnsupportedError`.
    """
    from .checkpoint import atomic_write  # the file-format module owns atomic writes

    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"output directory {str(path.parent)!r} does not exist")
    shape = _check_args(input_shape, 1, 1)
    batches = _DYNAMIC_BATCHES if dynamic_batch else (_STATIC_BATCH,)
    exported = copy.deepcopy(model).eval().float().cpu()
    x = torch.randn(batches[0], *shape, generator=torch.Generator().manual_seed(0))  # caller's RNG untouched
    with torch.no_grad():
        names = [name for name, _ in _leaves(exported(x))]
    size = sum(t.numel() * t.element_size() for t in exported.state_dict().values())
    temp: Path | None = None
    try:
        with atomic_write(path) as temp:
            temp = Path(temp)
            external = size > SINGLE_FILE_LIMIT
            exporter, notes = _export(exported, x, temp, names, opset, dynamic_batch, external)
            onnx.checker.check_model(str(temp))
            ours = {"expandctl.exporter": exporter, "expandctl.version": __version__}
            if notes:
                ours["expandctl.export_notes"] = "; ".join(notes)
            _set_metadata(temp, {**(metadata or {}), **ours})
            report = None
            if check:
                report = _check(model, temp, shape, batches, atol, rtol, notes)
                if not report.passed:
                    why = "".join(f" ({n})" for n in notes)
                    err = CheckFailed(f"the exported ONNX model differs from torch: {report.summary()}{why}")
                    err.report = report  # for callers that print the whole report
                    raise err
            if external:
                _move_external_data(temp, path)
    except BaseException:
        if temp is not None:  # whatever atomic_write left behind, and torch's weight side file
            for leftover in (temp, temp.with_name(f"{temp.name}.data")):
                leftover.unlink(missing_ok=True)
        raise
    return path, report


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints progress and warns about its own internals; the library never prints."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield


def _export(model, x, dest: Path, names, opset, dynamic: bool, external: bool) -> tuple[str, list[str]]:
    """Write ``dest``; returns the exporter used and notes for the report."""
    common = {"input_names": ["input"], "output_names": names, "opset_version": opset, "verbose": False}
    try:
        with _quiet():
            dims = ({0: torch.export.Dim("batch")},) if dynamic else None
            torch.onnx.export(
                model, (x,), str(dest), dynamo=True, external_data=external, dynamic_shapes=dims, **common
            )
        return "dynamo", []
    except Exception as e:  # the dynamo exporter raises many unrelated types
        dynamo_error = _first_line(e)
    axes = None
    if dynamic:
        with torch.no_grad():
            outputs = _leaves(model(x))
        axes = {n: {0: "batch"} for n, t in [("input", x), *outputs] if t.dim() and t.shape[0] == x.shape[0]}
    try:
        with _quiet():
            torch.onnx.export(model, (x,), str(dest), dynamo=False, dynamic_axes=axes, **common)
    except Exception as e:
        raise UnsupportedError(
            f"neither ONNX exporter handles this model (torch.export: {dynamo_error}; TorchScript: {_first_line(e)})"
        ) from e
    return "torchscript", [
        f"the torch.export-based exporter failed ({dynamo_error}); used the TorchScript exporter, "
        "which traces one path through Python control flow: only the onnxruntime check vouches for it"
    ]


def _first_line(e: BaseException) -> str:
    """The root cause's first line: torch.onnx wraps the real error in a page of generic advice."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        prop = props.get(str(key)) or proto.metadata_props.add(key=str(key))
        prop.value = str(value)
    onnx.save(proto, str(path))


def _check(model, path: Path, shape, batches, atol, rtol, notes) -> Report:
    """One report: the first batch size's outputs, then the others' suffixed ``[batch=3]``."""
    reports = [compare_onnx(model, path, shape, batch=b, atol=atol, rtol=rtol) for b in batches]
    report = reports[0]
    for other in reports[1:]:
        for o in other.outputs:
            o.name = f"{o.name}[batch={other.batch}]"
        report.outputs += other.outputs
    report.notes += notes
    if len(batches) > 1:
        report.notes.append(f"dynamic batch checked at sizes {', '.join(map(str, batches))}")
    return report


def _move_external_data(temp: Path, final: Path) -> None:
    """Point a >2 GB model's weights at ``<final>.data`` and move them there (before ``temp`` is renamed)."""
    proto = onnx.load(str(temp), load_external_data=False)
    locations = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
                entry.value = f"{final.name}.data"
    if not locations:
        return
    if len(locations) > 1:
        raise UnsupportedError(f"the exporter split the weights over {len(locations)} files; expected one")
    onnx.save(proto, str(temp))
    os.replace(temp.parent / locations.pop(), final.parent / f"{final.name}.data")

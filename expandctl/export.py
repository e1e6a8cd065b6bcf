"""ONNX export, checked against the torch model before the file appears at its destination.

The file is written to a temporary path next to the destination, validated there (``onnx.checker``,
then onnxruntime against torch, at two batch sizes when the batch is dynamic and at two image sizes
when the size is) and only then renamed into place: a file at ``path`` has passed its check
(STYLE.md: never leave a file that looks validated but is not).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from ._version import __version__
from .checkpoint import atomic_write
from .errors import CheckFailed, UnsupportedError, UsageError
from .shapes import backend_message, fmt_shape, second_size, spatial_names
from .verify import Report, check_args, compare_onnx, output_leaves

__all__ = ["export_onnx", "check_onnx_sizes", "probe_dynamic_size"]

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
    dynamic_size: bool = False,
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

    ``dynamic_size`` makes the spatial dimensions symbolic too (``length``; ``height``, ``width``;
    ``depth``, ``height``, ``width``): the model is first run at a second size
    (:func:`probe_dynamic_size`), so one with a fixed-size layer (a Linear after a flatten) is
    refused with :class:`UnsupportedError` before anything is exported, and the check then runs
    onnxruntime at both sizes.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"output directory {str(path.parent)!r} does not exist")
    shape = check_args(input_shape, 1, 1)
    batches = _DYNAMIC_BATCHES if dynamic_batch else (_STATIC_BATCH,)
    exported = copy.deepcopy(model).eval().float().cpu()
    sizes = [tuple(shape)]
    if dynamic_size:
        sizes.append(probe_dynamic_size(exported, shape))
    x = torch.randn(batches[0], *shape, generator=torch.Generator().manual_seed(0))  # caller's RNG untouched
    with torch.no_grad():
        names = [name for name, _ in output_leaves(exported(x))]
    size = sum(t.numel() * t.element_size() for t in exported.state_dict().values())
    temp: Path | None = None
    try:
        with atomic_write(path) as temp:
            temp = Path(temp)
            external = size > SINGLE_FILE_LIMIT
            exporter, notes = _export(exported, x, temp, names, opset, dynamic_batch, dynamic_size, external)
            onnx.checker.check_model(str(temp))
            ours = {"expandctl.exporter": exporter, "expandctl.version": __version__}
            if notes:
                ours["expandctl.export_notes"] = "; ".join(notes)
            if dynamic_size:
                ours["expandctl.dynamic_size"] = json.dumps(spatial_names(len(shape) - 1))
            # A dynamic-size graph no longer says what size it was exported at: the metadata does.
            recorded = {"expandctl.input_shape": json.dumps(list(shape))}
            _set_metadata(temp, {**recorded, **(metadata or {}), **ours})
            report = None
            if check:
                report = check_onnx_sizes(model, temp, sizes, batches, atol, rtol)
                report.notes += notes
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


def probe_dynamic_size(model: nn.Module, shape: Sequence[int]) -> tuple[int, ...]:
    """The second input size a dynamic-size export is checked at (:func:`expandctl.shapes.second_size`),
    after running ``model`` there once: a model that fails at another size has a fixed-size layer,
    and exporting it with symbolic sizes would only move the failure to deployment."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise UsageError(
            f"--dynamic-size needs inputs with spatial dimensions (C,L, C,H,W or C,D,H,W); this model takes "
            f"{fmt_shape(shape)}"
        )
    other = second_size(shape)
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    try:
        with torch.no_grad():
            model(torch.zeros(1, *other, dtype=dtype))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise UnsupportedError(
            f"--dynamic-size: the model runs at {fmt_shape(shape)} but not at {fmt_shape(other)} "
            f"({backend_message(e, 200)}): it has a fixed-size layer (e.g. a Linear after a flatten); "
            "export it without --dynamic-size"
        ) from None
    return other


def _export(
    model, x, dest: Path, names, opset, dynamic: bool, dynamic_size: bool, external: bool
) -> tuple[str, list[str]]:
    """Write ``dest``; returns the exporter used and notes for the report."""
    common = {"input_names": ["input"], "output_names": names, "opset_version": opset, "verbose": False}
    spatial = {i + 2: n for i, n in enumerate(spatial_names(x.dim() - 2))} if dynamic_size else {}
    try:
        with _quiet():
            axes = {**({0: "batch"} if dynamic else {}), **spatial}
            dims = ({i: torch.export.Dim(n) for i, n in axes.items()},) if axes else None
            torch.onnx.export(
                model, (x,), str(dest), dynamo=True, external_data=external, dynamic_shapes=dims, **common
            )
        return "dynamo", []
    except Exception as e:  # the dynamo exporter raises many unrelated types
        dynamo_error = _first_line(e)
    axes = None
    if dynamic:
        with torch.no_grad():
            outputs = output_leaves(model(x))
        axes = {n: {0: "batch"} for n, t in [("input", x), *outputs] if t.dim() and t.shape[0] == x.shape[0]}
    if spatial:  # the TorchScript exporter names the outputs' own symbolic sizes
        axes = axes or {}
        axes["input"] = {**axes.get("input", {}), **spatial}
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


def check_onnx_sizes(
    model: nn.Module,
    path: str | Path,
    sizes: Sequence[Sequence[int]],
    batches: Sequence[int] = (_STATIC_BATCH,),
    atol: float | None = None,
    rtol: float | None = None,
    **check,
) -> Report:
    """onnxruntime against ``model`` at every batch size (at the first input size) and every input
    size (at the first batch size), as one report: the first run's outputs, then the others' suffixed
    ``[batch=3]`` or ``[size=1x16x16]``. ``check``: :func:`expandctl.verify.compare_onnx`'s options."""
    first, *others = [tuple(s) for s in sizes]
    runs = [(first, b, f"[batch={b}]") for b in batches] + [(s, batches[0], f"[size={fmt_shape(s)}]") for s in others]
    reports = [compare_onnx(model, path, s, batch=b, atol=atol, rtol=rtol, **check) for s, b, _ in runs]
    report = reports[0]
    for other, (_, _, suffix) in zip(reports[1:], runs[1:], strict=True):
        for o in other.outputs:
            o.name = f"{o.name}{suffix}"
        report.outputs += other.outputs
    if len(batches) > 1:
        report.notes.append(f"dynamic batch checked at sizes {', '.join(map(str, batches))}")
    if others:
        report.notes.append(f"dynamic input size checked at {', '.join(fmt_shape(s) for s in (first, *others))}")
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

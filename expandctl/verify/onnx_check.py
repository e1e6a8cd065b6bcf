"""A torch model against onnxruntime running its exported ONNX file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UsageError
from ..evaluate import onnx_session
from ..shapes import backend_message, fmt_shape
from .core import Report, _Accumulator, _device, _inputs, _prepare, _tolerances, check_args, output_leaves

__all__ = ["compare_onnx"]


@torch.no_grad()
def compare_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    input_shape: Sequence[int],
    *,
    samples: int = 4,
    batch: int = 2,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> Report:
    """``model`` (float32, eval, explicit chains) against onnxruntime's CPU provider on ``onnx_path``.

    ONNX outputs are matched to the model's output leaves by name (``export_onnx`` names them
    ``output``, ``output.0``, ...), else by position. A runtime error on an input (a static batch
    dimension given another batch size, say) is a failed check, not an exception.
    """
    shape = check_args(input_shape, samples, batch)
    path = Path(onnx_path)
    if not path.is_file():
        raise UsageError(f"ONNX file {str(path)!r} does not exist")
    atol, rtol, notes = _tolerances(torch.float32, (), atol, rtol)
    session = onnx_session(path)
    if len(session.get_inputs()) != 1:
        raise UsageError(f"{path.name} has {len(session.get_inputs())} inputs; only one input is supported")
    input_name = session.get_inputs()[0].name
    _check_onnx_input(session.get_inputs()[0].shape, [batch, *shape], path)
    onnx_names = [o.name for o in session.get_outputs()]
    ref = _prepare(model, torch.float32)
    dev = _device(ref)
    acc = _Accumulator()
    for x in _inputs(shape, samples, batch, seed):
        x = x.float()
        expected = output_leaves(ref(x.to(dev)))
        try:
            got = session.run(None, {input_name: x.numpy()})
        except Exception as e:
            if "INVALID_ARGUMENT" in str(e) or "InvalidArgument" in type(e).__name__:  # the input it was fed
                raise UsageError(
                    f"{path.name} cannot take inputs of shape {fmt_shape([batch, *shape])}: {backend_message(e)}; "
                    "pass the shape it was exported with as --input-shape"
                ) from None
            reason = f"onnxruntime failed on input {(batch, *shape)}: {backend_message(e)}"
            acc.fail([n for n, _ in expected], reason)
            break
        names = [n for n, _ in expected]
        if set(names) != set(onnx_names) and len(names) == len(onnx_names):
            onnx_names = names  # same count, other names: match by position
        acc.add_all(expected, [(n, torch.from_numpy(v)) for n, v in zip(onnx_names, got, strict=False)])
    checks = acc.checks(atol, rtol)
    return Report("torch-vs-onnxruntime", "float32", atol, rtol, seed, samples, batch, shape, checks, notes)


def _check_onnx_input(declared: Sequence, given: Sequence[int], path: Path) -> None:
    """Compare the graph's declared input dimensions (ints are fixed, strings symbolic) with the
    check's input before running: a mismatch is a wrong shape (exit 2), not a numeric failure."""
    fixed = [(i, d, g) for i, (d, g) in enumerate(zip(declared, given, strict=False)) if isinstance(d, int) and d > 0]
    wrong = [(i, d, g) for i, d, g in fixed if d != g]
    if len(declared) != len(given) or wrong:
        want = "x".join(
            str(d) if (isinstance(d, int) and d > 0) or (isinstance(d, str) and d) else "?" for d in declared
        )
        hint = (
            "pass --batch 1 (the file has a static batch dimension)"
            if [i for i, _, _ in wrong] == [0]
            else "pass the shape it was exported with as --input-shape"
        )
        raise UsageError(
            f"{path.name} takes inputs of shape {want} but the check feeds {fmt_shape(given)} (batch first); {hint}"
        )

"""Input shapes: reading them from models and ONNX files, and saying clearly when data and model disagree.

A shape mismatch is a usage error (exit 2), never an internal error or a failed numeric check: the
message names the shape the model expects, the shape it was given, and the backend's whole message
(torch and onnxruntime put the useful part, ``index: 1 Got: 1 Expected: 3``, after the first line).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .errors import ExpandctlError, UsageError

__all__ = [
    "fmt_shape",
    "backend_message",
    "first_layer_channels",
    "onnx_input_shape",
    "onnx_dynamic_size",
    "second_size",
    "spatial_names",
    "run_once",
    "data_hint",
    "data_mismatch",
    "running_model",
]


def fmt_shape(shape: Sequence[int] | None) -> str:
    return "x".join(map(str, shape)) if shape else "unknown"


def backend_message(e: BaseException, limit: int = 600) -> str:
    """The exception's whole message on one line (an error line must stay greppable)."""
    text = re.sub(r"\s+", " ", str(e)).strip() or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_layer_channels(model: nn.Module) -> int | None:
    """The input channels of the first convolution, the one number every image model fixes."""
    for m in model.modules():
        base = getattr(m, "_template", m)  # an expanded layer stands for its original conv
        if isinstance(base, nn.modules.conv._ConvNd):
            return int(base.in_channels)
    return None


def _onnx_input_dims(path: str | Path) -> list | None:
    """The dimensions of an ONNX file's single graph input (initializers are not inputs), or ``None``
    when the file cannot be read or has several inputs."""
    import onnx  # lazy: onnx takes over a second to import; only ONNX files need it

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    inputs = [i for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    if len(inputs) != 1:
        return None
    return list(inputs[0].type.tensor_type.shape.dim)


def onnx_input_shape(path: str | Path) -> tuple[int, ...] | None:
    """The per-sample input shape of an ONNX file's single graph input (batch dimension dropped),
    or ``None`` when it has symbolic dimensions beyond the batch or several inputs."""
    dims = _onnx_input_dims(path)
    if dims is None:
        return None
    dims = dims[1:]
    if not dims or any(d.dim_param or d.dim_value < 1 for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)


def spatial_names(n: int) -> tuple[str, ...]:
    """Names of ``n`` symbolic spatial dimensions: length (1D), height and width (2D), depth too (3D)."""
    return {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}.get(
        n, tuple(f"size{i}" for i in range(n))
    )


def second_size(shape: Sequence[int]) -> tuple[int, ...]:
    """The other per-sample shape a dynamic-size model is checked at: channels kept, every spatial
    side doubled (a size a stride-2 network divides as it divides the first)."""
    return (int(shape[0]), *(2 * int(s) for s in shape[1:]))


def onnx_dynamic_size(path: str | Path) -> bool:
    """Whether an ONNX file's single graph input has symbolic dimensions beyond batch and channels
    (exported with ``--dynamic-size``)."""
    dims = _onnx_input_dims(path)
    if dims is None:
        return False
    dims = dims[2:]
    return bool(dims) and any(d.dim_param or d.dim_value < 1 for d in dims)


def data_hint(expected: Sequence[int] | None, given: Sequence[int] | None) -> str:
    """The adapter options that turn ``given`` images into ``expected`` ones."""
    if not expected or not given or len(expected) != 3 or len(given) != 3:
        return "adapt the data with --channels 1|3 and --image-size N"
    opts = []
    if expected[0] != given[0] and expected[0] in (1, 3):
        opts.append(f"--channels {expected[0]}")
    if tuple(expected[1:]) != tuple(given[1:]) and expected[1] == expected[2]:
        opts.append(f"--image-size {expected[1]}")
    return f"adapt the data with {' '.join(opts)}" if opts else "check the model and the data"


@torch.no_grad()
def run_once(model: nn.Module, shape: Sequence[int], what: str = "the model") -> torch.Tensor:
    """Run ``model`` (eval mode, then put back) on one zero batch of ``(1, *shape)``.

    Raises :class:`UsageError` with the shape and torch's whole message when the model cannot take
    that shape (``expand`` does this before writing, so a wrong ``--input-shape`` is caught there,
    not at ``train``)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        p = next(model.parameters(), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        device = p.device if p is not None else torch.device("cpu")
        return model(torch.zeros(1, *shape, dtype=dtype, device=device))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        channels = first_layer_channels(model)
        expects = f" (its first conv takes {channels} channels)" if channels is not None else ""
        raise UsageError(
            f"{what} cannot take inputs of shape {fmt_shape(shape)}{expects}: {backend_message(e)}; "
            "pass the model's --input-shape C,H,W"
        ) from e
    finally:
        for m, mode in modes:
            m.training = mode


def data_mismatch(
    e: BaseException | None,
    what: str,
    expected: Sequence[int] | None,
    spec: str,
    given: Sequence[int],
    channels: int | None = None,
) -> UsageError:
    """The error for a model that cannot take a data set's images: both shapes, the backend's whole
    message, and the adapter options that would fix it."""
    if expected:
        takes = f"takes {fmt_shape(expected)} inputs"
    elif channels is not None:
        takes = f"takes {channels}-channel inputs"
        expected = (channels, *given[1:]) if len(given) == 3 else None
    else:
        takes = "cannot take them"
    why = f" ({backend_message(e)})" if e is not None else ""
    return UsageError(
        f"{what} {takes} but --data {spec} gives {fmt_shape(given)} images{why}; {data_hint(expected, given)}"
    )


@contextlib.contextmanager
def running_model(
    shape: Sequence[int], recorded: Sequence[int] | None = None, what: str = "the model"
) -> Iterator[None]:
    """A model that fails on the check inputs almost always means a wrong input shape: say which
    shape it was given, the one its file records when that differs, and torch's whole message."""
    try:
        yield
    except ExpandctlError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        known = ""
        if recorded and tuple(recorded) != tuple(shape):
            known = f"; its file records {fmt_shape(recorded)}"
        raise UsageError(
            f"{what} failed on random inputs of shape (batch, {', '.join(map(str, shape))}){known} "
            f"({backend_message(e)}); check --input-shape"
        ) from e

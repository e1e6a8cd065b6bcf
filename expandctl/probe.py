"""Before a run: where it runs (``--device``) and whether the model fits the data. Never prints.

``train`` and ``analyze`` both call these, so a wrong ``--device`` or a model that cannot take the
data (shape, channels, class count) is the same one-line error in both, before any work is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .errors import UsageError
from .evaluate import read_batch
from .shapes import data_mismatch, first_layer_channels

__all__ = ["DEVICES", "device_kind", "resolve_device", "check_fits"]

DEVICES = ("auto", "cpu", "cuda")


def device_kind(requested: str) -> str:
    """``auto|cpu|cuda`` -> ``"cpu"`` or ``"cuda"`` (``auto``: CUDA when torch sees a GPU)."""
    name = requested.lower()
    if name not in DEVICES:
        raise UsageError(f"--device must be auto, cpu or cuda (got {name!r})")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_device(requested: str) -> torch.device:
    """:func:`device_kind` as a device (the first GPU for ``cuda``)."""
    return torch.device(device_kind(requested))


def check_fits(
    model: nn.Module,
    dataset: Dataset,
    spec: str,
    num_classes: int,
    given_shape: Sequence[int],
    device: torch.device,
    what: str = "the model",
    expected: Sequence[int] | None = None,
) -> None:
    """Two images of ``dataset`` through ``model`` (eval mode, then put back): a model that cannot take
    the images, does not return ``(batch, classes)`` logits or has another class count becomes a
    one-line :class:`UsageError` here instead of a stack trace mid-epoch. ``expected`` is the input
    shape the model's file records, if any (it makes the message name both shapes)."""
    x, _ = read_batch(dataset, range(min(2, len(dataset))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x.to(device))
    except RuntimeError as e:
        raise data_mismatch(e, what, expected, spec, given_shape, first_layer_channels(model)) from None
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise UsageError(
            f"{what} must return logits of shape (batch, classes) on {spec}; it returned "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
        )
    if logits.shape[1] != num_classes:
        raise UsageError(
            f"{what} has {logits.shape[1]} outputs but {spec} has {num_classes} classes; "
            f"build it with num_classes={num_classes}"
        )

"""Accuracy and loss of a model on a data split, in torch or in onnxruntime.

The pipeline's last question is "how good is the compact model I ship?": answering it through
onnxruntime on the exported file measures the artefact itself, not the training graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import UsageError
from .shapes import backend_message, data_hint

__all__ = ["read_batch", "iter_batches", "to_model", "score", "evaluate_torch", "evaluate_onnx", "onnx_session"]


def read_batch(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` for ``indices``: one read for in-memory sets (``dataset.batched``), else per item."""
    idx = [int(i) for i in indices]
    if getattr(dataset, "batched", False):
        x, y = dataset[idx]
    else:
        xs, ys = zip(*(dataset[i] for i in idx))
        x, y = torch.stack(xs), torch.as_tensor(ys)
    return x, torch.as_tensor(y).long()


def iter_batches(
    dataset: Dataset, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The first ``max_batches`` batches (all if ``None``) of ``dataset`` in its own order."""
    n = len(dataset)
    if n == 0:
        raise UsageError("the data split is empty")
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield read_batch(dataset, range(start, min(start + batch_size, n)))


def to_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on the model's device, images in the model's floating dtype (a float64 checkpoint
    is evaluated in float64; data sets deliver float32)."""
    p = next(model.parameters(), None)
    if p is None:
        return x, y
    dtype = p.dtype if (p.is_floating_point() and x.is_floating_point()) else x.dtype
    return x.to(p.device, dtype), y.to(p.device)


def score(
    predict: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int = 256,
    max_batches: int | None = None,
    loss_fn: Callable | None = None,
    num_classes: int | None = None,
) -> dict:
    """``{"accuracy", "error", "loss", "correct", "samples"}`` of ``predict`` (images -> logits).
    ``loss`` is the mean over images of ``loss_fn(logits, targets)`` (a batch mean, cross-entropy by
    default), summed in float64. ``num_classes``: the data set's, checked against the logits."""
    loss_fn = loss_fn or F.cross_entropy
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in iter_batches(dataset, batch_size, max_batches):
        logits = predict(x, y)
        if logits.dim() != 2:
            raise UsageError(f"the model gives outputs of shape {tuple(logits.shape)}, not (batch, classes) logits")
        if num_classes is not None and logits.shape[1] != num_classes:
            raise UsageError(f"the model has {logits.shape[1]} outputs but the data set has {num_classes} classes")
        y = y.to(logits.device)
        loss_sum += float(loss_fn(logits.double(), y)) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return {"accuracy": correct / n, "error": 1 - correct / n, "loss": loss_sum / n, "correct": correct, "samples": n}


@torch.no_grad()
def evaluate_torch(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    max_batches: int | None = None,
    loss_fn=None,
    num_classes: int | None = None,
) -> dict:
    """Eval-mode accuracy/loss of ``model``; every module's train/eval flag is put back after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        result = score(
            lambda x, y: model(to_model(model, x, y)[0]), dataset, batch_size, max_batches, loss_fn, num_classes
        )
    finally:
        for m, mode in modes:
            m.training = mode
    return {"runtime": "torch", **result}


def onnx_session(path: str | Path) -> ort.InferenceSession:
    """An onnxruntime CPU session on ``path`` with torch's thread count and its warnings silenced; a
    file onnxruntime cannot load is a :class:`UsageError`."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises untyped errors
        raise UsageError(f"onnxruntime cannot load {str(path)!r}: {backend_message(e)}") from None


def evaluate_onnx(path: str | Path, dataset: Dataset, batch_size: int = 256, num_classes: int | None = None) -> dict:
    """Accuracy/loss of an ONNX classifier under onnxruntime's CPU provider. A file exported
    with a static batch dimension is fed one image at a time."""
    session = onnx_session(path)
    inp = session.get_inputs()[0]
    dim0 = inp.shape[0]
    step = batch_size if not isinstance(dim0, int) else dim0

    def predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        try:
            outs = [
                session.run(None, {inp.name: chunk.numpy().astype(np.float32)})[0] for chunk in x.float().split(step)
            ]
        except Exception as e:  # onnxruntime's untyped errors; on images this is the input shape
            declared = "x".join(str(d) if isinstance(d, int) else "?" for d in inp.shape)
            raise UsageError(
                f"{Path(path).name} takes inputs of shape {declared} but the data gives "
                f"{'x'.join(map(str, x.shape))} (batch first) ({backend_message(e)}); "
                f"{data_hint(tuple(d for d in inp.shape[1:] if isinstance(d, int)) or None, tuple(x.shape[1:]))}"
            ) from None
        return torch.from_numpy(np.concatenate(outs))

    per_batch = max(step, 1) * math.ceil(batch_size / max(step, 1))
    return {"runtime": "onnxruntime", **score(predict, dataset, per_batch, num_classes=num_classes)}

"""Accuracy and loss of a model on a data split, in torch or in onnxruntime.

The pipeline's last question is "how good is the compact model I ship?": answering it through
onnxruntime on the exported file measures the artefact itself, not the training graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import UsageError
from .rewrite import set_forward

__all__ = ["evaluate_torch", "evaluate_onnx", "evaluate"]


def _batches(dataset: Dataset, batch_size: int):
    """``(x, y)`` batches in order; reads whole batches at once from in-memory datasets."""
    n = len(dataset)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        if getattr(dataset, "batched", False):
            yield dataset[idx]
        else:
            xs, ys = zip(*(dataset[i] for i in idx))
            yield torch.stack(xs), torch.as_tensor(ys)


def _score(predict: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int) -> dict:
    if len(dataset) == 0:
        raise UsageError("the data split is empty")
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in _batches(dataset, batch_size):
        logits = predict(x.float())
        if logits.dim() != 2:
            raise UsageError(f"the model gives outputs of shape {tuple(logits.shape)}, not (batch, classes) logits")
        loss_sum += F.cross_entropy(logits.double(), y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return {"accuracy": correct / n, "loss": loss_sum / n, "correct": correct, "samples": n}


@torch.no_grad()
def evaluate_torch(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> dict:
    """Eval-mode accuracy/loss of ``model`` (expanded layers run fused; same function)."""
    was_training = model.training
    model.eval()
    try:
        return {"runtime": "torch", **_score(model, dataset, batch_size)}
    finally:
        model.train(was_training)


def evaluate_onnx(path: str | Path, dataset: Dataset, batch_size: int = 256) -> dict:
    """Accuracy/loss of an ONNX classifier under onnxruntime's CPU provider. A file exported
    with a static batch dimension is fed one image at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises untyped errors
        raise UsageError(f"onnxruntime cannot load {str(path)!r}: {str(e).splitlines()[0]}") from None
    inp = session.get_inputs()[0]
    dim0 = inp.shape[0]
    step = batch_size if not isinstance(dim0, int) else dim0

    def predict(x: torch.Tensor) -> torch.Tensor:
        outs = [session.run(None, {inp.name: chunk.numpy().astype(np.float32)})[0] for chunk in x.split(step)]
        return torch.from_numpy(np.concatenate(outs))

    return {"runtime": "onnxruntime", **_score(predict, dataset, max(step, 1) * math.ceil(batch_size / max(step, 1)))}


def evaluate(model_or_path: nn.Module | str | Path, dataset: Dataset, batch_size: int = 256) -> dict:
    if isinstance(model_or_path, nn.Module):
        return evaluate_torch(set_forward(model_or_path, "fused"), dataset, batch_size)
    return evaluate_onnx(model_or_path, dataset, batch_size)

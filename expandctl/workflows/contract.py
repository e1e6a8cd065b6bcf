"""``expandctl contract`` as a library function: contract -> check against the chains -> fold BatchNorm
(if asked) -> check -> save or export to ONNX (checked with onnxruntime). Never prints; nothing is written
when a check fails.

>>> from expandctl import load_checkpoint
>>> from expandctl.workflows import contract_checkpoint
>>> c = contract_checkpoint(load_checkpoint("run/best.pt"), "compact.onnx")
>>> c.reports  # expanded vs contracted in float64 and float32, then PyTorch vs onnxruntime
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint as ckpt_io
from ..data import DataOptions, load_data
from ..errors import UnsupportedError, UsageError
from ..fold import fold_batchnorm
from ..progress import Progress, Silent
from ..rewrite import expanded_layers
from ..shapes import running_model
from ..sizes import count_params
from ..train.precise_bn import precise_batchnorm, shuffled_batches
from ..verify import check_failed, compare_models, failed_reports
from .checks import contract_checked, export_checked, input_shape_for, onnx_metadata, save_derived


@dataclass
class ContractResult:
    """What :func:`contract_checkpoint` wrote; ``to_dict()`` is ``expandctl contract --json``'s object."""

    source: str
    output: Path
    model: nn.Module
    contracted_layers: list[str]
    folded_bn: list
    input_shape: tuple[int, ...]
    dynamic_size: bool
    params_before: int
    params_after: int
    reports: list
    precise_bn: dict | None = None  # what --precise-bn recomputed: layers, batches, images, data

    @property
    def format(self) -> str:
        return "onnx" if self.output.suffix.lower() == ".onnx" else self.output.suffix.lstrip(".")

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "source": self.source,
            "format": self.format,
            "already_compact": not self.contracted_layers,
            "contracted_layers": self.contracted_layers,
            "folded_bn": self.folded_bn,
            "input_shape": list(self.input_shape),
            "dynamic_size": self.dynamic_size,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "passed": True,
            "checks": [r.to_dict() for r in self.reports],
            "precise_bn": self.precise_bn,
        }


def recompute_batchnorm(ckpt: ckpt_io.Checkpoint, data: str, batches: int) -> dict:
    """Precise BatchNorm statistics for a trained checkpoint (in place on ``ckpt.model``): every
    BatchNorm's running statistics recomputed over ``batches`` batches of ``data``'s training split
    (:mod:`expandctl.train.precise_bn`). The data adapters, batch size and seed are those the run
    recorded (``expandctl train`` checkpoints), else no adapter, batch 128, seed 0."""
    recorded = ((ckpt.extra or {}).get("train") or {}).get("config") or {}
    options = DataOptions(
        recorded.get("channels"), recorded.get("image_size"), recorded.get("augment"),
        recorded.get("train_subset"), False, recorded.get("val_fraction"),
    )  # fmt: skip
    splits = load_data(data, input_shape=ckpt.input_shape, options=options.validate())
    batch_size, seed = int(recorded.get("batch_size") or 128), int(recorded.get("seed") or 0)
    done = precise_batchnorm(ckpt.model, shuffled_batches(splits.train, batch_size, seed), batches)
    return {**done, "data": data, "batch_size": batch_size}


def contract_checkpoint(
    ckpt: ckpt_io.Checkpoint,
    output: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    fold_bn: bool = False,
    dynamic_size: bool = False,
    require_expanded: bool = False,
    source: str | None = None,
    command: str | None = None,
    progress: Progress | None = None,
    precise_bn: int = 0,
    data: str | None = None,
) -> ContractResult:
    """Contract every expanded layer of ``ckpt``, check the compact model against the chains, fold
    BatchNorm (``fold_bn``, checked too) and write ``output``: a checkpoint, or an ONNX file checked
    against PyTorch with onnxruntime. A model without expanded layers is written as it is (with a
    warning), unless ``require_expanded``. ``precise_bn`` > 0 first recomputes every BatchNorm's
    running statistics over that many batches of ``data`` (:func:`recompute_batchnorm`)."""
    progress = progress or Silent()
    out = Path(output)
    source = source if source is not None else str(ckpt.path)
    layers, shape = _check_request(ckpt, out, source, input_shape, dynamic_size, require_expanded, precise_bn, data)
    recomputed = None
    if precise_bn:
        with progress.step(f"recomputing BatchNorm statistics over {precise_bn} batches of {data}"):
            ckpt = dataclasses.replace(ckpt, model=copy.deepcopy(ckpt.model))  # the caller's keeps its statistics
            recomputed = recompute_batchnorm(ckpt, data, precise_bn)
        if not recomputed["layers"]:
            progress.warn(f"{source} has no BatchNorm: --precise-bn changed nothing")
    reports: list = []
    if layers:
        compact, reports = contract_checked(ckpt, shape, atol, rtol, progress)
    else:
        compact = copy.deepcopy(ckpt.model)
        progress.warn(f"{source} is already compact (no expanded layers): nothing to contract; writing it as it is")
    folded: list = []
    if fold_bn:
        compact, folded = _fold_checked(compact, shape, ckpt.input_shape, atol, rtol, reports, progress)
    if out.suffix.lower() == ".onnx":
        with progress.step(f"exporting {out} and checking it with onnxruntime"), running_model(shape, ckpt.input_shape):
            export_checked(
                compact,
                out,
                shape,
                reports,
                dynamic_size=dynamic_size,
                metadata=onnx_metadata(ckpt, shape, ckpt.folded_bn + folded, command),
                atol=atol,
                rtol=rtol,
            )
    else:
        save_derived(compact, out, ckpt, shape, ckpt.plan, command, ckpt.folded_bn + folded, progress)
    return ContractResult(
        source, out, compact, layers, folded, shape, dynamic_size, count_params(ckpt.model), count_params(compact),
        reports, recomputed,
    )  # fmt: skip


def _check_request(ckpt, out: Path, source, input_shape, dynamic_size, require_expanded, precise_bn, data):
    """The expanded layers and the input shape of a contraction that can be done as asked, else the error."""
    to_onnx = out.suffix.lower() == ".onnx"
    if dynamic_size and not to_onnx:
        raise UsageError(
            "dynamic_size shapes an ONNX graph; give an output ending in .onnx", option=("dynamic_size", "output")
        )
    if ckpt.arch is None and not to_onnx:
        raise UsageError(
            f"{source} holds a pickled model whose builder cannot be inferred; pass arch to write a checkpoint",
            option="arch",
        )
    layers = [p for p, _ in expanded_layers(ckpt.model)]
    if require_expanded and not layers:
        raise UnsupportedError(
            f"{source} has no expanded layer (never expanded, or already contracted) and require_expanded "
            "was given; nothing was written",
            option="require_expanded",
        )
    shape = input_shape_for(ckpt, input_shape)
    if precise_bn < 0 or (precise_bn and not data) or (data and not precise_bn):
        raise UsageError(
            "precise_bn N (N >= 1) and data SPEC go together: the batches are SPEC's training images",
            option=("precise_bn", "data"),
        )
    return layers, shape


def _fold_checked(compact: nn.Module, shape, recorded, atol, rtol, reports: list, progress: Progress):
    """``compact`` with BatchNorm folded and the folded-vs-unfolded reports appended to ``reports``; a
    mismatch raises :class:`CheckFailed` carrying them (nothing is written)."""
    with progress.step("folding BatchNorm"):
        folded_model, folded = fold_batchnorm(compact)
    with progress.step("checking the folded model"), running_model(shape, recorded):
        fold_reports = [
            compare_models(compact, folded_model, shape, dtype=d, atol=atol, rtol=rtol, kind="unfolded-vs-folded")
            for d in (torch.float64, torch.float32)
        ]
    reports += fold_reports
    if failed_reports(fold_reports):
        raise check_failed("folding BatchNorm changed the outputs; nothing was written", reports)
    return folded_model, folded

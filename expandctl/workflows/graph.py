"""``expandctl contract --graph`` as a library function: contract, merge every linear region, check, write.

>>> from expandctl import load_checkpoint
>>> from expandctl.workflows import contract_graph_checkpoint
>>> ckpt = load_checkpoint("foreign.pt", trust_pickle=True)
>>> r = contract_graph_checkpoint(ckpt, "deploy.onnx", input_shape=(3, 32, 32))
>>> r.plan.merged, r.reports   # the regions merged; original vs merged in float64, float32 and onnxruntime

An expandctl checkpoint with expanded layers is contracted first (checked against its chains as
``contract`` does), then its graph. The merged model is checked against the model it came from:
in float64 on a float64 copy merged in float64 (the algebra), in float32 on the written weights,
and, for ``.onnx``, onnxruntime against torch. Nothing is written when a check fails.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import checkpoint as ckpt_io
from ..checkpoint import atomic_write
from ..errors import UnsupportedError, UsageError
from ..graph.regions import GraphPlan, contract_graph, plan_graph
from ..progress import Progress, Silent
from ..rewrite import expanded_layers
from ..shapes import running_model
from ..verify import check_failed, compare_models, failed_reports
from .checks import contract_checked, export_checked, onnx_metadata

__all__ = ["GRAPH_SUFFIXES", "GraphContractResult", "contract_graph_checkpoint"]

#: What ``contract --graph`` writes: ONNX, or torch.export's program archive.
GRAPH_SUFFIXES = (".onnx", ".pt2")


@dataclass
class GraphContractResult:
    """What :func:`contract_graph_checkpoint` found and wrote; ``to_dict()`` is ``--json``'s object."""

    source: str
    output: Path | None
    plan: GraphPlan
    contracted_layers: list[str]
    input_shape: tuple[int, ...]
    reports: list = field(default_factory=list)
    model: nn.Module | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "output": str(self.output) if self.output else None,
            "source": self.source,
            "dry_run": self.output is None,
            "format": self.output.suffix.lstrip(".") if self.output else None,
            "contracted_layers": self.contracted_layers,
            "input_shape": list(self.input_shape),
            **self.plan.to_dict(),
        }
        if self.output is not None:
            out["passed"] = True
            out["checks"] = [r.to_dict() for r in self.reports]
        return out


def _example(shape, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn((2, *shape), generator=g, dtype=torch.float64).to(dtype)


def contract_graph_checkpoint(
    ckpt: ckpt_io.Checkpoint,
    output: str | Path | None,
    *,
    input_shape=None,
    atol: float | None = None,
    rtol: float | None = None,
    source: str | None = None,
    command: str | None = None,
    progress: Progress | None = None,
    dynamic_size: bool = False,
    require_expanded: bool = False,
) -> GraphContractResult:
    """Contract expanded layers, merge every linear region of the graph, check, write ``output``
    (``.onnx`` or ``.pt2``); ``output=None`` is a dry run (the plan only, nothing written).
    ``dynamic_size`` and ``require_expanded`` (of :func:`contract_checkpoint`) are refused: a merged graph is
    exported at the fixed input size, and any model may be merged."""
    for name, given in (("dynamic_size", dynamic_size), ("require_expanded", require_expanded)):
        if given:
            raise UsageError(f"{name} is not available with graph", option=(name, "graph"))
    progress = progress or Silent()
    source = source if source is not None else str(ckpt.path)
    shape = tuple(input_shape) if input_shape else ckpt.input_shape
    if not shape:
        raise UsageError(
            f"the input shape of {source!r} is not recorded and cannot be inferred; pass input_shape",
            option="input_shape",
        )
    out = Path(output) if output is not None else None
    if out is not None and out.suffix.lower() not in GRAPH_SUFFIXES:
        raise UsageError(
            f"a graph-contracted model has a structure of its own; write it as .onnx or .pt2, not {out.suffix or out}"
        )
    layers = [p for p, _ in expanded_layers(ckpt.model)]
    reports: list = []
    model = ckpt.model
    if layers:
        model, reports = contract_checked(ckpt, shape, atol, rtol, progress)
    model = copy.deepcopy(model).eval()
    with running_model(shape, ckpt.input_shape):
        if out is None:
            with progress.step("finding linear regions"):
                plan = plan_graph(model, (_example(shape, _dtype(model)),))
            return GraphContractResult(source, None, plan, layers, shape, reports)
        with progress.step("merging linear regions (float64 check per region)"):
            merged = contract_graph(model, _example(shape, _dtype(model)))
            plan = merged.graph_plan
        with progress.step("checking the merged model against the original (float64, float32)"):
            model64 = copy.deepcopy(model).double()
            algebra = contract_graph(model64, _example(shape, torch.float64))
            tol = {"atol": atol, "rtol": rtol, "kind": "original-vs-merged"}
            checks = [
                compare_models(model64, algebra, shape, dtype=torch.float64, **tol),
                compare_models(model, merged, shape, dtype=torch.float32, **tol),
            ]
            checks[0].notes.append("algebra check: the model widened to float64 and merged in float64")
        reports += checks
        if failed_reports(checks):
            raise check_failed(
                "the merged model does not match the original "
                f"({'; '.join(r.summary() for r in failed_reports(checks))}); nothing was written",
                reports,
                "original vs merged",
                **plan.to_dict(),
            )
        if out.suffix.lower() == ".onnx":
            _write_onnx(merged, out, shape, ckpt, plan, command, atol, rtol, reports, progress)
        else:
            with progress.step(f"writing {out} and checking it loads back"):
                reports.append(_write_pt2(merged, out, shape, atol, rtol))
    return GraphContractResult(source, out, plan, layers, shape, reports, merged)


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _write_onnx(merged, out, shape, ckpt, plan, command, atol, rtol, reports, progress) -> None:
    meta = onnx_metadata(ckpt, shape, ckpt.folded_bn, command)
    meta["expandctl.graph_regions"] = str(len(plan.merged))
    with progress.step(f"exporting {out} and checking it with onnxruntime"):
        export_checked(merged, out, shape, reports, metadata=meta, atol=atol, rtol=rtol)


def _write_pt2(merged: nn.Module, out: Path, shape, atol, rtol):
    """torch.export's program archive, batch dimension dynamic (``torch.export.load`` reads it), checked
    by loading it back and running it against the merged model."""
    model = copy.deepcopy(merged).eval().float()
    x = _example(shape)
    try:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    except Exception as e:  # a model torch.export cannot capture
        raise UnsupportedError(f"torch.export cannot capture the merged model ({type(e).__name__}); write .onnx") from e
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()  # our own bytes, just written
    report = compare_models(model, loaded, shape, dtype=torch.float32, atol=atol, rtol=rtol, kind="merged-vs-pt2")
    if not report.passed:
        raise check_failed(f"the .pt2 program differs from the merged model: {report.summary()}", [report])
    with atomic_write(out) as temp:
        Path(temp).write_bytes(buffer.getvalue())
    return report

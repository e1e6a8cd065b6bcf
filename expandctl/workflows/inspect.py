"""``expandctl inspect`` as a library function: what a checkpoint, state dict, pickled model or ONNX file holds.
Never prints.

>>> from expandctl.workflows import inspect_file
>>> r = inspect_file("run/best.pt")
>>> r.kind, r.params, r.compact_params, [row["path"] for row in r.layers]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import checkpoint as ckpt_io
from ..checkpoint.describe import ONNX_PARAMETERS_NOTE
from ..progress import Progress
from ..rewrite import contract as contract_model
from ..rewrite import expanded_layers
from ..sizes import count_params
from .checks import load_checked

__all__ = ["InspectResult", "inspect_file"]


@dataclass
class InspectResult:
    """What :func:`inspect_file` found; ``to_dict()`` is ``expandctl inspect --json``'s object.

    ``kind``: ``"onnx"`` (``info`` and ``metadata`` from the file), ``"state_dict"`` (a plain state dict
    without an architecture: ``info`` only) or ``"checkpoint"`` (``checkpoint``, its expanded ``layers``,
    ``params`` and ``compact_params``)."""

    source: str
    kind: Literal["onnx", "state_dict", "checkpoint"]
    info: dict = field(default_factory=dict)
    metadata: dict | None = None
    checkpoint: ckpt_io.Checkpoint | None = None
    layers: list[dict] = field(default_factory=list)
    params: int | None = None
    compact_params: int | None = None

    def to_dict(self) -> dict:
        if self.kind == "onnx":
            return {**self.info, "parameters_note": ONNX_PARAMETERS_NOTE, "metadata": self.metadata}
        if self.kind == "state_dict":
            return {**self.info, "arch": None}
        return {
            **self.checkpoint.header(),
            "params": self.params,
            "compact_params": self.compact_params,
            "expanded_layers": self.layers,
        }


def inspect_file(
    src: str | Path,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust_pickle: bool = False,
    progress: Progress | None = None,
) -> InspectResult:
    """Describe ``src``: an ONNX file's graph and metadata, a plain state dict's tensors (when no ``arch``
    says what to build), else the loaded checkpoint with one row per expanded layer."""
    src = str(src)
    if ckpt_io.sniff_format(src) == "onnx":
        info = ckpt_io.describe_onnx(src)
        return InspectResult(src, "onnx", info, info.pop("metadata"))
    try:
        ckpt = load_checked(src, arch, arch_kwargs, trust_pickle, progress)
    except ckpt_io.NeedsArchError:
        info = ckpt_io.describe_state_dict(src)
        if info is None:
            raise
        return InspectResult(src, "state_dict", info)
    # The fit residual of init preserve is known when the layer is fitted: the plan records it.
    planned = {e.get("path"): e for e in (ckpt.plan or {}).get("layers", []) if isinstance(e, dict)}
    rows = [
        {
            "path": path,
            "kind": layer.kind,
            "factors": layer.extra_repr(),
            "params": sum(p.numel() for p in layer.parameters()),
            "compact_params": sum(p.numel() for p in layer.contract().parameters()),
            "fit_residual": planned.get(path, {}).get("fit_residual", layer.fit_residual),
        }
        for path, layer in expanded_layers(ckpt.model)
    ]
    total = count_params(ckpt.model)
    compact = count_params(contract_model(ckpt.model)) if rows else total
    return InspectResult(src, "checkpoint", checkpoint=ckpt, layers=rows, params=total, compact_params=compact)

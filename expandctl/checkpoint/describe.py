"""What ``expandctl inspect`` shows of files that are not loaded as models: ONNX files, plain state dicts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from ..errors import UnsafeInputError, UsageError
from .files import _corrupt, _existing, sha256_file, sniff_format
from .format import FORMAT, _read_safetensors
from .unpickle import find_state_dict, torch_load

__all__ = ["describe_onnx", "describe_state_dict", "ONNX_PARAMETERS_NOTE"]

#: Names of the buffers of torch's normalisation layers, as they end a state-dict key.
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")

#: Why an ONNX file's parameter count can be smaller than its checkpoint's.
ONNX_PARAMETERS_NOTE = (
    "ONNX parameters are the graph's initializers: the exporter folds eval-mode BatchNorm into the "
    "preceding conv, so the count can be smaller than the checkpoint's"
)


def describe_onnx(path: str | Path) -> dict:
    """Format, opset, inputs/outputs, parameter count and ``metadata_props`` of an ONNX file."""
    import onnx  # lazy: onnx takes over a second to import; only ONNX files need it

    path = _existing(path)
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise _corrupt(path, e) from None
    if not m.graph.node:
        raise UsageError(f"{str(path)!r} is not a usable ONNX model (empty graph; truncated or not ONNX)")

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    meta = {p.key: p.value for p in m.metadata_props}
    return {
        "path": str(path),
        "format": "onnx",
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "inputs": {v.name: shape(v) for v in m.graph.input},
        "outputs": {v.name: shape(v) for v in m.graph.output},
        "parameters": sum(math.prod(t.dims) for t in m.graph.initializer),
        "nodes": len(m.graph.node),
        "metadata": meta,
        "sha256": sha256_file(path),
    }


def describe_state_dict(path: str | Path) -> dict | None:
    """For a plain state dict (no architecture given): tensor count and sizes, else ``None``."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        tensors, header = _read_safetensors(path)
        if header is not None:
            return None
        sd = tensors
    elif fmt in ("torch", "torch-legacy"):
        try:
            obj = torch_load(path, trust_pickle=False, legacy=fmt == "torch-legacy")
        except UnsafeInputError:
            return None
        if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
            return None
        sd = find_state_dict(obj)
        if sd is None:
            return None
    else:
        return None
    return {
        "path": str(path),
        "format": "safetensors" if fmt == "safetensors" else "state_dict",
        "tensors": len(sd),
        # Without the model, buffers are told apart by name: BatchNorm's statistics are not parameters
        # (the loaded model's count, model.parameters(), must agree with this one).
        "parameters": sum(v.numel() for k, v in sd.items() if k.rpartition(".")[2] not in _BUFFER_NAMES),
        "buffers": sum(v.numel() for k, v in sd.items() if k.rpartition(".")[2] in _BUFFER_NAMES),
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()}),
        "first_keys": list(sd)[:8],
        "sha256": sha256_file(path),
    }

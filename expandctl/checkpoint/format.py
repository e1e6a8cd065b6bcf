"""The expandctl checkpoint format: the :class:`Checkpoint` record, :func:`save` and :func:`load_checkpoint`.

Loading rebuilds the model from its recipe, never from pickled code (:mod:`.rebuild`):
``build_arch(spec, kwargs)`` -> ``apply_layout(model, layout)`` -> BatchNorm folds -> ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..errors import UnsafeInputError, UsageError
from ..layers.tree import layout
from ..models import resolve_arch
from .files import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, _corrupt, _existing, atomic_write, sha256_file, sniff_format
from .infer import infer_arch, infer_input_shape
from .rebuild import check_rebuild, load_into, rebuild
from .unpickle import find_state_dict, torch_load

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "NeedsArchError", "load", "load_checkpoint", "save"]

FORMAT = "expandctl"
FORMAT_VERSION = 1


class NeedsArchError(UsageError):
    """A plain state dict was given without an architecture (exit 2)."""


@dataclass
class Checkpoint:
    """What a file holds, whatever its format.

    ``format`` is ``"expandctl"`` or ``"expandctl-safetensors"`` (this format), ``"state_dict"`` /
    ``"safetensors"`` (a foreign state dict loaded into ``arch``) or ``"pickled_module"``.
    ``arch`` is ``None`` only for a pickled module whose builder could not be inferred.
    """

    model: nn.Module
    arch: str | None
    arch_kwargs: dict = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    layout: dict = field(default_factory=dict)
    plan: dict | None = None
    provenance: dict = field(default_factory=dict)
    format: str = FORMAT
    extra: dict = field(default_factory=dict)
    folded_bn: list = field(default_factory=list)
    #: Layers given a bias the architecture lacks (a contracted branch layer's shift; see rebuild.add_biases).
    added_bias: list = field(default_factory=list)
    format_version: int | None = None
    path: Path | None = None
    sha256: str | None = None

    def header(self) -> dict:
        """JSON-ready description (no tensors), as ``expandctl inspect`` shows it."""
        return {
            "path": str(self.path) if self.path else None,
            "format": self.format,
            "format_version": self.format_version,
            "arch": {"spec": self.arch, "kwargs": self.arch_kwargs},
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "layout": self.layout,
            "plan": self.plan,
            "folded_bn": self.folded_bn,
            "added_bias": self.added_bias,
            "provenance": self.provenance,
            "extra_keys": sorted(self.extra),
            "sha256": self.sha256,
        }


def load(path: str | Path, arch: str | None = None, arch_kwargs: dict | None = None, trust_pickle: bool = False):
    """The model in ``path``, expanded layers included (see :func:`load_checkpoint`)."""
    return load_checkpoint(path, arch, arch_kwargs, trust_pickle).model


def load_checkpoint(
    path: str | Path, arch: str | None = None, arch_kwargs: dict | None = None, trust_pickle: bool = False
) -> Checkpoint:
    """Read an expandctl checkpoint, a plain state dict (with ``arch``) or a pickled ``nn.Module``.

    ``arch``/``arch_kwargs`` override what an expandctl checkpoint records. Errors are
    :class:`UsageError` (missing, corrupt, unknown or unfitting input) or :class:`UnsafeInputError`
    (a pickle naming classes outside the allowlist, without ``trust_pickle``).
    """
    path = _existing(path)
    fmt = sniff_format(path)
    if fmt == "onnx":
        raise UsageError(f"{str(path)!r} is an ONNX file; it can be verified or inspected but not loaded as a model")
    digest = sha256_file(path)
    if fmt == "torch" and path.suffix.lower() == PROGRAM_SUFFIX:
        ckpt = _from_program(path, trust_pickle)
    elif fmt == "safetensors":
        tensors, header = _read_safetensors(path)
        if header is not None:
            ckpt = _from_header(header, tensors, path, arch, arch_kwargs, "expandctl-safetensors")
        else:
            ckpt = _from_state_dict(tensors, path, arch, arch_kwargs, "safetensors")
    else:
        obj = torch_load(path, trust_pickle, legacy=fmt == "torch-legacy")
        if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
            ckpt = _from_header(obj, obj.get("state_dict"), path, arch, arch_kwargs, FORMAT)
        elif isinstance(obj, nn.Module):
            ckpt = _from_module(obj, path, arch, arch_kwargs)
        else:
            sd = find_state_dict(obj)
            if sd is None:
                raise UsageError(
                    f"{str(path)!r} holds a {type(obj).__name__}, not an expandctl checkpoint, a state dict "
                    "or an nn.Module; save model.state_dict() or the model itself"
                )
            ckpt = _from_state_dict(sd, path, arch, arch_kwargs, "state_dict")
    ckpt.path, ckpt.sha256 = path, digest
    if ckpt.input_shape is None:
        ckpt.input_shape = infer_input_shape(ckpt.arch, ckpt.arch_kwargs, ckpt.model)
    return ckpt


def save(
    model: nn.Module,
    path: str | Path,
    *,
    arch: str,
    arch_kwargs: dict | None = None,
    input_shape: Sequence[int] | None,
    plan: Any = None,
    parent_sha256: str | None = None,
    command: str | Sequence[str] | None = None,
    extra: dict | None = None,
    folded_bn: Sequence[Mapping[str, str]] | None = None,
) -> Path:
    """Write ``model`` in the expandctl format (``.pt``/``.pth``: torch, ``.safetensors``), atomically.

    ``arch`` must rebuild the compact model: this is checked before writing (on the meta device,
    so it costs no memory), so a checkpoint that cannot be loaded back is never written.
    ``extra`` (optimizer state, epoch, RNG states...) may hold tensors in ``.pt`` files; values
    must be what ``torch.load(weights_only=True)`` reads (dicts, lists, numbers, strings, tensors).
    ``plan`` is an :class:`expandctl.rewrite.Plan` (anything with ``to_dict()``) or that dict.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES:
        raise UsageError(f"checkpoint {str(path)!r} must end in .pt, .pth or .safetensors")
    if not arch:
        raise UsageError("an expandctl checkpoint needs an architecture spec to rebuild the model; pass --arch")
    spec, _ = resolve_arch(arch)
    arch_kwargs = dict(arch_kwargs or {})
    _check_json(arch_kwargs, "arch_kwargs")
    folded = [
        {"conv": str(p["conv"]), "bn": str(p["bn"]), **({"neutral": True} if p.get("neutral") else {})}
        for p in (folded_bn or [])
    ]
    lay = layout(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    added = check_rebuild(spec, arch_kwargs, lay, folded, state, model)
    if isinstance(command, (list, tuple)):
        command = shlex.join(command)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": {"spec": spec, "kwargs": arch_kwargs},
        "input_shape": [int(s) for s in input_shape] if input_shape else None,
        "layout": lay,
        "plan": plan.to_dict() if hasattr(plan, "to_dict") else plan,
        "folded_bn": folded,
        "added_bias": added,
        "provenance": _provenance(parent_sha256, command),
    }
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    with atomic_write(path) as tmp:
        if suffix in SAFETENSORS_SUFFIXES:
            try:
                header_json = json.dumps({**header, "extra": extra})
            except TypeError:
                raise UsageError("extra holds tensors or other non-JSON values; save to a .pt file instead") from None
            # Clones: safetensors refuses tensors sharing storage (tied weights, views).
            save_file(
                {k: v.contiguous().clone() for k, v in state.items()},
                str(tmp),
                metadata={FORMAT: header_json},
            )
        else:
            torch.save({**header, "state_dict": state, "extra": extra}, tmp)
    return path


def _provenance(parent_sha256: str | None, command: str | None) -> dict:
    import torchvision  # lazy: torchvision takes seconds to import; only its version is recorded

    return {
        "expandctl_version": __version__,
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
        "python_version": platform.python_version(),
        "parent_sha256": parent_sha256,
        "command": command if command is not None else shlex.join(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _check_json(obj: Any, where: str) -> None:
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where} must be JSON-serialisable ({e})") from None


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.Size, torch.device)


def _check_plain(obj: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` would not read back."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise UsageError(f"{where} has a key of type {type(k).__name__}; use strings or numbers")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise UsageError(
            f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) cannot read back; "
            "convert it to tensors, numbers, strings, lists or dicts"
        )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own untyped errors on bad files
        raise _corrupt(path, e) from None
    if FORMAT not in meta:
        return tensors, None
    try:
        header = json.loads(meta[FORMAT])
    except json.JSONDecodeError as e:
        raise _corrupt(path, e) from None
    return tensors, header


def _from_header(header: Mapping, state: Any, path: Path, arch, arch_kwargs, fmt: str) -> Checkpoint:
    version = header.get("format_version")
    if not isinstance(version, int):
        raise UsageError(f"{str(path)!r} is an expandctl checkpoint without a format version (corrupt header)")
    if version > FORMAT_VERSION:
        raise UsageError(
            f"{str(path)!r} has format version {version}, newer than this expandctl reads "
            f"({FORMAT_VERSION}); upgrade expandctl"
        )
    if not isinstance(state, Mapping):
        raise UsageError(f"{str(path)!r} is an expandctl checkpoint without a state dict (corrupt)")
    recorded = header.get("arch") or {}
    spec = arch or recorded.get("spec")
    kwargs = dict(arch_kwargs if arch_kwargs is not None else (recorded.get("kwargs") or {}))
    if not spec:
        raise UsageError(f"{str(path)!r} records no architecture; pass --arch")
    lay = dict(header.get("layout") or {})
    folded = list(header.get("folded_bn") or [])
    added = [str(p) for p in header.get("added_bias") or []]
    model = rebuild(spec, kwargs, lay, folded, added)
    load_into(model, dict(state), path, spec, kwargs)
    shape = header.get("input_shape")
    return Checkpoint(
        model=model,
        arch=resolve_arch(spec)[0],
        arch_kwargs=kwargs,
        input_shape=tuple(shape) if shape else None,
        layout=lay,
        plan=header.get("plan"),
        provenance=dict(header.get("provenance") or {}),
        format=fmt,
        extra=dict(header.get("extra") or {}),
        folded_bn=folded,
        added_bias=added,
        format_version=version,
    )


def _from_state_dict(sd: dict, path: Path, arch, arch_kwargs, fmt: str) -> Checkpoint:
    if not arch:
        raise NeedsArchError(
            f"{str(path)!r} is a plain state dict with no architecture; pass --arch (e.g. --arch resnet18 "
            "--arch-kwargs '{\"num_classes\": 10}' or --arch mypkg.models:MyNet)"
        )
    kwargs = dict(arch_kwargs or {})
    model = rebuild(arch, kwargs, {}, [])
    load_into(model, sd, path, arch, kwargs)
    return Checkpoint(model, resolve_arch(arch)[0], kwargs, format=fmt)


#: torch.export's program archive, as ``contract --graph`` writes it.
PROGRAM_SUFFIX = ".pt2"


def _from_program(path: Path, trust_pickle: bool) -> Checkpoint:
    """A ``torch.export`` program (``.pt2``): its graph, run as a module. ``torch.export.load`` unpickles
    the weights stored in the archive, so it needs ``trust_pickle``."""
    if not trust_pickle:
        raise UnsafeInputError(
            f"{str(path)!r} is a torch.export program, and torch.export.load unpickles the weights inside it; "
            "nothing was loaded. Pass --trust-pickle if you trust the file (e.g. you wrote it with contract --graph)"
        )
    try:
        program = torch.export.load(path)
    except Exception as e:
        raise _corrupt(path, e) from None
    shape = None
    args = program.example_inputs[0] if program.example_inputs else ()
    if len(args) == 1 and isinstance(args[0], torch.Tensor):
        shape = tuple(int(s) for s in args[0].shape[1:])
    model = ExportedProgramModule(program.module())
    return Checkpoint(model, None, {}, input_shape=shape, provenance={}, format="torch_export_program")


class ExportedProgramModule(nn.Module):
    """A loaded ``torch.export`` program as a module: it was captured in eval mode and stays so
    (the program refuses ``train()`` / ``eval()``; this wrapper records the mode and runs it as it is)."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> ExportedProgramModule:
        self.training = mode
        return self

    def forward(self, *args, **kwargs):
        return self.program(*args, **kwargs)


def _from_module(module: nn.Module, path: Path, arch, arch_kwargs) -> Checkpoint:
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    prov = {"pickled_class": cls}
    lay = layout(module)
    if arch:
        kwargs = dict(arch_kwargs or {})
        model = rebuild(arch, kwargs, lay, [])
        load_into(model, module.state_dict(), path, arch, kwargs)
        return Checkpoint(model, resolve_arch(arch)[0], kwargs, layout=lay, provenance=prov, format="pickled_module")
    inferred = infer_arch(module)
    spec, kwargs = inferred if inferred else (None, {})
    return Checkpoint(module, spec, kwargs, layout=lay, provenance=prov, format="pickled_module")

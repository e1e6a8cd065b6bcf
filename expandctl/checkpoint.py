"""The expandctl checkpoint format, architecture specs, and safe loading of foreign files.

An expandctl checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` reads back
(or a safetensors file whose metadata key ``"expandctl"`` holds the same header as JSON)::

    {"format": "expandctl", "format_version": 1,
     "arch": {"spec": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}},
     "input_shape": [3, 224, 224],
     "layout": {"conv1": {"kind": "ck", "hidden": [12, 256, 256]}, ...},   # rewrite.layout()
     "plan": {...} or None,                                                 # Plan.to_dict()
     "folded_bn": [{"conv": "conv1", "bn": "bn1"}, ...],                    # only after --fold-bn
     "state_dict": {...}, "provenance": {...}, "extra": {...}}

Loading rebuilds the model from its recipe, never from pickled code: ``build_arch(spec, kwargs)``
-> ``apply_layout(model, layout)`` -> BatchNorm folds -> ``load_state_dict(strict=True)``.

Foreign inputs: a plain state dict (needs an architecture), or a whole pickled ``nn.Module``.
Pickles are read with ``torch.load(weights_only=True)``; globals outside that allowlist are
listed without executing anything (``get_unsafe_globals_in_checkpoint`` scans the opcodes), and
only ``nn.Module`` classes of torch, torchvision and expandctl (plus ``functools.partial`` and
``torch.nn.functional``) are admitted. Anything else needs ``trust_pickle=True``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import math
import os
import pickle
import platform
import shlex
import struct
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .errors import UnsafeInputError, UsageError
from .fold import apply_folds
from .models import SmallNet, build_arch, resolve_arch
from .rewrite import Plan, apply_layout, contract, layout

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "NeedsArchError",
    "atomic_write",
    "sha256_file",
    "sniff_format",
    "load_checkpoint",
    "load",
    "save",
    "infer_arch",
    "infer_input_shape",
    "check_output_path",
    "describe_onnx",
    "describe_state_dict",
]

FORMAT = "expandctl"
FORMAT_VERSION = 1
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)

# Packages whose nn.Module classes load from a pickle without --trust-pickle. Their code is installed
# library code; the pickle only names the class. torch.jit / torch.fx modules are excluded: they
# carry code (TorchScript, generated forward) rather than just parameters.
_SAFE_PACKAGES = ("torch", "torchvision", "expandctl")
_UNSAFE_SUBPACKAGES = ("torch.jit", "torch.fx", "torch._dynamo", "torch.export", "torch.package", "torch.hub")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any exception the temporary file is removed and an existing ``path`` is left untouched, so
    a failed command never leaves a file that looks finished.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"the output directory {str(path.parent)!r} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sniff_format(path: str | Path) -> str:
    """``"torch"`` (zip), ``"torch-legacy"``, ``"safetensors"`` or ``"onnx"``, from the bytes (ONNX,
    protobuf without a magic number, from the ``.onnx`` suffix). Raises :class:`UsageError`."""
    path = _existing(path)
    size = path.stat().st_size
    if size == 0:
        raise UsageError(f"{str(path)!r} is empty; re-create or re-download it")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch"
    if len(head) > 8 and head[8:9] == b"{":
        n = struct.unpack("<Q", head[:8])[0]
        if n < 1 << 27:
            return "safetensors"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy"
    raise UsageError(
        f"{str(path)!r} is not a PyTorch checkpoint, safetensors or ONNX file (unknown format); "
        "expandctl reads .pt/.pth (torch.save), .safetensors and .onnx"
    )


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist; check the path")
    if not path.is_file():
        raise UsageError(f"{str(path)!r} is not a file")
    return path


def check_output_path(out: str | Path, inputs: Sequence[str | Path] = (), suffixes: Sequence[str] = ()) -> Path:
    """Validate an output path before any work: known suffix, existing directory, not an input."""
    out = Path(out)
    if suffixes and out.suffix.lower() not in suffixes:
        raise UsageError(f"output {str(out)!r} must end in one of {', '.join(suffixes)}")
    if not out.parent.is_dir():
        raise UsageError(f"the output directory {str(out.parent)!r} does not exist; create it first")
    if out.is_dir():
        raise UsageError(f"output {str(out)!r} is a directory; give a file name")
    for src in inputs:
        if src is not None and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise UsageError(
                f"output {str(out)!r} is the input file; the input is never overwritten, choose another -o"
            )
    return out


# --------------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------------
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
    if fmt == "safetensors":
        tensors, header = _read_safetensors(path)
        if header is not None:
            ckpt = _from_header(header, tensors, path, arch, arch_kwargs, "expandctl-safetensors")
        else:
            ckpt = _from_state_dict(tensors, path, arch, arch_kwargs, "safetensors")
    else:
        obj = _torch_load(path, trust_pickle, legacy=fmt == "torch-legacy")
        if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
            ckpt = _from_header(obj, obj.get("state_dict"), path, arch, arch_kwargs, FORMAT)
        elif isinstance(obj, nn.Module):
            ckpt = _from_module(obj, path, arch, arch_kwargs)
        else:
            sd = _find_state_dict(obj)
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
    plan: Plan | dict | None = None,
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
    folded = [{"conv": str(p["conv"]), "bn": str(p["bn"])} for p in (folded_bn or [])]
    lay = layout(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _check_rebuild(spec, arch_kwargs, lay, folded, state)
    if isinstance(command, (list, tuple)):
        command = shlex.join(command)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": {"spec": spec, "kwargs": arch_kwargs},
        "input_shape": [int(s) for s in input_shape] if input_shape else None,
        "layout": lay,
        "plan": plan.to_dict() if isinstance(plan, Plan) else plan,
        "folded_bn": folded,
        "provenance": _provenance(parent_sha256, command),
    }
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    with atomic_write(path) as tmp:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

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
    import torchvision

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


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _corrupt(path: Path, e: BaseException) -> UsageError:
    reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return UsageError(f"{str(path)!r} is truncated or corrupt ({reason}); re-create or re-download it")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open
    from safetensors.torch import load_file

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


def _torch_load(path: Path, trust_pickle: bool, legacy: bool = False) -> Any:
    """``torch.load`` that never runs code from the file unless ``trust_pickle``."""
    if not legacy:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise UsageError(f"{str(path)!r} is corrupt (bad CRC in {bad}); re-create or re-download it")
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except UsageError:
            raise
        except Exception as e:
            raise _corrupt(path, e) from None
        allowed, refused = _classify_globals(names)
        if refused and not trust_pickle:
            raise _unsafe(path, refused)
        try:
            if refused:  # trusted by the user: a full unpickle
                return torch.load(path, map_location="cpu", weights_only=False)
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except (UsageError, UnsafeInputError):
            raise
        except Exception as e:
            raise _corrupt(path, e) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise _corrupt(path, e) from None
        if not trust_pickle:
            raise UnsafeInputError(
                f"{str(path)!r} is a legacy (non-zip) torch file whose pickle needs globals outside the "
                "weights-only allowlist; re-save it with a current torch, or pass --trust-pickle "
                "(EXPANDCTL_TRUST_PICKLE=1) if you trust its source"
            ) from None
    except Exception as e:
        raise _corrupt(path, e) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise _corrupt(path, e) from None


def _unsafe(path: Path, refused: Sequence[str]) -> UnsafeInputError:
    shown = ", ".join(refused[:4]) + (f" and {len(refused) - 4} more" if len(refused) > 4 else "")
    return UnsafeInputError(
        f"{str(path)!r} is a pickle that names {shown}, outside the torch/torchvision classes expandctl "
        "loads safely, so loading it could run arbitrary code; nothing was loaded. Pass --trust-pickle "
        "(or set EXPANDCTL_TRUST_PICKLE=1, or trust_pickle=True) only if you trust its source, "
        "or save a state dict and use --arch"
    )


def _classify_globals(names: Sequence[str]) -> tuple[list[Any], list[str]]:
    """Split pickle globals into objects safe to allowlist and names that are not.

    Only ``nn.Module`` subclasses from torch, torchvision and expandctl (they are rebuilt with
    ``__new__`` + ``__setstate__``, no constructor call from the file's arguments runs anything
    but library code), ``functools.partial`` (its function must itself pass) and functions of
    ``torch.nn.functional`` pass. Modules are imported only inside those packages.
    """
    allowed, refused = [], []
    for name in names:
        obj = _safe_global(name)
        if obj is None:
            refused.append(name)
        else:
            allowed.append(obj)
    return allowed, refused


def _safe_global(name: str) -> Any | None:
    if name == "functools.partial":
        return functools.partial
    module_name, _, qualname = name.rpartition(".")
    if module_name.split(".")[0] not in _SAFE_PACKAGES:
        return None
    if any(module_name == p or module_name.startswith(p + ".") for p in _UNSAFE_SUBPACKAGES):
        return None
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception:
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj
    if module_name == "torch.nn.functional" and callable(obj):
        return obj
    return None


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """A ``{name: tensor}`` mapping, directly or under a usual training-checkpoint key."""

    def tensors_only(d):
        return (
            isinstance(d, Mapping)
            and d
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())
        )

    if tensors_only(obj):
        sd = dict(obj)
    elif isinstance(obj, Mapping):
        key = next((k for k in ("state_dict", "model_state_dict", "model", "net") if tensors_only(obj.get(k))), None)
        if key is None:
            return None
        sd = dict(obj[key])
    else:
        return None
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


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
    model = _rebuild(spec, kwargs, lay, folded)
    _load_into(model, dict(state), path, spec, kwargs)
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
        format_version=version,
    )


def _from_state_dict(sd: dict, path: Path, arch, arch_kwargs, fmt: str) -> Checkpoint:
    if not arch:
        raise NeedsArchError(
            f"{str(path)!r} is a plain state dict with no architecture; pass --arch (e.g. --arch resnet18 "
            "--arch-kwargs '{\"num_classes\": 10}' or --arch mypkg.models:MyNet)"
        )
    kwargs = dict(arch_kwargs or {})
    model = _rebuild(arch, kwargs, {}, [])
    _load_into(model, sd, path, arch, kwargs)
    return Checkpoint(model, resolve_arch(arch)[0], kwargs, format=fmt)


def _from_module(module: nn.Module, path: Path, arch, arch_kwargs) -> Checkpoint:
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    prov = {"pickled_class": cls}
    lay = layout(module)
    if arch:
        kwargs = dict(arch_kwargs or {})
        model = _rebuild(arch, kwargs, lay, [])
        _load_into(model, module.state_dict(), path, arch, kwargs)
        return Checkpoint(model, resolve_arch(arch)[0], kwargs, layout=lay, provenance=prov, format="pickled_module")
    inferred = infer_arch(module)
    spec, kwargs = inferred if inferred else (None, {})
    return Checkpoint(module, spec, kwargs, layout=lay, provenance=prov, format="pickled_module")


@contextlib.contextmanager
def _quiet_rng():
    """Building a model draws random initial weights; do not move the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        yield


def _rebuild(spec: str, kwargs: dict, lay: dict, folded: Sequence[Mapping], device: str | None = None) -> nn.Module:
    with _quiet_rng(), torch.device(device) if device else contextlib.nullcontext():
        model = build_arch(spec, kwargs)
        if lay:
            model = apply_layout(model, lay, inplace=True)
        apply_folds(model, folded)
    return model


def _check_rebuild(spec: str, kwargs: dict, lay: dict, folded: Sequence[Mapping], state: Mapping) -> None:
    try:
        skeleton = _rebuild(spec, kwargs, lay, folded, device="meta")
    except (UsageError, UnsafeInputError):
        raise
    except Exception:  # some builders compute on tensors in __init__; the meta device cannot
        skeleton = _rebuild(spec, kwargs, lay, folded)
    problem = _mismatch(skeleton.state_dict(), state)
    if problem:
        raise UsageError(
            f"--arch {spec} {json.dumps(kwargs)} does not rebuild this model ({problem}); pass the right --arch"
        )


def _mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > 3 else ""
            parts.append(f"{label} {', '.join(items[:3])}{more}")
    return "; ".join(parts) or None


def _load_into(model: nn.Module, state: Mapping[str, Any], path: Path, spec: str, kwargs: dict) -> None:
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"the state dict in {str(path)!r} holds non-tensor values (corrupt)")
    problem = _mismatch(model.state_dict(), state)
    if problem:
        raise UsageError(
            f"the weights in {str(path)!r} do not fit --arch {spec} {json.dumps(kwargs)}: {problem}; "
            "check --arch and --arch-kwargs"
        )
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())  # keep float64 (or half) weights in their own precision
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------
# Architecture and input-shape inference
# --------------------------------------------------------------------------------------------------
def _base(module: nn.Module) -> nn.Module:
    """The original layer behind an expanded one (its attributes), else the module itself."""
    return getattr(module, "_template", module)


def infer_arch(module: nn.Module) -> tuple[str, dict] | None:
    """``(spec, kwargs)`` that rebuild ``module``'s compact structure, or ``None``.

    Tried: torchvision builders defined next to the module's class (with ``num_classes`` read from
    the last layer), expandctl's SmallNet, and the class called without arguments. A candidate
    counts only if its ``repr`` (every layer attribute: eps, stride, dropout...) and its state
    dict shapes are those of ``module``, so a model built with non-default settings is not
    mistaken for the default one.
    """
    compact = contract(module) if layout(module) else module
    target_repr = repr(compact)
    target_shapes = {k: tuple(v.shape) for k, v in compact.state_dict().items()}
    cls = type(compact)
    for spec, kwargs in _arch_candidates(compact):
        try:
            with torch.device("meta"), _quiet_rng(), _no_warnings():
                candidate = build_arch(spec, kwargs)
        except Exception:
            continue
        if type(candidate) is not cls or repr(candidate) != target_repr:
            continue
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == target_shapes:
            return resolve_arch(spec)[0], kwargs
    return None


@contextlib.contextmanager
def _no_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _arch_candidates(module: nn.Module) -> Iterator[tuple[str, dict]]:
    cls = type(module)
    if isinstance(module, SmallNet):
        yield "smallnet", _smallnet_kwargs(module)
    if cls.__module__.startswith("torchvision.models"):
        import torchvision.models as tvm

        heads = _head_sizes(module)
        for name in tvm.list_models():
            builder = tvm.get_model_builder(name)
            if builder.__module__ != cls.__module__:
                continue
            for n in heads:
                yield f"torchvision.models:{name}", {"num_classes": n}
    yield f"{cls.__module__}:{cls.__qualname__}", {}


def _head_sizes(module: nn.Module) -> list[int]:
    """Likely ``num_classes``: the output size of the last Linear and of the last conv."""
    sizes = []
    layers = [_base(m) for m in module.modules()]
    for kind, attr in ((nn.Linear, "out_features"), (nn.modules.conv._ConvNd, "out_channels")):
        last = [m for m in layers if isinstance(m, kind)]
        if last:
            sizes.append(getattr(last[-1], attr))
    return list(dict.fromkeys(sizes)) or [1000]


def _smallnet_kwargs(net: SmallNet) -> dict:
    convs = [_base(m) for m in net.features if isinstance(_base(m), nn.Conv2d)]
    linears = [_base(m) for m in net.classifier if isinstance(_base(m), nn.Linear)]
    channels = [c.out_channels for c in convs]
    side = math.isqrt(linears[0].in_features // channels[-1])
    return {
        "kernel_size": convs[0].kernel_size[0],
        "in_channels": convs[0].in_channels,
        "num_classes": linears[-1].out_features,
        "channels": channels,
        "hidden": linears[0].out_features,
        "image_size": side * 2 ** len(channels),
    }


_TV_NOT_CLASSIFICATION = ("detection", "segmentation", "video", "optical_flow", "quantization")


def infer_input_shape(arch: str | None, arch_kwargs: Mapping | None, model: nn.Module | None) -> tuple[int, ...] | None:
    """A per-sample input shape that the model accepts, when it can be known; else ``None``.

    torchvision classification models: ``(3, 224, 224)`` (``image_size`` if given, 299 for
    inception_v3); SmallNet: ``(in_channels, image_size, image_size)``.
    """
    kwargs = dict(arch_kwargs or {})
    name = None
    if arch:
        canonical = resolve_arch(arch)[0]
        module_name, _, name = canonical.partition(":")
        if module_name == "expandctl.models" and name == "SmallNet":
            side = int(kwargs.get("image_size", 32))
            return (int(kwargs.get("in_channels", 3)), side, side)
        if module_name == "torchvision.models":
            import torchvision.models as tvm

            if name in tvm.list_models(module=tvm):
                side = int(kwargs.get("image_size", 299 if name == "inception_v3" else 224))
                return (3, side, side)
            return None
    if model is None:
        return None
    if isinstance(model, SmallNet):
        k = _smallnet_kwargs(model)
        return (k["in_channels"], k["image_size"], k["image_size"])
    module_name = type(model).__module__
    if module_name.startswith("torchvision.models.") and module_name.split(".")[2] not in _TV_NOT_CLASSIFICATION:
        side = int(getattr(model, "image_size", 299 if module_name.endswith("inception") else 224))
        return (3, side, side)
    return None


# --------------------------------------------------------------------------------------------------
# Descriptions for `inspect`
# --------------------------------------------------------------------------------------------------
def describe_onnx(path: str | Path) -> dict:
    """Format, opset, inputs/outputs, parameter count and ``metadata_props`` of an ONNX file."""
    import onnx

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
            obj = _torch_load(path, trust_pickle=False, legacy=fmt == "torch-legacy")
        except UnsafeInputError:
            return None
        if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
            return None
        sd = _find_state_dict(obj)
        if sd is None:
            return None
    else:
        return None
    return {
        "path": str(path),
        "format": "safetensors" if fmt == "safetensors" else "state_dict",
        "tensors": len(sd),
        "parameters": sum(v.numel() for v in sd.values()),
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()}),
        "first_keys": list(sd)[:8],
        "sha256": sha256_file(path),
    }

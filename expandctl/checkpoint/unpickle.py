"""Reading foreign torch files without running code from them.

Pickles are read with ``torch.load(weights_only=True)``; globals outside that allowlist are listed
without executing anything (``get_unsafe_globals_in_checkpoint`` scans the opcodes), and only
``nn.Module`` classes of torch, torchvision and expandctl (plus ``functools.partial`` and
``torch.nn.functional``) are admitted. Anything else needs ``trust_pickle=True``.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import UnsafeInputError, UsageError
from .files import _corrupt

__all__ = ["torch_load", "find_state_dict"]

# Packages whose nn.Module classes load from a pickle without --trust-pickle. Their code is installed
# library code; the pickle only names the class. torch.jit / torch.fx modules are excluded: they
# carry code (TorchScript, generated forward) rather than just parameters.
_SAFE_PACKAGES = ("torch", "torchvision", "expandctl")
_UNSAFE_SUBPACKAGES = ("torch.jit", "torch.fx", "torch._dynamo", "torch.export", "torch.package", "torch.hub")


def torch_load(path: Path, trust_pickle: bool, legacy: bool = False) -> Any:
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
                return _trusted_load(path)
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
        return _trusted_load(path)
    except UsageError:
        raise
    except Exception as e:
        raise _corrupt(path, e) from None


def _trusted_load(path: Path) -> Any:
    """A full unpickle; the classes it names are imported also from the current folder, as ``--arch
    module:callable`` is (a user's ``mynet.py`` next to the file), and a module found nowhere is
    named as such rather than reported as a corrupt file."""
    cwd = os.getcwd()
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        if cwd in sys.path or "" in sys.path:
            raise _module_missing(path, e, cwd) from None
    sys.path.append(cwd)  # appended: it never shadows an installed package
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise _module_missing(path, e, cwd) from None


def _module_missing(path: Path, e: ModuleNotFoundError, cwd: str) -> UsageError:
    where = (e.name or "the module").replace(".", "/")
    return UsageError(
        f"{str(path)!r} is a pickle of a class whose module cannot be imported ({e}); run expandctl from the "
        f"folder that holds {where}.py (now {cwd}), add that folder to PYTHONPATH, or install the package "
        "that provides it"
    )


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


def find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
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

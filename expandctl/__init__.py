"""expandctl: train compact CNNs as linear over-parameterised chains (ExpandNets), contract exactly.

>>> import expandctl
>>> big = expandctl.expand(model, strategy="ck+fc", rate=4)
>>> small = expandctl.contract(big)

The names below load on first use (PEP 562): ``import expandctl`` and the CLI's ``--help`` load no torch
(importing it costs seconds); ``expandctl.expand`` imports :mod:`expandctl.rewrite` when first read.
docs/architecture.md: the package's layers and what each may import.
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .errors import (
    AlreadyExpandedError,
    CheckFailed,
    ExpandctlError,
    NothingToExpandError,
    PreserveFitError,
    UnsafeInputError,
    UnsupportedError,
    UsageError,
)

#: Public name -> the module that defines it.
_LAZY = {
    **dict.fromkeys(("Checkpoint", "load", "load_checkpoint", "save"), "checkpoint"),
    **dict.fromkeys(("ExpandedTraining", "expanded"), "context"),
    **dict.fromkeys(
        ("EXPANSIONS", "ExpandedConv", "ExpandedConvCK", "ExpandedConvCL", "ExpandedLayer", "ExpandedLinear"),
        "layers",
    ),
    "register_expansion": "layers",
    **dict.fromkeys(
        ("Plan", "PlanEntry", "apply_layout", "contract", "expand", "expanded_layers", "layout", "plan", "set_forward"),
        "rewrite",
    ),
}

__all__ = [
    "__version__",
    "ExpandctlError",
    "UsageError",
    "CheckFailed",
    "UnsafeInputError",
    "UnsupportedError",
    "NothingToExpandError",
    "AlreadyExpandedError",
    "PreserveFitError",
    *_LAZY,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'expandctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # the next read is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

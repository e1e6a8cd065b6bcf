"""Typed errors. Each carries a sentence a user can act on and the CLI exit code it maps to."""

from __future__ import annotations


class ExpandctlError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with (see README, "Exit codes")."""

    exit_code = 2


class UsageError(ExpandctlError, ValueError):
    """Bad arguments or bad input data (exit 2)."""

    exit_code = 2


class CheckFailed(ExpandctlError):
    """An equivalence or export check did not pass (exit 1)."""

    exit_code = 1


class UnsafeInputError(ExpandctlError):
    """The input would execute code that the user has not trusted (exit 3)."""

    exit_code = 3


class UnsupportedError(ExpandctlError):
    """The model or layer cannot be handled (exit 4)."""

    exit_code = 4


class NothingToExpandError(UnsupportedError):
    """The strategy, include and exclude patterns select no layer (exit 4)."""


class AlreadyExpandedError(UnsupportedError):
    """A selected layer is already part of an expanded chain (exit 4)."""


class PreserveFitError(UnsupportedError):
    """``init='preserve'`` cannot represent a kernel at this rate (exit 4)."""

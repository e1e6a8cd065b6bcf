"""Typed errors. Each carries a sentence a user can act on and the CLI exit code it maps to."""

from __future__ import annotations

import re


class ExpandctlError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with (see README, "Exit codes").

    Messages are worded in library terms. ``option`` names the parameter a message is about (a field of
    the verb's options, e.g. ``"epochs"``) and the message names it by that word: ``"epochs must be at
    least 1 (got 0)"``. The CLI words it with the command's flag instead (``--epochs``) in one place,
    :func:`expandctl.commands.runtime.cli_message`; nothing else rewrites error text.
    """

    exit_code = 2

    def __init__(self, message: str = "", *, option: str | tuple[str, ...] | None = None, details: dict | None = None):
        super().__init__(message)
        self.option = option
        if details is not None:
            self.details = details

    @property
    def options(self) -> tuple[str, ...]:
        """The parameters the message names (``option`` as a tuple)."""
        return (self.option,) if isinstance(self.option, str) else tuple(self.option or ())

    def worded(self, names: dict[str, str]) -> str:
        """The message with each parameter in ``names`` (``{"epochs": "--epochs"}``) called by its new name."""
        text = str(self)
        for option in self.options:
            if option in names:
                pattern = r"(?<![\w'/.:-])" + re.escape(option) + r"(?![\w'/-])"  # a word, not part of a path
                text = re.sub(pattern, lambda _, new=names[option]: new, text)
        return text


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

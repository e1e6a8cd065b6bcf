"""What a long library call reports on its way: slow steps and warnings. The CLI's console is one
(:class:`expandctl.console.UI`); without one the library is silent. Standard library only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol


class Progress(Protocol):
    """What the workflows report on their way: slow steps and warnings (the CLI's console is one)."""

    def step(self, text: str) -> contextlib.AbstractContextManager: ...

    def warn(self, text: str) -> None: ...


class Silent:
    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        yield

    def warn(self, text: str) -> None:
        pass

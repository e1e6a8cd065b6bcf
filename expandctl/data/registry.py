"""The data sources that a spec (``--data SPEC``) names, one :class:`DataSource` per source. Torch-free.

A spec is ``NAME`` or ``NAME:ARG``. Each module of :mod:`expandctl.data.sources` registers its sources
(name, grammar, help line, reader) when this module is imported, so adding a source is one module there;
the ``--data`` help (:func:`spec_help`), the errors of :func:`parse_spec` and docs/train.md's table
(:func:`markdown_table`, rewritten by ``python -m expandctl.data --write docs/train.md``) read the registry.
The readers return torch-free data (:mod:`expandctl.data.raw`); :mod:`expandctl.data.pipeline` turns it
into datasets. Nothing here imports torch, so the CLI's ``--help`` can read it at once.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

__all__ = [
    "SOURCES",
    "DataSource",
    "markdown_table",
    "parse_spec",
    "register",
    "source",
    "sources",
    "spec_help",
    "sync_docs",
]

#: The markers around the generated table in docs/train.md.
DOCS_BEGIN = "<!-- data-sources:begin (generated: python -m expandctl.data --write docs/train.md) -->"
DOCS_END = "<!-- data-sources:end -->"


@dataclass(frozen=True)
class DataSource:
    """One source of data.

    ``grammar`` is how a spec names it: ``"digits"`` (no argument), ``"imagefolder:DIR"`` (argument
    required) or ``"cifar10[:DIR]"`` (optional). ``help`` is its one line for ``--help`` and listings;
    ``doc`` and ``split`` are its row in docs/train.md (``doc`` defaults to ``help``). ``read(arg, options,
    shape)`` gets the spec's argument (or ``None``), the :class:`~expandctl.data.options.DataOptions` and the
    model's ``(C, H, W)`` (or ``None``) and returns an :class:`~expandctl.data.raw.ArraySplits` or
    :class:`~expandctl.data.raw.ImageFiles`. ``downloadable``: ``download=True`` can fetch it. Sources are
    listed by ``order``, then name.
    """

    name: str
    grammar: str
    help: str
    read: Callable[..., Any]
    order: int = 100
    downloadable: bool = False
    takes_val_fraction: bool = False
    doc: str = ""
    split: str = ""

    @property
    def takes_arg(self) -> bool | None:
        """``False``: no argument; ``True``: one is required; ``None``: optional."""
        rest = self.grammar[len(self.name) :]
        return False if not rest else (None if rest.startswith("[") else True)

    @property
    def arg_is_folder(self) -> bool:
        """The argument is a folder (the grammar says ``DIR``), which must exist."""
        return self.grammar.removesuffix("]").endswith(":DIR")


#: name -> source, in registration order (:func:`sources` sorts them).
SOURCES: dict[str, DataSource] = {}


def register(src: DataSource) -> DataSource:
    """Add ``src`` to the registry; its name must be new and its grammar ``NAME``, ``NAME:ARG`` or ``NAME[:ARG]``."""
    rest = src.grammar[len(src.name) :]
    if src.name != src.name.lower() or not src.grammar.startswith(src.name) or ":" in src.name:
        raise ValueError(f"data source {src.name!r}: the name must be lower case and start its grammar {src.grammar!r}")
    if rest and not (rest.startswith(":") or (rest.startswith("[:") and rest.endswith("]"))):
        raise ValueError(f"data source {src.name!r}: grammar {src.grammar!r} must be NAME, NAME:ARG or NAME[:ARG]")
    if src.name in SOURCES:
        raise ValueError(f"data source {src.name!r} is already registered")
    SOURCES[src.name] = src
    return src


def sources() -> list[DataSource]:
    """The registered sources in the order of the help."""
    return sorted(SOURCES.values(), key=lambda s: (s.order, s.name))


def source(name: str) -> DataSource:
    """The source called ``name`` (a :func:`parse_spec` result)."""
    return SOURCES[name]


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10:/data/c10"`` -> ``("cifar10", "/data/c10")``, validated against the registry."""
    name, sep, arg = spec.strip().partition(":")
    name = name.lower()
    if name not in SOURCES:
        raise UsageError(f"unknown data spec {spec!r}; use one of {', '.join(_spec_forms())}")
    needs = SOURCES[name].takes_arg
    if needs and not arg:
        raise UsageError(f"data {name} needs a folder: {SOURCES[name].grammar}", option="data")
    if needs is False and sep:
        raise UsageError(f"data {name} takes no argument (got {spec!r})", option="data")
    return name, (arg or None)


def _spec_forms() -> list[str]:
    forms = {False: "{}", True: "{}:DIR", None: "{}[:ARG]"}
    return [forms[s.takes_arg].format(s.name) for s in sources()]


def spec_help() -> str:
    """The help of every ``--data`` option, read from the registry: ``digits | mnist5k | ... (see docs/train.md).``"""
    return " | ".join(s.grammar for s in sources()) + " (see docs/train.md)."


def markdown_table() -> str:
    """docs/train.md's table of the sources (spec, what, split), one row per source."""
    rows = ["| spec | what | split |", "|---|---|---|"]
    rows += [f"| `{s.grammar}` | {s.doc or s.help} | {s.split} |" for s in sources()]
    return "\n".join(rows) + "\n"


def sync_docs(text: str) -> str:
    """``text`` (docs/train.md) with the table between :data:`DOCS_BEGIN` and :data:`DOCS_END` regenerated."""
    head, begin, rest = text.partition(DOCS_BEGIN)
    _, end, tail = rest.partition(DOCS_END)
    if not begin or not end:
        raise UsageError(f"the text has no {DOCS_BEGIN} ... {DOCS_END} section")
    return f"{head}{DOCS_BEGIN}\n{markdown_table()}{DOCS_END}{tail}"


def _discover() -> None:
    """Import every module of :mod:`expandctl.data.sources`; each registers its sources."""
    package = importlib.import_module(f"{__package__}.sources")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{info.name}")


_discover()

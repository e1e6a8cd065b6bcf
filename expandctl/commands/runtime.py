"""What every command shares at run time: exit codes, the error guard, argument parsing, loading.

Torch-free at import (``--help`` must not load the library): whatever needs the library imports it when a
command runs. The one place where a library error's ``option`` becomes the command's flag is :func:`cli_message`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import typer
import typer.core

from ..console import UI, report_settings, report_table
from ..errors import CheckFailed, ExpandctlError, UsageError
from .options import DATA_ADAPTER_OPTIONS, LOAD_OPTIONS, OUTPUT_OPTIONS, extended_signature

#: Exit codes (documented in docs/cli.md). 1-4 come from the error classes' ``exit_code``.
EXIT_CODES = {
    0: "success",
    1: "check failed: an equivalence, ONNX export or INT8 accuracy (quantize --max-drop) check did not pass "
    "(nothing was written)",
    2: "usage error or bad input: missing/corrupt/unknown file, bad option, weights that do not fit --arch",
    3: "unsafe input refused: a pickle naming classes outside torch/torchvision (use --trust-pickle)",
    4: "unsupported model or layer: nothing to expand, a layer that cannot be expanded or exported, "
    "a fixed-size layer under --dynamic-size",
    5: "I/O error: a file could not be read or written (permissions, disk full)",
    70: "internal error: a bug in expandctl or a library it calls (rerun with --debug and report it)",
    130: "interrupted (Ctrl-C)",
}
EXIT_IO, EXIT_INTERNAL, EXIT_INTERRUPTED = 5, 70, 130


_RUNNING: contextvars.ContextVar = contextvars.ContextVar("expandctl_running_command", default=None)


class Command(typer.core.TyperCommand):
    """Usage lines name required arguments plainly (``SRC``), as the docs do; Typer writes ``{SRC}``,
    which reads like a literal brace to type. Every expandctl command is registered with it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:  # one style of value placeholder in --help: SRC, --data SPEC, --epochs N
            if isinstance(param, typer.core.TyperArgument):
                param.display_type_rich = _no_type  # "SRC", not "SRC <str>"
            elif not getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = placeholder(param)

    def invoke(self, ctx):
        token = _RUNNING.set(ctx)  # what cli_message reads: this command's parameters
        try:
            return super().invoke(ctx)
        finally:
            _RUNNING.reset(token)

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(.*)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


#: The placeholder of an option that names none: by its name, else by its type.
PLACEHOLDERS = {
    "data": "SPEC", "teacher_arch": "SPEC", "teacher_arch_kwargs": "JSON", "optimizer": "sgd|adamw",
    "schedule": "paper|step|cosine", "decay_on": "factors|product", "forward": "fused|explicit",
    "device": "auto|cpu|cuda", "out": "DIR",
}  # fmt: skip


def placeholder(param) -> str:
    if param.name in PLACEHOLDERS:
        return PLACEHOLDERS[param.name]
    desc = getattr(param, "type_descriptor", None)
    if desc is not None and desc.is_path:
        return "PATH"
    kind = param.bare_type() if hasattr(param, "bare_type") else ""
    return {"int": "N", "float": "X"}.get(kind, "TEXT")


def _no_type(ctx) -> str:
    return ""


def cli_message(e: ExpandctlError) -> str:
    """A library error as the command line words it: each parameter the error names (``e.option``) called by
    the running command's flag (``epochs`` -> ``--epochs``) or argument (``src`` -> ``SRC``). The only such
    rewriting of library text."""
    ctx = _RUNNING.get()
    if not e.options or ctx is None:
        return str(e)
    names = {
        p.name: p.opts[0] if p.param_type_name == "option" else (p.metavar or p.name.upper())
        for p in ctx.command.params
        if p.name in e.options
    }
    return e.worded(names)


@contextlib.contextmanager
def guard(ui: UI) -> Iterator[None]:
    """Turn every failure into ``error: <sentence>`` on stderr (JSON on stdout) and an exit code."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except ExpandctlError as e:
        ui.error(cli_message(e), e.exit_code, getattr(e, "details", None), e)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        ui.error("interrupted; no output was written", EXIT_INTERRUPTED, exc=e)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except OSError as e:
        where = f" {str(e.filename)!r}" if e.filename else ""
        ui.error(f"cannot access{where}: {e.strerror or e}; check permissions and free space", EXIT_IO, exc=e)
        raise typer.Exit(EXIT_IO) from None
    except Exception as e:
        from ..shapes import backend_message

        ui.error(
            f"internal error ({type(e).__name__}: {backend_message(e, 300)}); rerun with --debug for the traceback "
            "and report it",
            EXIT_INTERNAL,
            exc=e,
        )
        raise typer.Exit(EXIT_INTERNAL) from None


@dataclass(frozen=True)
class ModelFlags:
    """``--arch``, ``--arch-kwargs`` and ``--trust-pickle`` as typed: how a command loads its model."""

    arch: str | None = None
    arch_kwargs: str | None = None
    trust_pickle: bool = False

    def library(self) -> dict:
        """The loading keywords of the library verbs (``arch_kwargs`` parsed)."""
        kwargs = parse_json_object(self.arch_kwargs)
        return {"arch": self.arch, "arch_kwargs": kwargs, "trust_pickle": self.trust_pickle}


def command(name: str, *, load: bool = False, data_adapters: bool = False) -> Callable:
    """Register-ready command function: appends the shared trailing options to ``fn``'s own (the data adapters
    of :data:`.options.DATA_ADAPTER_OPTIONS` with ``data_adapters``, ``--arch``/``--arch-kwargs``/
    ``--trust-pickle`` with ``load``, then ``--json``/``--quiet``/``--debug``) and calls ``fn`` inside
    :func:`guard` with ``ui=`` (its console), ``model=`` (:class:`ModelFlags`, with ``load``) and ``adapters=``
    (a dict of the data adapters, with ``data_adapters``)."""
    groups = {"adapters": DATA_ADAPTER_OPTIONS if data_adapters else {}, "model": LOAD_OPTIONS if load else {}}

    def wrap(fn: Callable) -> Callable:
        sig = extended_signature(fn, *groups.values(), OUTPUT_OPTIONS, drop=("ui", *groups))

        @functools.wraps(fn)
        def run(**kwargs):
            ui = UI(name, *(kwargs.pop(n) for n in OUTPUT_OPTIONS))
            if data_adapters:
                kwargs["adapters"] = {n: kwargs.pop(n) for n in DATA_ADAPTER_OPTIONS}
            if load:
                kwargs["model"] = ModelFlags(*(kwargs.pop(n) for n in LOAD_OPTIONS))
            with guard(ui):
                return fn(ui=ui, **kwargs)

        run.__signature__ = sig
        run.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
        return run

    return wrap


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"--input-shape {text!r} is not a list of positive integers like 3,224,224 (no batch size)")
    return shape


def parse_json_object(text: str | None, option: str = "--arch-kwargs") -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"{option} is not valid JSON ({e.msg} at character {e.pos}); e.g. '{{\"num_classes\": 10}}'"
        ) from None
    if not isinstance(value, dict):
        raise UsageError(f"{option} must be a JSON object like '{{\"num_classes\": 10}}', got {text!r}")
    return value


def load_for_cli(ui: UI, path: str, arch, arch_kwargs, trust: bool):
    from ..workflows import load_checked

    return load_checked(path, arch, parse_json_object(arch_kwargs), trust, ui)


def data_options(channels=None, image_size=None, augment=None, train_subset=None, download=False, val_fraction=None):
    """The data adapter options of ``train``, ``evaluate`` and ``analyze``, validated."""
    from ..data import DataOptions

    augment = augment.lower() if augment else None
    return DataOptions(channels, image_size, augment, train_subset, download, val_fraction).validate()


_ARGV: list[str] | None = None  # set by expandctl.cli.main(): the exact command line, for provenance


def command_line(ctx: typer.Context) -> str:
    """The command line as typed (through :func:`expandctl.cli.main`), else rebuilt from the parsed parameters
    (when called in-process, e.g. by CliRunner, where ``sys.argv`` belongs to someone else)."""
    if _ARGV is not None:
        return shlex.join(["expandctl", *_ARGV])
    parts = ["expandctl", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or value == [] or value == ():
            continue
        if param.param_type_name == "argument":
            parts.append(str(value))
        elif isinstance(value, bool):
            parts.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                parts += [param.opts[0], str(v)]
    return shlex.join(parts)


def show_reports(ui: UI, reports: Sequence, title: str) -> None:
    if not reports:
        return
    table = report_table(reports)
    table.title = title
    ui.detail(table)
    ui.detail(report_settings(reports))
    for n in dict.fromkeys(n for r in reports for n in r.notes):
        ui.note(f"note: {n}")


@contextlib.contextmanager
def reports_on_failure(ui: UI) -> Iterator[None]:
    """A failed check's reports as a table before its one-line error (the workflows attach them)."""
    try:
        yield
    except CheckFailed as e:
        if getattr(e, "reports", None) is not None:
            show_reports(ui, e.reports, e.reports_title)
        raise

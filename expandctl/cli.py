"""``expandctl``: expand, contract, verify, export and inspect models on safe checkpoints.

This module parses arguments, calls the library and prints; nothing else. Every command takes
``--json`` (exactly one JSON object on stdout, also on error), ``--quiet`` (no progress) and
``--debug`` (tracebacks). Exit codes: see :data:`expandctl.commands.runtime.EXIT_CODES` and docs/cli.md.

Torch-free: every command module imports the library when its command runs, so ``expandctl --help`` and
``expandctl CMD --help`` answer without loading torch (tests/test_architecture.py keeps it so).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ._version import __version__
from .commands import (
    analyze,
    compare,
    contract,
    evaluate,
    expand,
    export,
    inspect,
    plot,
    quantize,
    runtime,
    train,
    verify,
)
from .commands.runtime import EXIT_INTERRUPTED, Command

app = typer.Typer(
    name="expandctl",
    help="Train compact CNNs as linear over-parameterised chains (ExpandNets), contract them back exactly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"expandctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Expand a model for training, contract it back exactly, verify and export it."""


#: Every command: its name and the function (or sub-app) of its module in expandctl/commands/, in --help order.
COMMANDS = [
    ("expand", expand.expand),
    ("contract", contract.contract),
    ("verify", verify.verify),
    ("export", export.export),
    ("inspect", inspect.inspect),
    ("evaluate", evaluate.evaluate),
    ("train", train.train),
    ("analyze", analyze.analyze_app),
    ("plot", plot.plot),
    ("compare", compare.compare),
    ("quantize", quantize.quantize),
]
for _name, _command in COMMANDS:
    if isinstance(_command, typer.Typer):
        app.add_typer(_command, name=_name)
    else:
        app.command(_name, cls=Command)(_command)


def _usage_error(e) -> int:
    """Click's usage error as every other error: one line ``error: ...`` on stderr (and, with
    ``--json``, the same keys as :meth:`expandctl.console.UI.error` on stdout)."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path.partition(" ")[2] if ctx is not None else ""
    message = " ".join(e.format_message().split())
    if "--json" in sys.argv[1:]:
        payload = {
            "ok": False,
            "command": command or None,
            "error": message,
            "exit_code": e.exit_code,
            "error_type": type(e).__name__,
        }
        sys.stdout.write(json.dumps(payload) + "\n")
    help_cmd = " ".join(["expandctl", *([command] if command else []), "--help"])
    sys.stderr.write(f"error: {message.rstrip('.')}; see '{help_cmd}'\n")
    return e.exit_code


def main() -> None:
    """Console-script entry point: click's own usage errors also honour ``--json``."""
    runtime._ARGV = sys.argv[1:]
    try:
        rv = app(prog_name="expandctl", standalone_mode=False)
    except typer.TyperException as e:  # click's usage errors (missing option, bad value...)
        if "NoArgsIsHelp" in type(e).__name__:  # a bare command group: its help, as asked
            e.show()
            rv = e.exit_code
        else:
            rv = _usage_error(e)
    except typer.Abort:
        rv = EXIT_INTERRUPTED
    finally:
        runtime._ARGV = None
    sys.exit(rv if isinstance(rv, int) else 0)

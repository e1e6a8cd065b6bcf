"""Rich output for the CLI: tables for plans, reports and checkpoints, a progress spinner, errors.

The library never prints; only :mod:`expandctl.cli` uses this module. With ``--json`` nothing
here writes to stdout: the CLI prints exactly one JSON object there instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _width() -> int | None:
    # A pipe or CI log is not a terminal: rich would wrap at 80 columns and squash the tables.
    return None if sys.stdout.isatty() else 200


class UI:
    """The output of one command: human (rich) or machine (one JSON object on stdout)."""

    def __init__(self, command: str, json_mode: bool = False, quiet: bool = False, debug: bool = False):
        self.command = command
        self.json = json_mode
        self.quiet = quiet
        self.debug = debug
        self.out = Console(highlight=False, width=_width(), quiet=json_mode)
        self.err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
        self.progress = not (json_mode or quiet) and sys.stdout.isatty() and sys.stderr.isatty()

    # --- progress and messages -----------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        """A spinner on stderr while something slow runs (only on a terminal, not with --quiet/--json)."""
        if not self.progress:
            yield
            return
        with self.err.status(escape(text), spinner="dots"):
            yield

    def note(self, text: str) -> None:
        """An informational line on stderr (hidden by --quiet and --json)."""
        if not (self.quiet or self.json):
            self.err.print(f"[dim]{escape(text)}[/dim]")

    def warn(self, text: str) -> None:
        if not self.json:
            self.err.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)

    def print(self, *objects: Any) -> None:
        """The command's result (its final line, or what ``inspect`` shows): printed even with --quiet."""
        self.out.print(*objects)

    def detail(self, *objects: Any) -> None:
        """Tables and lines on the way to the result (plans, check reports): hidden by --quiet."""
        if not self.quiet:
            self.out.print(*objects)

    def emit(self, data: dict) -> None:
        """The command's result: one JSON object with ``--json``; nothing otherwise (tables do it)."""
        if self.json:
            sys.stdout.write(json.dumps({"ok": True, "command": self.command, **data}, default=_jsonable) + "\n")
            sys.stdout.flush()

    def error(
        self, message: str, exit_code: int, details: dict | None = None, exc: BaseException | None = None
    ) -> None:
        if self.debug and exc is not None:
            self.err.print("".join(traceback.format_exception(exc)), markup=False, highlight=False)
        if self.json:
            payload = {"ok": False, "command": self.command, "error": message, "exit_code": exit_code}
            if exc is not None:
                payload["error_type"] = type(exc).__name__
            payload.update(details or {})
            sys.stdout.write(json.dumps(payload, default=_jsonable) + "\n")
            sys.stdout.flush()
        self.err.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)  # one line, greppable


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------
def fmt_rate(rate: float | None) -> str:
    """``rate 4`` or, when none was given, ``default rates`` (each kind's own)."""
    return "default rates" if rate is None else f"rate {rate:g}"


def fmt_count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def fmt_err(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3g}"


def plan_table(plan, only_expanded: bool = False) -> Table:
    t = Table(title=f"plan: strategy {plan.strategy}, {fmt_rate(plan.rate)}", title_justify="left")
    fitted = any(e.fit_residual is not None for e in plan.entries)
    for col in ("path", "layer", "shape", "expansion", "factors", "params", *(["fit residual"] if fitted else [])):
        t.add_column(col, overflow="fold")
    if not only_expanded:
        t.add_column("reason left alone", overflow="fold", style="dim")
    for e in plan.entries:
        if only_expanded and e.kind is None:
            continue
        params = (
            f"{fmt_count(e.params_before)} -> {fmt_count(e.params_after)}" if e.kind else fmt_count(e.params_before)
        )
        path = e.path + (f" (= {', '.join(e.aliases)})" if e.aliases else "")
        row = [
            escape(path),
            e.layer,
            escape(e.shape),
            (e.kind + (" (fused only)" if e.note else "")) if e.kind else "-",
            escape(", ".join(e.factors)) or "-",
            params,
            *([fmt_residual(e.fit_residual)] if fitted else []),
        ]
        t.add_row(*row, *([] if only_expanded else [escape(e.reason or "")]))
    return t


def report_table(reports: Sequence) -> Table:
    """One row per output of each report: the numbers a reviewer needs to trust (or not) a check."""
    t = Table(title_justify="left")
    for col in ("check", "dtype", "output", "max abs err", "max rel err", "atol", "rtol", "result"):
        t.add_column(col, overflow="fold")
    for r in reports:
        for o in r.outputs:
            result = "[green]pass[/green]" if o.passed else "[bold red]FAIL[/bold red]"
            if o.reason:
                result += f" ({escape(o.reason)})"
            t.add_row(
                r.kind,
                r.dtype,
                escape(o.name),
                fmt_err(o.max_abs),
                fmt_err(o.max_rel),
                f"{r.atol:g}",
                f"{r.rtol:g}",
                result,
            )
    return t


def report_settings(reports: Sequence) -> str:
    """How the inputs were drawn, once per distinct setting (checks may use different sample counts)."""
    lines = {}
    for r in reports:
        shape = ",".join(map(str, r.input_shape))
        text = f"seed {r.seed}, {r.samples} random batches of {r.batch} x ({shape}), eval mode"
        lines.setdefault(text, []).append(r.kind)
    if len(lines) == 1:
        return next(iter(lines))
    return "\n".join(f"{', '.join(dict.fromkeys(kinds))}: {text}" for text, kinds in lines.items())


def kv_table(rows: Sequence[tuple[str, Any]], title: str | None = None) -> Table:
    t = Table(show_header=False, title=title, title_justify="left", box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for key, value in rows:
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        t.add_row(key, escape("-" if value is None or value == "" else str(value)))
    return t


def fmt_residual(x: float | None) -> str:
    """A preserve fit's relative residual; ``-`` where no fit ran (scratch init, or an exact construction)."""
    return "-" if x is None else f"{x:.2g}"


def layers_table(rows: Sequence[dict]) -> Table:
    t = Table(title="expanded layers", title_justify="left")
    fitted = any(r.get("fit_residual") is not None for r in rows)
    for col in ("path", "kind", "factors", "params", "compact params", *(["fit residual"] if fitted else [])):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(
            escape(r["path"]),
            r["kind"],
            escape(r["factors"]),
            fmt_count(r["params"]),
            fmt_count(r["compact_params"]),
            *([fmt_residual(r.get("fit_residual"))] if fitted else []),
        )
    return t


def graph_plan_table(plan) -> Table:
    """``contract --graph``'s regions: what each covers, what it became, parameters, error, merged or why not."""
    t = Table(title=f"linear regions: {len(plan.merged)} of {len(plan.regions)} merged", title_justify="left")
    for col in ("region", "input -> output", "modules", "became", "params", "float64 err", "merged"):
        t.add_column(col, overflow="fold")
    for r in plan.regions:
        mods = ", ".join(r.modules[:4]) + (f" (+{len(r.modules) - 4})" if len(r.modules) > 4 else "")
        t.add_row(
            escape(r.name or "-"),
            escape(f"{r.root} -> {r.output}"),
            escape(mods),
            r.became,
            f"{fmt_count(r.params_before)} -> {fmt_count(r.params_after)}",
            fmt_err(r.error),
            "yes" if r.merged else f"no: {escape(r.reason or '')}",
        )
    return t


def left_alone_table(plan) -> Table:
    """Linear steps that could not join the region before them, and why."""
    t = Table(title="left alone", title_justify="left")
    for col in ("at", "operation", "reason"):
        t.add_column(col, overflow="fold")
    for item in plan.left_alone:
        t.add_row(escape(item["at"]), escape(str(item["kind"])), escape(item["reason"]))
    return t

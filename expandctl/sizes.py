"""How big a model is and will be: parameter counts, the memory an expansion needs, refusals before allocation."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch.nn as nn

from .console import fmt_rate
from .errors import UsageError


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: A plan whose expanded model has more than this many times the compact model's parameters gets a warning.
FAR_BEYOND_COMPACT = 50


def available_memory() -> int | None:
    """Bytes this machine can still allocate without swapping (``MemAvailable``), else free physical memory."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def check_expanded_size(model: nn.Module, plan, what: str = "the expanded model", refuse: bool = True) -> list[str]:
    """Estimate the expanded model's size from ``plan`` before anything is allocated: a
    :class:`UsageError` when its parameters alone cannot fit in the memory this machine has
    available (``refuse=False``, a dry run: a warning saying so), and the warnings to show with the
    plan (a model far beyond compact: the factor)."""
    compact = count_params(model)
    expanded = compact - plan.params_before + plan.params_after
    itemsize = next((p.element_size() for p in model.parameters()), 4)
    need, have = expanded * itemsize, available_memory()
    warnings = []
    factor = expanded / compact if compact else 1.0
    if factor > FAR_BEYOND_COMPACT:
        warnings.append(
            f"{what} has {expanded:,} parameters, {factor:,.0f}x the compact model's {compact:,} "
            f"({plan.strategy}, {fmt_rate(plan.rate)}); check --rate"
        )
    if have is not None and need > have:
        error = UsageError(
            f"{what} would need {fmt_bytes(need)} for its {expanded:,} parameters alone ({plan.strategy}, "
            f"{fmt_rate(plan.rate)}), but this machine has {fmt_bytes(have)} of memory available; "
            "lower rate or expand fewer layers (include/exclude)",
            option=("rate", "include", "exclude"),
        )
        if refuse:
            raise error
        warnings.append(f"refused without --dry-run: {error}")
    return warnings

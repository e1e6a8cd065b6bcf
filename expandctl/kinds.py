"""The built-in expansion kinds: each one's strategy name, one-line summary and default rate.

Standard library only, so that ``expandctl expand --help`` can show ``--strategy`` and ``--rate``
without loading torch. The layer classes in :mod:`expandctl.layers` take their ``summary`` and
``default_rate`` from here; a kind a user registers (:func:`expandctl.register_expansion`) brings
its own attributes and is not listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Kind", "KINDS", "strategy_help", "rate_help"]


@dataclass(frozen=True)
class Kind:
    """One built-in strategy name (``--strategy``) and what the help says of it."""

    name: str
    #: One line for the CLI help and the docs.
    summary: str
    #: Rate used when the caller gives none (``None``: the kind has no width to set).
    default_rate: float | None


#: The built-in kinds, in the order of the CLI help (and of registration in :mod:`expandctl.layers`):
#: ExpandNets' chains, then the parallel-branch kinds.
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("fc", "Linear -> 3 Linears (ExpandNets FC)", 4.0),
        Kind("cl", "conv -> 1x1, kxk, 1x1 chain (ExpandNets CL)", 4.0),
        Kind("ck", "conv k>3 -> chain of 3x3 convs (ExpandNets CK)", 4.0),
        Kind("acb", "kxk, 1xk, kx1 branches, each +BN (ACNet)", None),
        Kind("rep", "kxk, 1x1, identity branches, each +BN (RepVGG)", None),
        Kind("dbb", "kxk, 1x1, 1x1-avg, 1x1-kxk branches, each +BN (DBB)", 1.0),
        Kind("orepa", "DBB's branches scaled, one BN, composed every step (OREPA)", 1.0),
    )
}


def strategy_help() -> str:
    """The ``--strategy`` help: every built-in kind with its summary."""
    listed = "; ".join(f"{k.name}: {k.summary}" for k in KINDS.values())
    return f"'+'-joined expansion kinds ({listed})."


def rate_help() -> str:
    """The ``--rate`` help: the kinds grouped by default rate."""
    by_rate: dict[float | None, list[str]] = {}
    for k in KINDS.values():
        by_rate.setdefault(k.default_rate, []).append(k.name)
    defaults = ", ".join(f"{'/'.join(ks)} {'unused' if r is None else f'{r:g}'}" for r, ks in by_rate.items())
    return f"Expansion rate r >= 1 (hidden widths r*m, r*n); default per kind: {defaults}."

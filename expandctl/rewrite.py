"""Plan, expand and contract any module tree, replacing layers by dotted path.

Nothing here mutates the caller's model unless ``inplace=True``. Modules shared by several
paths stay shared: they are expanded (or contracted) once and put back at every path. Finding the
expanded layers and their layout (:func:`expanded_layers`, :func:`layout`, :func:`apply_layout`,
:func:`set_module`) lives in :mod:`expandctl.layers.tree`, which checkpoints rebuild with; they are
part of this module's API as well.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from .errors import AlreadyExpandedError, NothingToExpandError, UnsupportedError, UsageError
from .fold import absorb_shifts
from .layers import EXPANSIONS, FORWARD_MODES, ExpandedLayer, expansion_for, factor_parameters, fused_only_reason
from .layers.tree import (
    apply_layout,
    describe_layer,
    expand_at,
    expanded_layers,
    is_quantized,
    layout,
    set_module,
    walk,
)

__all__ = [
    "PlanEntry",
    "Plan",
    "parse_strategy",
    "plan",
    "expand",
    "contract",
    "set_forward",
    "expanded_layers",
    "layout",
    "apply_layout",
    "set_module",
]

#: Methods by which other codebases' blocks merge their own branches (timm, RepVGG, MobileOne, YOLO, DBB).
REPARAM_METHODS = ("reparameterize", "switch_to_deploy", "fuse", "get_equivalent_kernel_bias", "fuse_reparam")

#: A plan entry's reason for an expanded layer.
ALREADY_EXPANDED = "already expanded"


@dataclass
class PlanEntry:
    """One candidate layer: what would happen to it, and why."""

    path: str
    layer: str
    shape: str
    kind: str | None
    factors: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    reason: str | None = None
    aliases: list[str] = field(default_factory=list)
    hidden: list[int] = field(default_factory=list)
    #: For an expanded layer that can only run fused (a subclass with its own forward): why.
    note: str | None = None
    #: After ``init="preserve"``: the relative residual of the chain's fit to the original kernel
    #: (:attr:`ExpandedLayer.fit_residual`; CK fits by least squares), else ``None``.
    fit_residual: float | None = None
    #: The re-parameterisable block the layer already sits in (``"Class at path"``): a module above it
    #: with a merge method of its own (:data:`REPARAM_METHODS`), whose branches would get branches.
    block: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    """The list of candidate layers, in module order, with the settings that produced it."""

    entries: list[PlanEntry]
    strategy: str
    #: ``None``: every kind used its own default (``ExpandedLayer.default_rate``).
    rate: float | None
    pointwise: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def expanded(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.kind is not None]

    def why_nothing(self) -> str:
        """Why no layer is selected: the --include/--exclude patterns, or the strategy."""
        if not self.entries:
            return "this model has no Linear or convolution layer"
        if self.include and all(e.reason == "not matched by --include" for e in self.entries):
            shown = ", ".join(e.path for e in self.entries[:4]) + (", ..." if len(self.entries) > 4 else "")
            return (
                f"--include {' '.join(repr(p) for p in self.include)} matches none of the "
                f"{len(self.entries)} candidate layers ({shown}); check the pattern against these paths"
            )
        if self.exclude and all(
            e.reason in ("excluded by --exclude", "not matched by --include") for e in self.entries
        ):
            return f"--exclude {' '.join(repr(p) for p in self.exclude)} leaves no candidate layer"
        done = [e.path for e in self.entries if e.reason == ALREADY_EXPANDED]
        if done:
            shown = ", ".join(done[:4]) + (", ..." if len(done) > 4 else "")
            return (
                f"this model is already expanded ({len(done)} of its {len(self.entries)} candidate layers: "
                f"{shown}); train it as it is, or contract it first to expand it anew"
            )
        return f"strategy {self.strategy!r} selects no layer of this model ({len(self.entries)} candidates)"

    def nothing_selected(self, hint: str) -> UnsupportedError:
        """The error for a plan that expands nothing: :class:`AlreadyExpandedError` (no ``hint``, its
        sentence says what to do) when what is left is already expanded, else ``why_nothing; hint``."""
        why = self.why_nothing()
        if why.startswith("this model is already expanded"):
            return AlreadyExpandedError(why)
        return NothingToExpandError(f"{why}; {hint}")

    def in_blocks(self) -> str | None:
        """A warning when expanded layers already sit in re-parameterisable blocks, else ``None``."""
        inside = [e for e in self.expanded if e.block]
        if not inside:
            return None
        blocks = sorted({e.block.split(" at ")[0] for e in inside})
        return (
            f"{len(inside)} of the {len(self.expanded)} layers to expand already sit in re-parameterisable blocks "
            f"({', '.join(blocks[:3])}{', ...' if len(blocks) > 3 else ''}): their branches would get branches of "
            "their own; to deploy such a model as it is, `expandctl contract --graph` merges its blocks"
        )

    @property
    def params_before(self) -> int:
        return sum(e.params_before for e in self.expanded)

    @property
    def params_after(self) -> int:
        return sum(e.params_after for e in self.expanded)

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "rate": self.rate,
            "pointwise": self.pointwise,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "layers": [e.to_dict() for e in self.entries],
        }


def parse_strategy(strategy: str | Iterable[str]) -> tuple[str, ...]:
    """``"ck+fc"`` -> ``("ck", "fc")``, validated against the registry."""
    parts = strategy.split("+") if isinstance(strategy, str) else list(strategy)
    parts = [p.strip().lower() for p in parts if p.strip()]
    unknown = [p for p in parts if p not in EXPANSIONS]
    if unknown or not parts:
        raise UsageError(
            f"unknown strategy {'+'.join(unknown) or repr(strategy)}; "
            f"use a '+'-joined set of {', '.join(sorted(EXPANSIONS))} (e.g. ck+fc)"
        )
    return tuple(dict.fromkeys(parts))


def _check_rate(rate: float | None) -> float | None:
    if rate is None:
        return None
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise UsageError(f"rate must be a number >= 1, got {rate!r}") from None
    if not rate >= 1 or rate != rate or rate == float("inf"):
        raise UsageError(f"rate must be >= 1 (got {rate:g}): a narrower chain restricts the rank of the layer")
    return rate


def _params(module: nn.Module) -> int:
    return sum(
        p.numel() for p in module.parameters(recurse=False) if not isinstance(p, nn.parameter.UninitializedParameter)
    )


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _choose(module: nn.Module, kinds: Sequence[str], pointwise: bool) -> tuple[str | None, str | None]:
    """The highest-priority kind in ``kinds`` that accepts ``module``, else the reason none does."""
    if isinstance(module, ExpandedLayer):
        return None, ALREADY_EXPANDED
    if is_quantized(module):
        return None, "quantized layers are not supported"
    relevant = [cls for cls in (expansion_for(k, module) for k in kinds) if cls is not None]
    if not relevant:
        needs = [k for k in EXPANSIONS if expansion_for(k, module) is not None]
        return None, f"not selected by the strategy (a {type(module).__name__} takes {' or '.join(needs) or 'none'})"
    reason = None
    for cls in sorted(relevant, key=lambda c: -c.priority):
        reason = cls.accepts(module, pointwise)
        if reason is None:
            return cls.kind, None
    return None, reason  # the most general kind's reason (e.g. "1x1 convolution", not "kernel <= 3")


def plan(
    model: nn.Module,
    strategy: str | Iterable[str] = "ck+fc",
    rate: float | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    pointwise: bool = False,
) -> Plan:
    """What :func:`expand` would do to each candidate layer, and the reason for any left alone."""
    kinds = parse_strategy(strategy)
    rate = _check_rate(rate)
    include, exclude = tuple(include), tuple(exclude)
    blocks = {
        path: f"{type(m).__name__} at {path or '<root>'}"
        for path, m in model.named_modules()
        if any(callable(getattr(m, name, None)) for name in REPARAM_METHODS)
    }
    entries = []
    for module, paths, inside in walk(model):
        if inside is not None:
            continue
        path = paths[0]
        name, shape = describe_layer(module)
        entry = PlanEntry(path or "<root>", name, shape, None, params_before=_params(module), aliases=paths[1:])
        entry.params_after = entry.params_before
        if include and not any(_matches(p, include) for p in paths):
            entry.reason = "not matched by --include"
        elif exclude and any(_matches(p, exclude) for p in paths):
            entry.reason = "excluded by --exclude"
        else:
            kind, entry.reason = _choose(module, kinds, pointwise)
            if kind is not None:
                cls = expansion_for(kind, module)
                entry.kind = kind
                entry.hidden = cls.hidden_for(module, rate if rate is not None else cls.default_rate)
                entry.factors, entry.params_after = factor_parameters(cls, module, entry.hidden)
                entry.note = fused_only_reason(module)
                entry.block = _enclosing(path, blocks)
        entries.append(entry)
    return Plan(entries, "+".join(kinds), rate, pointwise, include, exclude)


def _enclosing(path: str, blocks: dict[str, str]) -> str | None:
    """The innermost block in ``blocks`` (by path) strictly above the module at ``path``."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        found = blocks.get(".".join(parts[:i]))
        if found is not None:
            return found
    return None


def _check_already_expanded(model, kinds, include, exclude, pointwise):
    for module, paths, inside in walk(model):
        if inside is None:
            continue
        if include and not any(_matches(p, include) for p in paths):
            continue
        if exclude and any(_matches(p, exclude) for p in paths):
            continue
        if not isinstance(module, ExpandedLayer) and _choose(module, kinds, pointwise)[0] is not None:
            raise AlreadyExpandedError(
                f"layer {paths[0]!r} is a factor of the expanded layer {inside!r}; contract the model first "
                f"or exclude it (--exclude '{inside}.*')"
            )


def expand(
    model: nn.Module,
    strategy: str | Iterable[str] = "ck+fc",
    rate: float | None = None,
    init: str = "scratch",
    forward: str = "fused",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    pointwise: bool = False,
    inplace: bool = False,
    seed: int | None = None,
) -> nn.Module:
    """Replace the layers selected by ``strategy`` with expanded chains (see :func:`plan`).

    ``init="scratch"`` initialises each factor as a fresh layer of its shape (the paper's
    setting); ``"preserve"`` makes the expanded model compute the same function as ``model``.
    Raises :class:`NothingToExpandError` if no layer is selected (:class:`AlreadyExpandedError` when
    the layers left are already expanded).
    """
    kinds = parse_strategy(strategy)
    p = plan(model, kinds, rate, include, exclude, pointwise)
    _check_already_expanded(model, kinds, tuple(include), tuple(exclude), pointwise)
    if not p.expanded:
        raise p.nothing_selected("see the plan for the reasons")
    return expand_at(
        model, {e.path: {"kind": e.kind, "hidden": e.hidden} for e in p.expanded}, init, forward, inplace, seed
    )


def contract(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Multiply every expanded chain out into a layer of the original class. A model with no
    expanded layer comes back unchanged (a copy unless ``inplace``)."""
    if not inplace:
        model = copy.deepcopy(model)
    shifted = []
    for module, paths, inside in walk(model):
        if isinstance(module, ExpandedLayer) and inside is None:
            new = module.contract()
            if getattr(module, "source_bias", True) is False and new.bias is not None and len(paths) == 1:
                shifted.append(paths[0])
            for q in paths:
                model = set_module(model, q, new)
    if shifted:
        absorb_shifts(model, shifted)
    return model


def set_forward(model: nn.Module, mode: str) -> nn.Module:
    """Switch every expanded layer to ``"fused"`` or ``"explicit"``; returns ``model``."""
    if mode not in FORWARD_MODES:
        raise UsageError(f"unknown forward mode {mode!r}; use one of {', '.join(FORWARD_MODES)}")
    for _, layer in expanded_layers(model):
        layer.set_forward(mode)
    return model

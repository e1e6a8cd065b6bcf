"""Where the expanded layers sit in a module tree: find them, replace modules by dotted path, record
their layout and rebuild it on a fresh compact model (how a checkpoint is loaded).

Modules shared by several paths stay shared: each is expanded once and put back at every path.
:mod:`expandctl.rewrite` plans and expands on top of this; :mod:`expandctl.checkpoint` rebuilds with it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn as nn

from ..errors import UsageError
from .base import EXPANSIONS, ExpandedLayer, expansion_for

__all__ = [
    "CANDIDATE_TYPES",
    "walk",
    "is_quantized",
    "describe_layer",
    "set_module",
    "expanded_layers",
    "layout",
    "apply_layout",
    "expand_at",
]

#: The layer types an expansion can replace.
CANDIDATE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


def is_quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))


def walk(model: nn.Module) -> list[tuple[nn.Module, list[str], str | None]]:
    """Every candidate module once, with all its paths and, if it sits inside an expanded layer,
    that layer's path. Does not descend into expanded layers' factors beyond recording them."""
    found: dict[int, tuple[nn.Module, list[str], str | None]] = {}

    def visit(module: nn.Module, prefix: str, inside: str | None, seen: set[int]):
        if isinstance(module, (*CANDIDATE_TYPES, ExpandedLayer)) or is_quantized(module):
            entry = found.setdefault(id(module), (module, [], inside))
            entry[1].append(prefix)
        if id(module) in seen:
            return
        seen = seen | {id(module)}
        if isinstance(module, ExpandedLayer) and inside is None:
            inside = prefix
        for name, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}.{name}" if prefix else name, inside, seen)

    visit(model, "", None, set())
    return list(found.values())


def describe_layer(module: nn.Module) -> tuple[str, str]:
    """``(class name, shape)`` of a candidate layer as plans and messages show it (``"Conv2d", "3->8 5x5 s2"``)."""
    name = type(module).__name__
    if isinstance(module, nn.Linear) and not isinstance(module.weight, nn.parameter.UninitializedParameter):
        return name, f"{module.in_features}->{module.out_features}"
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(
        module.weight, nn.parameter.UninitializedParameter
    ):
        parts = [f"{module.in_channels}->{module.out_channels}", "x".join(map(str, module.kernel_size))]
        if max(module.stride) > 1:
            parts.append(f"s{'x'.join(map(str, module.stride)) if len(set(module.stride)) > 1 else module.stride[0]}")
        if max(module.dilation) > 1:
            parts.append(f"d{module.dilation[0] if len(set(module.dilation)) == 1 else module.dilation}")
        if module.groups > 1:
            parts.append("dw" if module.groups == module.in_channels == module.out_channels else f"g{module.groups}")
        if module.padding_mode != "zeros":
            parts.append(module.padding_mode)
        return name, " ".join(parts)
    return name, ""


def set_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``path``; returns the new root (``path == ""`` replaces the root)."""
    if path in ("", "<root>"):
        return new
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)
    return model


def expanded_layers(model: nn.Module) -> Iterator[tuple[str, ExpandedLayer]]:
    """``(path, layer)`` for every expanded layer (shared ones once)."""
    for module, paths, inside in walk(model):
        if isinstance(module, ExpandedLayer) and inside is None:
            yield paths[0] or "<root>", module


def layout(model: nn.Module) -> dict[str, dict]:
    """``{path: {"kind", "hidden"}}`` for every expanded layer: with :func:`apply_layout` it rebuilds
    the same structure on a fresh compact model (how checkpoints are loaded)."""
    return {path: layer.config() for path, layer in expanded_layers(model)}


def apply_layout(
    model: nn.Module, spec: dict[str, dict], forward: str = "fused", inplace: bool = False, seed: int | None = None
) -> nn.Module:
    """Expand exactly the layers named in ``spec`` (from :func:`layout`), with scratch init."""
    return expand_at(model, spec, "scratch", forward, inplace, seed)


@contextlib.contextmanager
def _seeded(seed: int | None):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def expand_at(
    model: nn.Module, spec: dict[str, dict], init: str, forward: str, inplace: bool, seed: int | None
) -> nn.Module:
    """Expand the layer at each path of ``spec`` (``{path: {"kind", "hidden"}}``) with ``init``."""
    if not inplace:
        model = copy.deepcopy(model)
    by_path = {paths[0] or "<root>": (module, paths) for module, paths, inside in walk(model) if inside is None}
    with _seeded(seed):
        for path, cfg in spec.items():
            if path not in by_path:
                raise UsageError(f"the model has no layer {path!r} to expand")
            module, paths = by_path[path]
            if cfg["kind"] not in EXPANSIONS:
                raise UsageError(f"unknown expansion kind {cfg['kind']!r} for layer {path!r}")
            cls = expansion_for(cfg["kind"], module)
            if cls is None:
                raise UsageError(f"layer {path!r} is a {type(module).__name__}, which {cfg['kind']!r} does not expand")
            reason = cls.accepts(module, pointwise=True)
            if reason is not None:
                raise UsageError(f"layer {path!r} cannot take a {cls.kind} expansion: {reason}")
            try:
                new = cls.from_module(module, cfg["hidden"], init=init, forward=forward)
            except UsageError as e:
                name, shape = describe_layer(module)
                raise UsageError(f"layer {path!r} ({name} {shape}) does not fit its {cls.kind} layout: {e}") from None
            for q in paths:
                model = set_module(model, q, new)
    return model

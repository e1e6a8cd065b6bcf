"""Tracing any model with torch.fx, keeping what cannot be traced as opaque leaves.

A module whose ``forward`` fails to trace (data-dependent control flow, shape arithmetic on
proxies, ...) becomes a single ``call_module`` node, named in :attr:`Tracer.opaque` with the
first line of the reason; tracing goes on around it. Only a model whose own top-level ``forward``
fails is untraceable as a whole (:class:`Untraceable`).
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["Tracer", "Untraceable", "trace", "run_values"]


class Untraceable(Exception):
    """The model's own forward cannot be traced."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip().rstrip(":")


class Tracer(fx.Tracer):
    """``fx.Tracer`` that turns a module it cannot trace into an opaque leaf instead of failing."""

    def __init__(self) -> None:
        super().__init__()
        self.opaque: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        stack = dict(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # any failure inside: keep the module whole
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.opaque[path or type(m).__name__] = _first_line(e)
            return self.create_proxy("call_module", path, args, kwargs)


def _defaults(model: nn.Module, n_inputs: int | None) -> dict | None:
    """The forward's parameters past the ``n_inputs`` given, at their defaults (``mask=None``): traced as
    constants, so ``if mask is not None`` takes the branch the model takes when called with the inputs."""
    if n_inputs is None:
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    rest = [p for p in params[n_inputs:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    concrete = {p.name: p.default for p in rest if p.default is not inspect.Parameter.empty}
    return concrete or None


def trace(model: nn.Module, n_inputs: int | None = None) -> tuple[fx.GraphModule, dict[str, str]]:
    """``(graph module, {opaque module path: reason})``; raises :class:`Untraceable`. With ``n_inputs``,
    the forward's later parameters keep their defaults."""
    tracer = Tracer()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(model, concrete_args=_defaults(model, n_inputs))
    except Exception as e:
        raise Untraceable(_first_line(e)) from e
    if "" in tracer.opaque:
        raise Untraceable(tracer.opaque[""])
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, tracer.opaque


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        # a copy: an in-place operation later must not change what this node computed
        self.values[n] = out.clone() if isinstance(out, torch.Tensor) else out
        return out


@torch.no_grad()
def run_values(gm: fx.GraphModule, inputs: tuple) -> dict[fx.Node, object]:
    """The value of every node of ``gm`` on ``inputs`` (the caller chooses dtype and mode)."""
    rec = _Recorder(gm)
    rec.run(*inputs)
    return rec.values

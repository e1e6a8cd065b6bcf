"""The paper's "nonlinear init": a ReLU after every factor but the last for the first epochs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError
from ..layers import ChainLayer
from ..rewrite import expanded_layers, set_forward

__all__ = ["NonlinearWarmup", "check_warmup"]


def _relu_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return F.relu(output)


class NonlinearWarmup:
    """A ReLU after every factor but the last, while attached.

    Implemented with forward hooks on the factors (the modules stay purely linear, so a checkpoint
    saved meanwhile is still contractible); needs the explicit chain, as a fused forward never calls
    the factors.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def attach(self) -> None:
        if self.attached:
            return
        set_forward(self.model, "explicit")
        for _, layer in expanded_layers(self.model):
            for factor in layer.factors[:-1]:
                self.handles.append(factor.register_forward_hook(_relu_output))

    def detach(self, forward: str) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        set_forward(self.model, forward)

    def finish(self, forward: str) -> None:
        """Detach if attached (the warm-up is over), else nothing."""
        if self.attached:
            self.detach(forward)


def check_warmup(model: nn.Module) -> None:
    """Raise :class:`UsageError` (``option="nonlinear_warmup"``) unless ``model`` has serial chains only."""
    layers = list(expanded_layers(model))
    if not layers:
        raise UsageError(
            "nonlinear_warmup needs expanded layers, and this model has none (run expandctl expand)",
            option="nonlinear_warmup",
        )
    branched = [f"{p} ({layer.kind})" for p, layer in layers if not isinstance(layer, ChainLayer)]
    if branched:
        raise UsageError(
            "nonlinear_warmup puts ReLUs between the factors of serial chains (fc, cl, ck); "
            f"parallel-branch layers have none: {', '.join(branched[:3])}",
            option="nonlinear_warmup",
        )

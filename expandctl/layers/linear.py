"""FC expansion of ``nn.Linear`` (ExpandNets)."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .. import algebra
from ..kinds import KINDS
from .base import ChainLayer, check_modes, register_expansion, template_of
from .hosts import plain_forward_reason
from .preserve import preserve_exact

__all__ = ["ExpandedLinear"]


@register_expansion
class ExpandedLinear(ChainLayer):
    """FC expansion: ``Linear(m, n)`` -> ``Linear(m, h1)``, ``Linear(h1, h2)``, ``Linear(h2, n)``,
    with ``h1 = ceil(r m)``, ``h2 = ceil(r n)``; ``W = W3 W2 W1``, ``b = W3 (W2 b1 + b2) + b3``."""

    kind = "fc"
    summary, default_rate = KINDS[kind].summary, KINDS[kind].default_rate
    source_types = (nn.Linear,)

    @classmethod
    def accepts(cls, module, pointwise=False):
        if not isinstance(module, nn.Linear):
            return f"{type(module).__name__} is not a Linear layer"
        return plain_forward_reason(module, nn.Linear, ("forward",))

    @classmethod
    def hidden_for(cls, module, rate):
        return [algebra.hidden_width(module.in_features, rate), algebra.hidden_width(module.out_features, rate)]

    @classmethod
    def describe(cls, module, hidden):
        widths = [module.in_features, *hidden, module.out_features]
        bias = module.bias is not None
        descs = [f"Linear {a}->{b}" for a, b in zip(widths[:-1], widths[1:])]
        return descs, sum(a * b + (b if bias else 0) for a, b in zip(widths[:-1], widths[1:]))

    @classmethod
    def from_module(cls, module, hidden, init="scratch", forward="fused"):
        check_modes(init, forward)
        widths = [module.in_features, *hidden, module.out_features]
        has_bias = module.bias is not None
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        factors = [nn.Linear(a, b, bias=has_bias, **kw) for a, b in zip(widths[:-1], widths[1:])]
        layer = cls(template_of(module), factors, 1, forward)
        if init == "preserve":
            preserve_exact(layer.factors, 1, module.weight, module.bias)
        return layer.train(module.training)

    def _single(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def extra_repr(self):
        widths = [self.factors[0].in_features] + [f.out_features for f in self.factors]
        return f"fc {' -> '.join(map(str, widths))}, forward={self.forward_mode}"

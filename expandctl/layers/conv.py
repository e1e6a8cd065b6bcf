"""ExpandNets' conv expansions CL and CK, and what every conv kind shares (padding, refusals).

Exactness rules (PAPER.md): padding is applied once, to the input, with the original mode and amount;
later factors pad nothing. The stride sits on the k x k factor (CL) or the last factor (CK); every
spatial factor keeps the dilation; every factor keeps ``groups`` and has a bias iff the original has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import algebra
from ..errors import UsageError
from ..kinds import KINDS
from .base import ChainLayer, check_modes, register_expansion, template_of
from .hosts import plain_forward_reason
from .preserve import fit_ck, preserve_exact, set_biases

__all__ = ["ExpandedConv", "ExpandedConvCL", "ExpandedConvCK", "input_padding", "conv_reason", "CONV_TYPES"]

CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def input_padding(conv: nn.modules.conv._ConvNd) -> list[int]:
    """Amounts for ``F.pad`` (last dim first, left/right) that the original conv applies to its input."""
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return [0] * (2 * dims)
    if conv.padding == "same":
        pads: list[int] = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]  # torch puts the odd extra on the right
        return pads
    return [p for p in reversed(conv.padding) for _ in range(2)]


def conv_base(module: nn.Module) -> type[nn.Module]:
    for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(module, t):
            return t
    raise TypeError(type(module).__name__)


def conv_reason(module: nn.Module, source_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d)) -> str | None:
    """``None`` if ``module`` is a (plain or expandable subclass of a) Conv1d/2d/3d, else why not."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution (its own classes expand it)"
    if not isinstance(module, source_types):
        return f"{type(module).__name__} is not a Conv1d/2d/3d"
    return plain_forward_reason(module, conv_base(module), ("forward", "_conv_forward"))


def describe_specs(module: nn.Module, specs: Sequence[dict]) -> tuple[list[str], int]:
    """``(descriptions, parameters)`` of a chain of conv factors given as specs (out, kernel_size,
    stride, optional bias); every factor keeps the layer's groups."""
    g, c_in, total, descs = module.groups, module.in_channels, 0, []
    for spec in specs:
        k = spec["kernel_size"]
        bias = spec.get("bias", module.bias is not None)
        total += spec["out"] * (c_in // g) * math.prod(k) + (spec["out"] if bias else 0)
        stride = spec["stride"] if isinstance(spec["stride"], tuple) else (spec["stride"],)
        desc = f"{c_in}->{spec['out']} {'x'.join(map(str, k))}" + (f" s{stride[0]}" if max(stride) > 1 else "")
        descs.append(desc + (f" g{g}" if g > 1 else ""))
        c_in = spec["out"]
    return descs, total


def factors_repr(factors) -> str:
    """``"3->12 1x1, 12->32 7x7 s(2, 2), ..."``: the conv or transposed-conv factors of a chain."""
    parts = []
    for f in factors:
        k = "x".join(map(str, f.kernel_size))
        parts.append(f"{f.in_channels}->{f.out_channels} {k}" + (f" s{f.stride}" if max(f.stride) > 1 else ""))
    return ", ".join(parts)


def cl_reason(reason: str | None, module: nn.Module, pointwise: bool) -> str | None:
    """A conv kind's refusal, or CL's own: a 1x1 kernel only with ``pointwise``."""
    if reason is None and max(module.kernel_size) == 1 and not pointwise:
        return "1x1 convolution (pass pointwise=True / --pointwise to expand it)"
    return reason


def ck_reason(reason: str | None, module: nn.Module) -> str | None:
    """A conv kind's refusal, or CK's own: it needs a kernel dimension > 3."""
    if reason is None and max(module.kernel_size) <= 3:
        return "kernel is 3 or smaller in every dimension (ck needs a dimension > 3)"
    return reason


def ck_steps(module: nn.Module, hidden: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
    """``(kernel steps, output widths)`` of a CK chain for ``module`` with these hidden widths."""
    steps = algebra.kernel_steps(module.kernel_size)
    if len(hidden) != len(steps) - 1:
        raise UsageError(
            f"a ck chain for kernel {'x'.join(map(str, module.kernel_size))} has {len(steps) - 1} hidden widths, "
            f"not {len(hidden)}"
        )
    return steps, [*hidden, module.out_channels]


def ck_hidden(module: nn.Module, rate: float) -> list[int]:
    steps = len(algebra.kernel_steps(module.kernel_size))
    g = module.groups
    first = algebra.hidden_width(module.in_channels, rate, g)
    rest = algebra.hidden_width(module.out_channels, rate, g)
    return [first] + [rest] * (steps - 2)


def cl_hidden(module: nn.Module, rate: float) -> list[int]:
    g = module.groups
    return [algebra.hidden_width(module.in_channels, rate, g), algebra.hidden_width(module.out_channels, rate, g)]


class ConvChain(ChainLayer):
    """A chain of convolution factors, one per spec of :meth:`_factor_specs` (out channels, kernel size,
    stride...), each built by :meth:`_factor`: what the conv and the transposed-conv chains share."""

    #: The replaced layer's settings the chain runs with, copied from it.
    _settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, template, factors, groups, forward):
        super().__init__(template, factors, groups, forward)
        for name in self._settings:
            setattr(self, name, getattr(template, name))

    @classmethod
    def _factor_specs(cls, module, hidden) -> list[dict]:
        """Per factor: out channels, kernel size, stride (and what else :meth:`_factor` reads)."""
        raise NotImplementedError

    @classmethod
    def _factor(cls, module, c_in: int, spec: dict, **kw) -> nn.Module:
        """The factor for ``spec`` taking ``c_in`` channels (``kw``: device and dtype)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, module, hidden):
        return describe_specs(module, cls._factor_specs(module, hidden))

    @classmethod
    def from_module(cls, module, hidden, init="scratch", forward="fused"):
        check_modes(init, forward)
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        factors, c_in = [], module.in_channels
        for spec in cls._factor_specs(module, hidden):
            factors.append(cls._factor(module, c_in, spec, **kw))
            c_in = spec["out"]
        layer = cls(template_of(module), factors, module.groups, forward)
        if init == "preserve":
            layer._preserve(module)
        return layer.train(module.training)

    def _preserve(self, module):
        raise NotImplementedError


class ExpandedConv(ConvChain):
    """Shared machinery of CL and CK: a chain of ``ConvNd`` factors, padding applied once to the input."""

    source_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    _settings = ("padding", "padding_mode", "stride", "dilation")

    def __init__(self, template, factors, groups, forward):
        super().__init__(template, factors, groups, forward)
        self._pad = input_padding(template)

    @classmethod
    def accepts(cls, module, pointwise=False):
        return conv_reason(module, cls.source_types)

    @classmethod
    def _factor(cls, module, c_in, spec, **kw):
        # Unpadded (the padding is applied once, to the chain's input); a 1x1 factor needs no dilation.
        dilation = tuple(d if k > 1 else 1 for d, k in zip(module.dilation, spec["kernel_size"]))
        conv_t = CONV_TYPES[len(module.kernel_size)]
        return conv_t(c_in, spec["out"], spec["kernel_size"], stride=spec["stride"], padding=0, dilation=dilation,
                      groups=module.groups, bias=module.bias is not None, **kw)  # fmt: skip

    def _preserve(self, module):
        preserve_exact(self.factors, self.groups, module.weight, module.bias)

    def _single(self, x, weight, bias):
        conv = CONV_FN[len(self.stride)]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _explicit(self, x):
        if any(self._pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        return super()._explicit(x)

    def linear_part(self, x):
        # A subclass may pad at run time (Conv2dSame): zero-pad by the kernel's reach so that the
        # kernel fits the input; both sides see the same input, so the algebra is still compared.
        reach = [d * (k - 1) for d, k in zip(reversed(self.dilation), reversed(self._template.kernel_size))]
        return super().linear_part(F.pad(x, [r for r in reach for _ in range(2)]))

    def extra_repr(self):
        return f"{self.kind} [{factors_repr(self.factors)}], groups={self.groups}, forward={self.forward_mode}"


class CLKind:
    """What CL is, for a conv and a transposed conv alike: its registry entry, which layers it takes
    (:func:`cl_reason` on top of the chain's own checks) and its widths (:func:`cl_hidden`)."""

    kind = "cl"
    summary, default_rate = KINDS[kind].summary, KINDS[kind].default_rate
    priority = 1

    @classmethod
    def accepts(cls, module, pointwise=False):
        return cl_reason(super().accepts(module, pointwise), module, pointwise)

    @classmethod
    def hidden_for(cls, module, rate):
        return cl_hidden(module, rate)


class CKKind:
    """What CK is, for a conv and a transposed conv alike: its registry entry, which layers it takes
    (:func:`ck_reason`) and its widths (:func:`ck_hidden`); it runs before CL on the layers both take."""

    kind = "ck"
    summary, default_rate = KINDS[kind].summary, KINDS[kind].default_rate
    priority = 2

    @classmethod
    def accepts(cls, module, pointwise=False):
        return ck_reason(super().accepts(module, pointwise), module)

    @classmethod
    def hidden_for(cls, module, rate):
        return ck_hidden(module, rate)


@register_expansion
class ExpandedConvCL(CLKind, ExpandedConv):
    """CL expansion: ``ConvNd k`` -> ``1x..x1 (m -> h1)``, ``k (h1 -> h2)``, ``1x..x1 (h2 -> n)``.

    The stride sits on the k-kernel factor (a 1x1 conv commutes with subsampling). Contraction
    multiplies the channel matrices at every kernel tap (DiverseBranchBlock's 1x1-kxk merge).
    """

    @classmethod
    def _factor_specs(cls, module, hidden):
        ones = (1,) * len(module.kernel_size)
        h1, h2 = hidden
        return [
            {"out": h1, "kernel_size": ones, "stride": 1},
            {"out": h2, "kernel_size": module.kernel_size, "stride": module.stride},
            {"out": module.out_channels, "kernel_size": ones, "stride": 1},
        ]


@register_expansion
class ExpandedConvCK(CKKind, ExpandedConv):
    """CK expansion: a ``ConvNd`` with a kernel dimension > 3 -> a chain of small kernels
    (3-tap steps, a 2-tap step for even sizes) whose sizes add up to the original, widths
    ``m -> h1 -> ... -> n``. Kernels compose by full convolution; the stride sits on the last
    factor; ``preserve`` initialisation is a least-squares fit that reports its residual.
    """

    @classmethod
    def _factor_specs(cls, module, hidden):
        steps, outs = ck_steps(module, hidden)
        last = len(steps) - 1
        return [
            {"out": o, "kernel_size": k, "stride": module.stride if j == last else 1}
            for j, (o, k) in enumerate(zip(outs, steps))
        ]

    def _preserve(self, module):
        with torch.no_grad():
            what = f"{'x'.join(map(str, module.kernel_size))} kernel"
            weights, self.fit_residual = fit_ck(
                module.weight.detach(), [f.weight.detach() for f in self.factors], self.groups, what
            )
            for f, w in zip(self.factors, weights):
                f.weight.copy_(w)
            set_biases(self.factors, module.bias)

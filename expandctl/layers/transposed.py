"""CL and CK for transposed convolutions (decoders): the mirror image of the conv rules."""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import algebra
from .base import register_expansion
from .conv import CKKind, CLKind, ConvChain, ck_steps, factors_repr
from .hosts import qualname
from .preserve import fit_ck, preserve_exact

__all__ = ["ExpandedConvTranspose", "ExpandedConvTransposeCL", "ExpandedConvTransposeCK"]

TRANSPOSED_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_CONV_TRANSPOSE_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_layout_shape(weight_shape: Sequence[int], groups: int) -> tuple[int, ...]:
    """Shape of :func:`algebra.flip_transpose` of a ``(in, out / groups, *taps)`` kernel."""
    c_in, c_out_g = weight_shape[:2]
    return (c_out_g * groups, c_in // groups, *weight_shape[2:])


class ExpandedConvTranspose(ConvChain):
    """Shared machinery of transposed CL and CK: a chain of ``ConvTransposeNd`` factors.

    A transposed conv upsamples its input by the stride, fully convolves it with the kernel, then
    crops ``padding`` from both ends (``output_padding`` fewer on the far end). Exactness rules,
    the mirror image of the conv ones: the stride and ``output_padding`` sit on the first spatial
    factor (upsample once, before any kernel), the padding (the crop) on the last one, and only
    factors from the last spatial one on have a bias (a full convolution of a constant bias field
    is not constant at its border). Every factor keeps ``groups`` and the dilation.
    """

    source_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    #: Index of the factor that upsamples (carries the stride and output_padding).
    _upsampling: ClassVar[int] = 0

    _settings = ("stride", "padding", "output_padding", "dilation")

    def __init__(self, template, factors, groups, forward):
        super().__init__(template, factors, groups, forward)
        self._order = algebra.chain_order(tuple(_conv_layout_shape(f.weight.shape, groups) for f in self.factors))

    @classmethod
    def accepts(cls, module, pointwise=False):
        if not isinstance(module, cls.source_types):
            return f"{type(module).__name__} is not a ConvTranspose1d/2d/3d"
        if type(module) not in cls.source_types:
            return f"{qualname(module)} subclasses a transposed convolution; its meaning is unknown"
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False)):
            return "lazy module is not initialised yet; run one forward pass first"
        return None

    @classmethod
    def _factor(cls, module, c_in, spec, **kw):
        conv_t = TRANSPOSED_TYPES[len(module.kernel_size)]
        return conv_t(c_in, spec["out"], spec["kernel_size"], stride=spec["stride"], padding=spec["padding"],
                      output_padding=spec["output_padding"], groups=module.groups, bias=spec["bias"],
                      dilation=module.dilation, **kw)  # fmt: skip

    def _compose(self, fast: bool = False):
        weights = [f.weight for f in self.factors]
        biases = [f.bias for f in self.factors] if any(f.bias is not None for f in self.factors) else None
        return algebra.compose_transposed_chain(weights, biases, self.groups, self._order)

    def forward(self, x: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        output_padding = self.output_padding
        if output_size is not None:  # torch's rule: which output_padding gives that size
            dims = len(self.stride)
            k = self._template.kernel_size
            output_padding = self._template._output_padding(
                x, output_size, self.stride, self.padding, k, dims, self.dilation
            )
        if self.forward_mode == "fused":
            weight, bias = self.equivalent()
            return self._single(x, weight, bias, output_padding)
        return self._explicit(x, output_padding)

    def _single(self, x, weight, bias, output_padding=None):
        op = self.output_padding if output_padding is None else output_padding
        fn = _CONV_TRANSPOSE_FN[len(self.stride)]
        return fn(x, weight, bias, self.stride, self.padding, op, self.groups, self.dilation)

    def _explicit(self, x, output_padding=None):
        fn = _CONV_TRANSPOSE_FN[len(self.stride)]
        for j, f in enumerate(self.factors):
            op = output_padding if output_padding is not None and j == self._upsampling else f.output_padding
            x = fn(x, f.weight, f.bias, f.stride, f.padding, op, f.groups, f.dilation)
        return x

    def _preserve(self, module):
        """Fit in the conv layout (:func:`algebra.flip_transpose` of every kernel), copy back."""
        g = self.groups
        with torch.no_grad():
            target = algebra.flip_transpose(module.weight.detach(), g)
            weights = [algebra.flip_transpose(f.weight.detach(), g).clone() for f in self.factors]
            weights, self.fit_residual = self._fit(module, target, weights)
            for f, w in zip(self.factors, weights):
                f.weight.copy_(algebra.flip_transpose(w, g))
                if f.bias is not None:
                    f.bias.zero_()
            if module.bias is not None:
                self.factors[-1].bias.copy_(module.bias)

    def _fit(self, module, target, weights) -> tuple[list[torch.Tensor], float]:
        raise NotImplementedError

    def extra_repr(self):
        factors = factors_repr(self.factors)
        return f"{self.kind} transposed [{factors}], groups={self.groups}, forward={self.forward_mode}"


@register_expansion
class ExpandedConvTransposeCL(CLKind, ExpandedConvTranspose):
    """CL for ``ConvTransposeNd k``: ``1x..x1 (m -> h1, no bias)``, ``k transposed (h1 -> h2)`` with
    the stride, padding and output_padding, ``1x..x1 (h2 -> n)``. The 1x1 factors commute with the
    upsampling and the crop, so the chain is exact; the first has no bias (see the class above)."""

    source_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    _upsampling = 1

    @classmethod
    def _factor_specs(cls, module, hidden):
        ones = (1,) * len(module.kernel_size)
        h1, h2 = hidden
        bias = module.bias is not None
        plain = {"stride": 1, "padding": 0, "output_padding": 0}
        return [
            {"out": h1, "kernel_size": ones, "bias": False, **plain},
            {
                "out": h2,
                "kernel_size": module.kernel_size,
                "stride": module.stride,
                "padding": module.padding,
                "output_padding": module.output_padding,
                "bias": bias,
            },
            {"out": module.out_channels, "kernel_size": ones, "bias": bias, **plain},
        ]

    def _fit(self, module, target, weights):
        shims = [types.SimpleNamespace(weight=w, bias=None) for w in weights]
        preserve_exact(shims, self.groups, target, None)
        return weights, 0.0


@register_expansion
class ExpandedConvTransposeCK(CKKind, ExpandedConvTranspose):
    """CK for ``ConvTransposeNd`` with a kernel dimension > 3: small transposed kernels (3-tap
    steps, a 2-tap one for even sizes) whose full convolutions add up to the original; the first
    factor upsamples (stride, output_padding), the last crops (padding) and alone has a bias."""

    source_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    @classmethod
    def _factor_specs(cls, module, hidden):
        steps, outs = ck_steps(module, hidden)
        last = len(steps) - 1
        return [
            {
                "out": o,
                "kernel_size": k,
                "stride": module.stride if j == 0 else 1,
                "output_padding": module.output_padding if j == 0 else 0,
                "padding": module.padding if j == last else 0,
                "bias": module.bias is not None and j == last,
            }
            for j, (o, k) in enumerate(zip(outs, steps))
        ]

    def _fit(self, module, target, weights):
        what = f"transposed {'x'.join(map(str, module.kernel_size))} kernel"
        return fit_ck(target, weights, self.groups, what)

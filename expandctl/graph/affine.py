"""An affine map of one tensor, kept as one convolution (or linear layer) while a region grows.

``contract --graph`` walks a traced model and describes every value that depends linearly on a
region's input ``x`` as ``Affine``: ``y = conv(pad(x, padding), weight, stride, dilation, groups) + bias``
with zero padding applied once to ``x`` and ``bias`` a per-channel constant (uniform over space).
Each supported operation maps an ``Affine`` to an ``Affine`` with the algebra of
:mod:`expandctl.algebra`, or refuses with :class:`NotOneLayer` and the reason when the result is not
exactly one layer (a padded kernel after a bias, a kxk after a kxk under padding, borders that do
not line up). A ``linear`` layout is the same thing over the last dimension (``nn.Linear``).

Everything is float64; the caller casts the final kernel to the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..algebra import compose_bias, compose_pair, embed_kernel

__all__ = ["Affine", "NotOneLayer", "regroup", "dilate"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class NotOneLayer(Exception):
    """The operation is linear but its result is not exactly one convolution / linear layer."""


def regroup(weight: torch.Tensor, groups: int, to: int) -> torch.Tensor:
    """``weight`` of a conv with ``groups`` rewritten for ``to`` groups (``to`` divides ``groups``):
    the same map, block-diagonal inside each coarser group."""
    if groups == to:
        return weight
    if groups % to:
        raise ValueError(f"{to} groups do not divide {groups}")
    r = groups // to
    c_out, c_in_g = weight.shape[:2]
    per_out = c_out // groups
    out = weight.new_zeros(c_out, c_in_g * r, *weight.shape[2:])
    fine = torch.arange(c_out, device=weight.device) // per_out  # fine group of each output channel
    for q in range(r):
        rows = (fine % r == q).nonzero().flatten()
        out[rows, q * c_in_g : (q + 1) * c_in_g] = weight[rows]
    return out


def dilate(weight: torch.Tensor, dilation: tuple[int, ...]) -> torch.Tensor:
    """The dense kernel of ``weight`` run with ``dilation`` (zeros between the taps)."""
    if all(d == 1 for d in dilation):
        return weight
    k = weight.shape[2:]
    size = tuple((kk - 1) * d + 1 for kk, d in zip(k, dilation))
    out = weight.new_zeros(*weight.shape[:2], *size)
    out[(slice(None), slice(None), *(slice(None, None, d) for d in dilation))] = weight
    return out


@dataclass
class Affine:
    """``y = conv(zero_pad(x, padding), weight, stride, dilation, groups) + bias`` (``layout="conv"``,
    channels on dim 1, ``nd`` spatial dims) or ``y = x @ weight.T + bias`` over the last dim
    (``layout="linear"``, ``nd == 0``)."""

    layout: str
    weight: torch.Tensor
    bias: torch.Tensor
    groups: int = 1
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()

    # ---------------------------------------------------------------- constructors
    @classmethod
    def identity(cls, channels: int, nd: int, layout: str, like: torch.Tensor) -> Affine:
        kw = {"dtype": torch.float64, "device": like.device}
        if layout == "linear":
            return cls("linear", torch.eye(channels, **kw), torch.zeros(channels, **kw))
        one = (1,) * nd
        zero = (0,) * nd
        return cls("conv", torch.ones(channels, 1, *one, **kw), torch.zeros(channels, **kw), channels, one, zero, one)

    # ---------------------------------------------------------------- properties
    @property
    def nd(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def shifted(self) -> bool:
        """Whether the map adds a constant: a bias beyond rounding (a shift subtracted again in float64,
        as a BNAndPad-style border does, leaves ~1e-17 of it)."""
        scale = max(1.0, float(self.weight.abs().max()) if self.weight.numel() else 1.0)
        return bool((self.bias.abs() > 1e-12 * scale).any())

    def pointwise(self) -> bool:
        """Every output pixel reads one input pixel and no padding is involved."""
        return all(k == 1 for k in self.kernel) and not any(self.padding)

    def params(self) -> int:
        return self.weight.numel() + (self.bias.numel() if bool(self.bias.any()) else 0)

    # ---------------------------------------------------------------- per-channel maps
    def scale_shift(self, scale: torch.Tensor | float | None, shift: torch.Tensor | float | None) -> Affine:
        """``s * y + t`` per output channel (BatchNorm in eval mode, layer scale, constant add)."""
        w, b = self.weight, self.bias
        if scale is not None:
            s = torch.as_tensor(scale, dtype=torch.float64, device=w.device).expand(self.out_channels)
            w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
            b = b * s
        if shift is not None:
            b = b + torch.as_tensor(shift, dtype=torch.float64, device=w.device).expand(self.out_channels)
        return replace(self, weight=w, bias=b)

    # ---------------------------------------------------------------- composition
    def then_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Affine:
        if self.layout != "linear":
            raise NotOneLayer("a linear layer after a convolution's channel-first output")
        w = weight.double() @ self.weight
        b = weight.double() @ self.bias + (bias.double() if bias is not None else 0)
        return replace(self, weight=w, bias=b)

    def then_conv(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        what: str = "convolution",
    ) -> Affine:
        """This map followed by a zero-padded convolution (``padding`` on its own input)."""
        if self.layout != "conv" or self.nd != weight.dim() - 2:
            raise NotOneLayer(f"a {what} after a map of another layout")
        weight = weight.double()
        if any(padding):
            if not self.pointwise():
                raise NotOneLayer(
                    f"a zero-padded {what} after a {'x'.join(map(str, self.kernel))} kernel: at the image border the "
                    "second layer reads padding the first never saw, so the pair is not one convolution"
                )
            if self.shifted():
                raise NotOneLayer(
                    f"a zero-padded {what} after a bias or shift: the border would read 0 where the merged layer "
                    "reads the shift, so the pair is not one convolution"
                )
            new_pad = tuple(p * s for p, s in zip(padding, self.stride))
        else:
            new_pad = self.padding
        g = math.gcd(self.groups, groups)
        first = regroup(self.weight, self.groups, g)
        second = regroup(weight, groups, g)
        k1, k2 = self.kernel, tuple(weight.shape[2:])
        if all(k == 1 for k in k2):
            dil = self.dilation
        elif all(k == 1 for k in k1):
            dil = tuple(d * s for d, s in zip(dilation, self.stride))
        else:
            first = dilate(first, self.dilation)
            second = dilate(second, tuple(d * s for d, s in zip(dilation, self.stride)))
            dil = (1,) * self.nd
        w = compose_pair(first, second, g)
        b = compose_bias(self.bias, second, bias.double() if bias is not None else None, g)
        stride = tuple(a * c for a, c in zip(self.stride, stride))
        return Affine("conv", w, b if b is not None else w.new_zeros(w.shape[0]), g, stride, new_pad, dil)

    def then_avg_pool(self, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...]) -> Affine:
        """Average pooling that counts the padding (a depthwise conv with ``1/prod(k)`` at every tap)."""
        c = self.out_channels
        w = torch.full((c, 1, *kernel), 1.0 / math.prod(kernel), dtype=torch.float64, device=self.weight.device)
        return self.then_conv(w, None, stride, padding, (1,) * len(kernel), c, "average pooling")

    def then_pad(self, padding: tuple[int, ...]) -> Affine:
        """Zero padding of the output, symmetric per spatial dimension."""
        if not self.pointwise() or self.shifted():
            raise NotOneLayer("zero padding after a spatial kernel or a shift is not part of one convolution")
        return replace(self, padding=tuple(p * s for p, s in zip(padding, self.stride)))

    # ---------------------------------------------------------------- sums
    def plus(self, other: Affine, sign: float = 1.0) -> Affine:
        """``self + sign * other``, both maps of the same input (parallel branches)."""
        if self.layout != other.layout or self.nd != other.nd:
            raise NotOneLayer("branches of different layouts")
        if self.layout == "linear":
            return replace(self, weight=self.weight + sign * other.weight, bias=self.bias + sign * other.bias)
        if self.out_channels != other.out_channels or self.in_channels != other.in_channels:
            raise NotOneLayer("branches with different channel counts")
        if self.stride != other.stride:
            raise NotOneLayer(f"branches with different strides {self.stride} and {other.stride}")
        g = math.gcd(self.groups, other.groups)
        a = (regroup(self.weight, self.groups, g), self.dilation, self.padding)
        b = (regroup(other.weight, other.groups, g), other.dilation, other.padding)
        if a[1] != b[1]:
            # Dilation only matters where a kernel has more than one tap; else materialise it.
            if all(k == 1 for k in a[0].shape[2:]):
                a = (a[0], b[1], a[2])
            elif all(k == 1 for k in b[0].shape[2:]):
                b = (b[0], a[1], b[2])
            else:
                a, b = (dilate(a[0], a[1]), (1,) * self.nd, a[2]), (dilate(b[0], b[1]), (1,) * self.nd, b[2])
        dil = a[1]
        pad = tuple(max(p, q) for p, q in zip(a[2], b[2]))
        offsets = []
        for _, _, p in (a, b):
            shift = [P - pp for P, pp in zip(pad, p)]
            if any(s % d for s, d in zip(shift, dil)):
                raise NotOneLayer("branches whose padding differs by a non-multiple of the dilation")
            offsets.append(tuple(s // d for s, d in zip(shift, dil)))
        size = tuple(
            max(oa + ka, ob + kb) for oa, ka, ob, kb in zip(offsets[0], a[0].shape[2:], offsets[1], b[0].shape[2:])
        )
        wa = embed_kernel(a[0], size, offsets[0])
        wb = embed_kernel(b[0], size, offsets[1])
        return Affine("conv", wa + sign * wb, self.bias + sign * other.bias, g, self.stride, pad, dil)

    # ---------------------------------------------------------------- the layer
    def module(self, dtype: torch.dtype, device: torch.device | None = None) -> nn.Module:
        """The one layer computing this map (``nn.ConvNd`` or ``nn.Linear``), in ``dtype``."""
        has_bias = bool(self.bias.any())
        if self.layout == "linear":
            layer = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=has_bias, dtype=dtype, device=device)
        else:
            layer = _CONV[self.nd](
                self.in_channels,
                self.out_channels,
                self.kernel,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                groups=self.groups,
                bias=has_bias,
                dtype=dtype,
                device=device,
            )
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            if has_bias:
                layer.bias.copy_(self.bias)
        return layer

    def describe(self) -> str:
        if self.layout == "linear":
            return f"Linear({self.weight.shape[1]} -> {self.weight.shape[0]})"
        k = "x".join(map(str, self.kernel))
        extra = []
        if any(s != 1 for s in self.stride):
            extra.append(f"stride {'x'.join(map(str, self.stride))}")
        if any(self.padding):
            extra.append(f"padding {'x'.join(map(str, self.padding))}")
        if any(d != 1 for d in self.dilation):
            extra.append(f"dilation {'x'.join(map(str, self.dilation))}")
        if self.groups != 1:
            extra.append(f"groups {self.groups}")
        tail = (", " + ", ".join(extra)) if extra else ""
        return f"Conv{self.nd}d({self.in_channels} -> {self.out_channels}, {k}{tail})"

"""Parallel branches: a kernel as a sum of chains, each followed by a per-channel affine.

The re-parameterisations of ACNet, RepVGG, Diverse Branch Block and OREPA run several branches on
the same input and add their outputs. Every branch here is defined on the layer's padded input
(padding applied once, with the layer's mode and amount, as for chains):

* a chain of factors (:func:`~.chain.compose_chain`), whose spatial kernel ``k`` sits at an
  ``offset`` inside the layer's kernel ``K`` (:func:`embed_kernel`; a 1x1 or a 1xk sits at
  ``(K - k) // 2``, the tap that ``padding="same"`` aligns with the output for odd and even sizes);
* or a fixed kernel: the identity (:func:`identity_kernel`, a delta at the tap that reads the
  input pixel at the output's position) or average pooling (:func:`average_kernel`);
* then a per-channel affine ``y -> s * y + t``: a BatchNorm folded with its running statistics
  (:func:`bn_affine`) or a learnable scale (OREPA, ``t = 0``).

Per-pixel stages before the spatial kernel (DBB's 1x1 -> BN -> kxk) are exact at image borders
only if the padded border holds what those stages map a zero input to: the image of 0, ``t``
for a BatchNorm after a bias-free 1x1 (DBB's "BNAndPad"). The module code pads so; the algebra
needs nothing more, because :func:`~.chain.compose_bias` already treats the chain's bias as a
constant field over the whole padded input. With a non-zero padding mode the per-pixel stages
commute with the padding (reflect/replicate/circular copy pixels), so the same kernel is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "embed_kernel",
    "centre_offset",
    "identity_tap",
    "identity_kernel",
    "average_kernel",
    "average_after",
    "bn_affine",
    "apply_affine",
    "sum_branches",
]


def centre_offset(small: Sequence[int], big: Sequence[int]) -> tuple[int, ...]:
    """Tap offset of a ``small`` kernel centred inside ``big``: ``(K - k) // 2`` per dimension."""
    if len(small) != len(big) or any(k > K for k, K in zip(small, big)):
        raise ValueError(f"kernel {tuple(small)} does not fit inside {tuple(big)}")
    return tuple((K - k) // 2 for k, K in zip(small, big))


def embed_kernel(weight: torch.Tensor, kernel_size: Sequence[int], offset: Sequence[int]) -> torch.Tensor:
    """``weight`` ``(out, in/g, *k)`` placed at ``offset`` inside zeros of ``(out, in/g, *kernel_size)``.

    A conv with the embedded kernel on the layer's padded input equals the small conv run on the
    crop of that input that starts ``offset * dilation`` taps in: the branch sees the same pixels.
    Differentiable (a pad, not an in-place copy)."""
    k = weight.shape[2:]
    if len(k) != len(kernel_size) or len(offset) != len(k):
        raise ValueError(f"kernel {tuple(k)}, size {tuple(kernel_size)} and offset {tuple(offset)} differ in rank")
    pads: list[int] = []
    for kk, K, o in zip(reversed(k), reversed(tuple(kernel_size)), reversed(tuple(offset))):
        if o < 0 or o + kk > K:
            raise ValueError(f"kernel {tuple(k)} at offset {tuple(offset)} does not fit inside {tuple(kernel_size)}")
        pads += [o, K - kk - o]
    return torch.nn.functional.pad(weight, pads) if any(pads) else weight


def identity_tap(
    kernel_size: Sequence[int], dilation: Sequence[int], pads: Sequence[int], stride: Sequence[int]
) -> tuple[int, ...] | None:
    """The tap whose pixel is the output position's own input pixel, or ``None`` if the layer has no
    identity: it needs stride 1 and an output as large as the input (``left + right == d (K - 1)``),
    and the left padding a multiple of the dilation. ``pads`` is in ``F.pad`` order (last dim first)."""
    dims = len(kernel_size)
    lefts = list(reversed(pads[0::2]))[:dims]
    rights = list(reversed(pads[1::2]))[:dims]
    tap = []
    for K, d, s, lo, hi in zip(kernel_size, dilation, stride, lefts, rights):
        if s != 1 or lo + hi != d * (K - 1) or lo % d:
            return None
        tap.append(lo // d)
    return tuple(tap)


def identity_kernel(
    channels: int, groups: int, kernel_size: Sequence[int], tap: Sequence[int], like: torch.Tensor
) -> torch.Tensor:
    """The kernel of ``x -> x`` for a conv with ``groups``: ``(C, C/g, *K)``, a 1 at ``tap`` from each
    channel to itself (RepVGG's identity branch, per group)."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, *kernel_size, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    w[(idx, idx % per_group, *(torch.full_like(idx, t) for t in tap))] = 1
    return w


def average_kernel(channels: int, groups: int, kernel_size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """The kernel of average pooling over ``kernel_size`` (padding counted, as DBB's AvgPool): each
    channel to itself, ``1 / prod(K)`` at every tap (DBB's transV)."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, *kernel_size, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    w[idx, idx % per_group] = 1.0 / math.prod(kernel_size)
    return w


def average_after(
    weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(w, b)`` of a pointwise layer ``(weight, bias)`` followed by average pooling over
    ``kernel_size``: the same channel matrix at every tap, divided by the tap count; the bias passes
    unchanged (the pooling averages a constant field to itself). What composing with
    :func:`average_kernel` gives, without multiplying by its zeros (DBB's 1x1 -> avg branch)."""
    if any(k != 1 for k in weight.shape[2:]):
        raise ValueError(f"average_after takes a pointwise kernel, not {tuple(weight.shape)}")
    w = weight.reshape(*weight.shape[:2], *([1] * len(kernel_size))) / math.prod(kernel_size)
    return w.expand(*weight.shape[:2], *kernel_size), bias


def bn_affine(
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``BN(y) = s * y + t`` per channel in eval mode; differentiable in gamma, beta."""
    s = torch.rsqrt(var + eps)
    if gamma is not None:
        s = gamma * s
    t = -mean * s
    if beta is not None:
        t = t + beta
    return s, t


def apply_affine(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(w, b)`` of ``y -> scale * layer(y) + shift`` per output channel (BN folding, transI)."""
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    if bias is None and shift is None:
        return w, None
    b = torch.zeros_like(scale) if bias is None else bias * scale
    return w, (b if shift is None else b + shift)


def sum_branches(
    branches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(Σ w, Σ b)`` of branches with equal kernel shapes run on the same input (transII); a missing
    bias counts as zero, and the result has none only if no branch has one."""
    if not branches:
        raise ValueError("no branch to add")
    shapes = {tuple(w.shape) for w, _ in branches}
    if len(shapes) != 1:
        raise ValueError(f"branch kernels differ in shape: {sorted(shapes)}; embed them first")
    weight = branches[0][0]
    for w, _ in branches[1:]:
        weight = weight + w
    biases = [b for _, b in branches if b is not None]
    bias = None
    for b in biases:
        bias = b if bias is None else bias + b
    return weight, bias

"""Serial chains: composing a chain of linear layers into one layer (ExpandNets).

Every function here takes and returns tensors; nothing touches an ``nn.Module``. Kernels are in
PyTorch's convolution layout ``(out, in / groups, *taps)``; a ``nn.Linear`` weight ``(out, in)`` is
the same thing with no spatial dimensions and ``groups=1``.

Notation (Guo et al., "ExpandNets", NeurIPS 2020, Sec. 3): a chain ``f_L ∘ ... ∘ f_1`` of
stride-1 cross-correlations with kernels ``W_j`` and biases ``b_j`` is a single cross-correlation
with kernel ``W = W_L ⊛ ... ⊛ W_1`` and bias ``b``, where for one pair (first ``A``, then ``B``)

    (B ⊛ A)[o, i, t] = Σ_c Σ_{u + v = t} B[o, c, v] · A[c, i, u]          (per group)

i.e. a full convolution of the kernels over taps and a matrix product over channels, and

    b = B̄ b_A + b_B,   B̄[o, c] = Σ_v B[o, c, v]                            (per group)

because every layer after the first sees a constant bias field over its whole (unpadded) input.
That last fact is why padding must be applied once, to the chain's input (PAPER.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "compose_pair",
    "compose_bias",
    "compose_chain",
    "compose_transposed_chain",
    "chain_order",
    "composition_cost",
    "kernel_steps",
    "flip_transpose",
    "hidden_width",
    "fold_bn",
]

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _taps(shape: Sequence[int]) -> int:
    return math.prod(shape[2:]) if len(shape) > 2 else 1


def compose_pair(first: torch.Tensor, second: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Kernel of ``second ∘ first`` (both stride 1, same ``groups``).

    ``first``: ``(c2, c1/g, *ka)``, ``second``: ``(c3, c2/g, *kb)`` -> ``(c3, c1/g, *(ka + kb - 1))``.
    Differentiable in both arguments.
    """
    if first.dim() != second.dim():
        raise ValueError(f"kernels of different rank: {tuple(first.shape)} and {tuple(second.shape)}")
    c2, c1g = first.shape[:2]
    c3, c2g = second.shape[:2]
    if c2 != c2g * groups:
        raise ValueError(f"channel mismatch: first gives {c2} channels, second takes {c2g} x {groups} groups")
    ka, kb = tuple(first.shape[2:]), tuple(second.shape[2:])
    g, c3g = groups, c3 // groups
    if _taps(second.shape) == 1:
        # Pointwise second factor: a (block-diagonal) matrix product at every tap of `first`.
        b = second.reshape(g, c3g, c2g)
        a = first.reshape(g, c2g, c1g * _taps(first.shape))
        return torch.bmm(b, a).reshape(c3, c1g, *ka)
    if _taps(first.shape) == 1:
        b = second.reshape(g, c3g, c2g, _taps(second.shape))
        a = first.reshape(g, c2g, c1g)
        return torch.einsum("gock,gci->goik", b, a).reshape(c3, c1g, *kb)
    # Full convolution of kernels = conv_transpose of `first` (in-channels as batch) by `second`.
    w = second.reshape(g, c3g, c2g, *kb).transpose(1, 2).reshape(c2, c3g, *kb)
    out = _CONV_TRANSPOSE[len(ka)](first.transpose(0, 1), w, groups=g)
    return out.transpose(0, 1)


def compose_bias(
    bias: torch.Tensor | None, weight: torch.Tensor, own_bias: torch.Tensor | None, groups: int = 1
) -> torch.Tensor | None:
    """Bias after a layer ``(weight, own_bias)`` applied to a constant field ``bias``: ``W̄ bias + own_bias``."""
    if bias is None:
        return own_bias
    c_out, c_in_g = weight.shape[:2]
    w_bar = weight.reshape(groups, c_out // groups, c_in_g, -1).sum(-1)
    out = torch.bmm(w_bar, bias.reshape(groups, c_in_g, 1)).reshape(c_out)
    return out if own_bias is None else out + own_bias


def _composed_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of ``b ⊛ a`` (a first) from the two kernel shapes."""
    return (b[0], a[1], *(x + y - 1 for x, y in zip(a[2:], b[2:], strict=True)))


def composition_cost(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Multiply-adds to compose kernel shape ``a`` (first) with ``b`` (second); groups cancel out."""
    return b[0] * b[1] * a[1] * _taps(a) * _taps(b)


@functools.lru_cache(maxsize=1024)
def chain_order(shapes: tuple[tuple[int, ...], ...]):
    """Cheapest bracketing of a kernel chain (matrix-chain dynamic programme; chains are short).

    Returns a nested tuple of factor indices, e.g. ``((0, 1), 2)`` means compose 0 and 1 first.
    Channel counts decide: in a CL chain ``1x1 (m->rm), kxk (rm->rn), 1x1 (rn->n)`` it pays to fold
    the narrow side into the wide middle kernel first.
    """
    n = len(shapes)
    best: dict[tuple[int, int], tuple[int, object, tuple[int, ...]]] = {}
    for i in range(n):
        best[i, i] = (0, i, shapes[i])
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            options = []
            for s in range(i, j):
                cl, tl, sl = best[i, s]
                cr, tr, sr = best[s + 1, j]
                options.append((cl + cr + composition_cost(sl, sr), (tl, tr), _composed_shape(sl, sr)))
            best[i, j] = min(options, key=lambda o: o[0])
    return best[0, n - 1][1]


def _compose_tree(tree, weights: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    if isinstance(tree, int):
        return weights[tree]
    left, right = tree
    return compose_pair(_compose_tree(left, weights, groups), _compose_tree(right, weights, groups), groups)


def compose_chain(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    groups: int = 1,
    order=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Equivalent ``(weight, bias)`` of a chain applied first-to-last (``weights[0]`` sees the input).

    ``order`` is a bracketing from :func:`chain_order`; computed when not given. The result is the
    same for every order (associativity); only the cost differs.
    """
    if not weights:
        raise ValueError("empty chain")
    if order is None:
        order = chain_order(tuple(tuple(w.shape) for w in weights))
    weight = _compose_tree(order, weights, groups)
    bias = None
    if biases is not None:
        for w, b in zip(weights, biases, strict=True):
            bias = compose_bias(bias, w, b, groups)
    return weight, bias


def compose_transposed_chain(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    groups: int = 1,
    order=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Equivalent ``(weight, bias)`` of a chain of stride-1 transposed convolutions (kernels in
    ``ConvTransposeNd`` layout ``(in, out / groups, *taps)``), ``weights[0]`` seeing the input.

    A transposed convolution with stride 1 and no padding is the full cross-correlation with the
    kernel ``T(W)`` (:func:`flip_transpose`), and a chain of full cross-correlations is one, with
    the composed kernel (the zero border each factor adds is what the composed kernel sees). So
    ``W = T(T(W_L) ⊛ ... ⊛ T(W_1))``; ``order`` brackets the ``T(W_j)``. Biases compose as in
    :func:`compose_chain`, which is exact only when no factor before the last spatial one has a
    bias: a full convolution of a constant field is not constant at its border.
    """
    conv = [flip_transpose(w, groups) for w in weights]
    weight, bias = compose_chain(conv, biases, groups, order)
    return flip_transpose(weight, groups), bias


def flip_transpose(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``T(W)``: swap in/out channels within each group and flip every spatial axis.

    ``T(B ⊛ A) = T(A) ⊛ T(B)``: the adjoint chain runs backwards, which turns "solve for the
    first factor" into "solve for the last factor".
    """
    c_out, c_in_g = weight.shape[:2]
    ks = weight.shape[2:]
    w = weight.reshape(groups, c_out // groups, c_in_g, *ks).transpose(1, 2).reshape(c_in_g * groups, -1, *ks)
    return w.flip(tuple(range(2, weight.dim()))) if ks else w


def kernel_steps(kernel_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Small kernels whose composition has ``kernel_size`` (CK expansion).

    Per dimension: 3-tap steps, one 2-tap step if the size is even, then 1-tap steps once that
    dimension is done, so that ``Σ steps - (L - 1) = k`` in every dimension. 7 -> 3,3,3;
    6 -> 3,3,2; 1x7 -> (1,3),(1,3),(1,3); 5x7 -> (3,3),(3,3),(1,3).
    """
    per_dim = []
    for k in kernel_size:
        if k < 1:
            raise ValueError(f"kernel size must be positive, got {tuple(kernel_size)}")
        if k <= 3:
            per_dim.append([k])
        else:
            per_dim.append([3] * ((k - 1) // 2) + ([2] if k % 2 == 0 else []))
    steps = max(len(s) for s in per_dim)
    per_dim = [s + [1] * (steps - len(s)) for s in per_dim]
    return [tuple(s[j] for s in per_dim) for j in range(steps)]


def hidden_width(channels: int, rate: float, groups: int = 1) -> int:
    """``ceil(rate * channels)`` rounded up to a multiple of ``groups``."""
    width = math.ceil(round(rate * channels, 9))
    return -(-width // groups) * groups


def fold_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, b)`` of the layer computing ``BN(conv(x))`` with BN in eval mode:
    ``w = weight * s``, ``b = (bias - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per
    output channel (so any ``groups`` works). Missing bias, gamma or beta count as 0, 1, 0."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = gamma * scale
    b = (bias if bias is not None else torch.zeros_like(mean)) - mean
    b = b * scale + (beta if beta is not None else 0)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return w.detach(), b.detach()


# --------------------------------------------------------------------------------------------------
# Fast composition for training: pairwise Toom-Cook over taps
# --------------------------------------------------------------------------------------------------
# The tap part of ``B ⊛ A`` is a polynomial product (tap index = exponent, one variable per spatial
# dimension). Evaluated at points it becomes one channel matmul per point, so composing a chain is:
# evaluate the factors on a grid, multiply per point, interpolate once at the end. Pairwise: a
# product of two subchains is formed on the smallest grid its degree needs (3x3 ⊛ 3x3 on 5x5
# points), then carried onto the next grid (7x7 for the third 3x3 factor) by one linear map
# (interpolate + re-evaluate). For the wide CK chains this needs ~4x fewer multiplies than the
# direct full convolution of kernels. It is used only for training (see :func:`compose_chain_fast`):
# contraction and every check use :func:`compose_chain`, which is exact up to ordinary rounding.

#: Evaluation points, taken in this order: a grid of ``p`` points per dimension uses the first

"""Fast composition for training: pairwise Toom-Cook over taps.

Used only while training (:func:`compose_chain_fast`); contraction and every check use the direct
algebra of :mod:`.chain`, which is exact up to ordinary rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .chain import _composed_shape, _taps, chain_order, compose_bias, compose_chain, composition_cost

__all__ = ["compose_toom", "compose_chain_fast", "composition_method", "toom_order", "COMPOSE_METHODS"]

#: a 7x7 chain; these give a few 1e-6); the grid sizes used are capped by :data:`TOOM_MAX_TAPS`.
TOOM_POINTS = (0.0, -1.0, 0.5, 3.0, -3.0, -0.5, 4.0 / 3.0)
#: Largest composed kernel (per dimension) composed by Toom-Cook; beyond, interpolation in float32
#: loses more than 1e-5 relative and the direct composition is used.
TOOM_MAX_TAPS = len(TOOM_POINTS)


@functools.lru_cache(maxsize=256)
def _point_matrices64(points: int, taps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(V, V⁻¹)``: Vandermonde ``V[i, j] = x_i^j`` of shape ``(points, taps)`` and,
    when square, its inverse (interpolation); float64."""
    x = torch.tensor(TOOM_POINTS[:points], dtype=torch.float64)
    v = x.unsqueeze(1) ** torch.arange(taps, dtype=torch.float64)
    inv = torch.linalg.inv(v) if points == taps else None
    return v, inv


@functools.lru_cache(maxsize=1024)
def _toom_matrices(kind: str, grid: tuple[int, ...], taps: tuple[int, ...], dtype, device) -> tuple:
    """Per-dimension matrices of one Toom-Cook transform (``None`` where it is the identity).

    ``evaluate``: ``(grid_d, taps_d)``, coefficients -> values on ``grid``;
    ``extend``: ``(grid_d, taps_d)``, values on the smaller grid ``taps`` -> values on ``grid``;
    ``interpolate``: ``(taps_d, grid_d)`` with ``grid == taps``, values -> coefficients.
    """
    mats = []
    for p, k in zip(grid, taps, strict=True):
        if kind == "evaluate":
            m = _point_matrices64(p, k)[0]
        elif kind == "extend":
            m = _point_matrices64(p, k)[0] @ _point_matrices64(k, k)[1]
        else:
            m = _point_matrices64(p, p)[1]
        identity = m.shape[0] == m.shape[1] and torch.equal(m, torch.eye(m.shape[0], dtype=m.dtype))
        mats.append(None if identity else m.to(dtype=dtype, device=device))
    return tuple(mats)


def _transform(mats: Sequence[torch.Tensor | None], x: torch.Tensor, sizes: Sequence[int], adjoint: bool = False):
    """Apply per-dimension matrices to ``x`` of shape ``(Π sizes, C)`` (row-major over dimensions),
    one dimension at a time: separable and contiguous, several times faster than one Kronecker
    matrix (these products are memory-bound, and BLAS handles the transposed layouts poorly)."""
    shape = list(sizes)
    channels = x.shape[-1]
    for d, m in enumerate(mats):
        if m is None:
            continue
        if adjoint:
            m = m.T
        x = torch.matmul(m, x.reshape(math.prod(shape[:d]), shape[d], math.prod(shape[d + 1 :]) * channels))
        shape[d] = m.shape[0]
    return x.reshape(math.prod(shape), channels)


def _node_taps(tree, shapes) -> tuple[int, ...]:
    if isinstance(tree, int):
        return tuple(shapes[tree][2:])
    a, b = _node_taps(tree[0], shapes), _node_taps(tree[1], shapes)
    return tuple(x + y - 1 for x, y in zip(a, b, strict=True))


def _node_shape(tree, shapes) -> tuple[int, ...]:
    if isinstance(tree, int):
        return tuple(shapes[tree])
    first, second = _node_shape(tree[0], shapes), _node_shape(tree[1], shapes)
    return _composed_shape(first, second)


def _transform_cost(src: Sequence[int], dst: Sequence[int], channels: int) -> int:
    """Multiply-adds of :func:`_transform` from per-dimension sizes ``src`` to ``dst``."""
    sizes, total = list(src), 0
    for d, n in enumerate(dst):
        if n != sizes[d] or n > 1:
            total += math.prod(sizes) // sizes[d] * n * sizes[d] * channels
        sizes[d] = n
    return total


def toom_cost(shapes: tuple[tuple[int, ...], ...], tree) -> int:
    """Multiply-adds of the Toom-Cook composition of ``shapes`` along bracketing ``tree``, forward
    only: per-point channel products plus the (separable) transforms."""

    def cost(node, grid) -> int:
        shape = _node_shape(node, shapes)
        taps = _node_taps(node, shapes)
        moved = grid != taps or isinstance(node, int)  # a leaf is always evaluated; a node maybe extended
        carry = _transform_cost(taps, grid, shape[0] * shape[1]) if moved else 0
        if isinstance(node, int):
            return carry
        a, b = _node_shape(node[0], shapes), _node_shape(node[1], shapes)
        return carry + math.prod(taps) * b[0] * b[1] * a[1] + cost(node[0], taps) + cost(node[1], taps)

    taps = _node_taps(tree, shapes)
    shape = _node_shape(tree, shapes)
    return cost(tree, taps) + _transform_cost(taps, taps, shape[0] * shape[1])


def _vals(tree, weights, groups, grid, saved: dict) -> torch.Tensor:
    """Values ``(Π grid · groups, out/g, in/g)`` of the subchain ``tree`` on ``grid``.

    ``saved`` maps an inner node to its values on its own grid (reused when present, recorded when
    not), and ``("operands", node)`` to its two operands if the key ``"operands"`` is in ``saved``.
    """
    dtype, device = weights[0].dtype, weights[0].device
    if isinstance(tree, int):
        w = weights[tree]
        taps = tuple(w.shape[2:])
        tap_major = w.reshape(w.shape[0] * w.shape[1], -1).T.contiguous()
        vals = _transform(_toom_matrices("evaluate", grid, taps, dtype, device), tap_major, taps)
        return vals.reshape(math.prod(grid) * groups, w.shape[0] // groups, w.shape[1])
    taps = _node_taps(tree, [tuple(w.shape) for w in weights])
    own = saved.get(tree)
    if own is None:
        first = _vals(tree[0], weights, groups, taps, saved)
        second = _vals(tree[1], weights, groups, taps, saved)
        if "operands" in saved:
            saved["operands", tree] = (first, second)
        own = saved[tree] = torch.bmm(second, first)
    if taps == grid:
        return own
    ext = _toom_matrices("extend", grid, taps, dtype, device)
    return _transform(ext, own.reshape(math.prod(taps), -1), taps).reshape(-1, *own.shape[1:])


def _vals_backward(tree, grad, grid, weights, groups, saved, grads) -> None:
    """Adjoint of :func:`_vals`: the gradient of each leaf under ``tree`` into ``grads``."""
    dtype, device = weights[0].dtype, weights[0].device
    points = math.prod(grid)
    if isinstance(tree, int):
        w = weights[tree]
        ev = _toom_matrices("evaluate", grid, tuple(w.shape[2:]), dtype, device)
        tap_major = _transform(ev, grad.reshape(points, -1), grid, adjoint=True)
        grads[tree] = tap_major.T.reshape(w.shape)
        return
    taps = _node_taps(tree, [tuple(w.shape) for w in weights])
    if taps != grid:
        ext = _toom_matrices("extend", grid, taps, dtype, device)
        grad = _transform(ext, grad.reshape(points, -1), grid, adjoint=True).reshape(-1, *grad.shape[1:])
    if ("operands", tree) in saved:
        first, second = saved["operands", tree]
    else:  # recomputed: evaluations of the factors and extensions of the saved inner products
        first = _vals(tree[0], weights, groups, taps, saved)
        second = _vals(tree[1], weights, groups, taps, saved)
    g_first = torch.bmm(second.transpose(1, 2), grad)
    g_second = torch.bmm(grad, first.transpose(1, 2))
    del first, second
    _vals_backward(tree[0], g_first, taps, weights, groups, saved, grads)
    _vals_backward(tree[1], g_second, taps, weights, groups, saved, grads)


class _ToomCompose(torch.autograd.Function):
    """Kernel of a chain by pairwise Toom-Cook, with its own backward (autograd's backward of the
    transforms picks slow transposed layouts). Saves the factors and each inner product's values
    (like the direct composition saves its intermediate kernels); the operands of the per-point
    products are recomputed in the backward unless ``keep_operands``."""

    @staticmethod
    def forward(ctx, tree, groups, keep_operands, *weights):
        shapes = [tuple(w.shape) for w in weights]
        taps = _node_taps(tree, shapes)
        saved: dict = {"operands": True} if keep_operands else {}
        vals = _vals(tree, weights, groups, taps, saved)
        saved.pop("operands", None)
        saved.pop(tree)  # the root's values: the backward needs only its children
        interp = _toom_matrices("interpolate", taps, taps, weights[0].dtype, weights[0].device)
        out = _transform(interp, vals.reshape(math.prod(taps), -1), taps).T
        keys, tensors = [], []
        for key, value in saved.items():
            for t in value if isinstance(value, tuple) else (value,):
                keys.append((key, isinstance(value, tuple)))
                tensors.append(t)
        ctx.tree, ctx.groups, ctx.n, ctx.keys = tree, groups, len(weights), keys
        ctx.save_for_backward(*weights, *tensors)
        return out.reshape(_node_shape(tree, shapes))

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors
        weights = tensors[: ctx.n]
        saved: dict = {}
        for (key, pair), t in zip(ctx.keys, tensors[ctx.n :], strict=True):
            saved[key] = (*saved.get(key, ()), t) if pair else t
        taps = _node_taps(ctx.tree, [tuple(w.shape) for w in weights])
        points = math.prod(taps)
        interp = _toom_matrices("interpolate", taps, taps, weights[0].dtype, weights[0].device)
        g_vals = _transform(interp, grad.reshape(-1, points).T.contiguous(), taps, adjoint=True)
        g_vals = g_vals.reshape(points * ctx.groups, -1, weights[0].shape[1])
        grads: dict = {}
        _vals_backward(ctx.tree, g_vals, taps, weights, ctx.groups, saved, grads)
        return (None, None, None, *(grads.get(j) for j in range(ctx.n)))


def compose_toom(
    weights: Sequence[torch.Tensor], groups: int = 1, order=None, keep_operands: bool = False
) -> torch.Tensor:
    """Kernel of the chain ``weights`` (first to last) by pairwise Toom-Cook; differentiable.

    Same result as :func:`compose_chain` up to rounding (a few 1e-6 relative in float32 for kernels
    up to :data:`TOOM_MAX_TAPS`); ``order`` as there (see :func:`toom_order`). ``keep_operands``
    saves the per-point products' operands for the backward instead of recomputing them: on the
    wide network's last chain ~5-20% faster forward + backward (measured under load), for ~10x the
    saved memory (32 MiB instead of 3 MiB; the direct composition saves ~3 MiB).
    """
    shapes = tuple(tuple(w.shape) for w in weights)
    if order is None:
        order = toom_order(shapes)
    taps = _node_taps(order, shapes)
    if max(taps, default=1) > TOOM_MAX_TAPS:
        raise ValueError(f"Toom-Cook composes kernels of at most {TOOM_MAX_TAPS} taps per dimension, not {taps}")
    if isinstance(order, int):
        return weights[order]
    return _ToomCompose.apply(order, groups, keep_operands, *weights)


def _bracketings(i: int, j: int):
    if i == j:
        yield i
        return
    for s in range(i, j):
        for left in _bracketings(i, s):
            for right in _bracketings(s + 1, j):
                yield (left, right)


@functools.lru_cache(maxsize=1024)
def toom_order(shapes: tuple[tuple[int, ...], ...]):
    """Cheapest bracketing for :func:`compose_toom` (all are tried: chains are short)."""
    if len(shapes) > 8:  # 429 bracketings at 9 factors; nobody chains that many, keep it bounded
        return chain_order(shapes)
    return min(_bracketings(0, len(shapes) - 1), key=lambda t: toom_cost(shapes, t))


#: Composition methods of :func:`compose_chain_fast`.
COMPOSE_METHODS = ("auto", "direct", "toom")
#: Below this many multiply-adds (direct composition, forward) the direct path is as fast or
#: faster: Toom-Cook's transforms, interpolation and per-point batches are extra calls and memory
#: passes. Measured on an idle 2-core CPU, forward + backward, SmallNet 7x7 CK r=4 chains: 0.3-36M
#: MACs ran 0.74-0.98x as fast with Toom-Cook (1 and 2 threads), 203M MACs 1.00-1.09x, 1.6G MACs
#: 1.19-1.60x.
TOOM_MIN_MACS = 100_000_000
#: Toom-Cook must need this many times fewer multiply-adds (transforms included): its transforms
#: are memory-bound. (The wide network's first chain, 3 -> 12 -> 128 -> 32, has a gain of 1.57
#: and ran 0.8-1.0x as fast; its second, 3.1x, ran 1.1-1.9x as fast.)
TOOM_MIN_GAIN = 1.6


def _direct_cost(shapes: tuple[tuple[int, ...], ...], tree) -> tuple[int, tuple[int, ...]]:
    if isinstance(tree, int):
        return 0, shapes[tree]
    (ca, sa), (cb, sb) = _direct_cost(shapes, tree[0]), _direct_cost(shapes, tree[1])
    return ca + cb + composition_cost(sa, sb), _composed_shape(sa, sb)


@functools.lru_cache(maxsize=1024)
def composition_method(shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype = torch.float32) -> str:
    """``"toom"`` or ``"direct"``: which composition :func:`compose_chain_fast` uses for this chain.

    A cost model, fixed by the shapes (so a run's arithmetic does not depend on timing noise):
    Toom-Cook needs two or more factors with taps, a composed kernel of at most
    :data:`TOOM_MAX_TAPS` per dimension, float32/64, and must save enough multiply-adds
    (:data:`TOOM_MIN_MACS`, :data:`TOOM_MIN_GAIN`). Groups do not enter: per-group products are
    tiny, and the grouped direct composition stays as fast (depthwise chains stay direct).
    """
    if dtype not in (torch.float32, torch.float64) or len(shapes) < 2:
        return "direct"
    if sum(1 for s in shapes if _taps(s) > 1) < 2:  # CL chains: the direct path is already per tap
        return "direct"
    taps = [sum(s[2 + d] for s in shapes) - len(shapes) + 1 for d in range(len(shapes[0]) - 2)]
    if max(taps) > TOOM_MAX_TAPS:
        return "direct"
    direct = _direct_cost(shapes, chain_order(shapes))[0]
    toom = toom_cost(shapes, toom_order(shapes))
    return "toom" if direct >= TOOM_MIN_MACS and direct >= TOOM_MIN_GAIN * toom else "direct"


def compose_chain_fast(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    groups: int = 1,
    order=None,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`compose_chain` for training: the kernel by pairwise Toom-Cook (:func:`compose_toom`)
    where :func:`composition_method` (``method="auto"``) says it is faster, else the direct path.

    Float32 kernels differ from :func:`compose_chain` by at most ~5e-6 relative; contraction and
    verification must use :func:`compose_chain`. ``order`` is the direct path's bracketing.
    """
    if method not in COMPOSE_METHODS:
        raise ValueError(f"unknown composition method {method!r}; use one of {', '.join(COMPOSE_METHODS)}")
    shapes = tuple(tuple(w.shape) for w in weights)
    if method == "auto":
        method = composition_method(shapes, weights[0].dtype)
    if method == "direct" or len(weights) < 2:
        return compose_chain(weights, biases, groups, order)
    weight = compose_toom(weights, groups, toom_order(shapes))
    bias = None
    if biases is not None:
        for w, b in zip(weights, biases, strict=True):
            bias = compose_bias(bias, w, b, groups)
    return weight, bias

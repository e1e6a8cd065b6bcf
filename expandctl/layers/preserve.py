"""Function-preserving initialisation of chains (``init="preserve"``).

FC and CL chains have an exact construction (:func:`preserve_exact`); CK chains are fitted by
least squares (:func:`fit_ck`, shared by the conv and the transposed-conv kinds) and refused when
the fit is not exact at the factors' precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..algebra.fit import fit_chain
from ..errors import PreserveFitError
from .base import PRESERVE_TOL

__all__ = ["preserve_exact", "set_biases", "fit_ck", "orthonormal"]


def orthonormal(rows: int, cols: int, groups: int, like: torch.Tensor) -> torch.Tensor:
    """``groups`` random blocks of shape ``(rows, cols)`` with orthonormal columns (rows >= cols)
    or rows (rows < cols), stacked along dim 0: ``(groups * rows, cols)``."""
    g = torch.randn(groups, max(rows, cols), min(rows, cols), dtype=torch.float64)
    q, _ = torch.linalg.qr(g)
    if rows < cols:
        q = q.transpose(1, 2)
    return q.reshape(groups * rows, cols).to(like)


def set_biases(factors: Sequence, bias: torch.Tensor | None) -> None:
    """Zero every factor's bias but the last, which takes ``bias``."""
    if bias is None:
        return
    for f in factors[:-1]:
        if f.bias is not None:
            f.bias.zero_()
    factors[-1].bias.copy_(bias)


@torch.no_grad()
def preserve_exact(factors: Sequence, groups: int, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Three-factor chain ``P3 K P1`` equal to ``weight``: ``P1`` has orthonormal columns, ``P3``
    orthonormal rows (per group), and ``K = P3ᵀ W P1ᵀ`` at every tap, so ``P3 K P1 = W`` exactly
    (needs h1 >= m and h2 >= n, i.e. rate >= 1). Biases: zero, zero, original. ``factors`` are
    modules or anything with a ``weight`` (and ``bias``) tensor."""
    first, mid, last = factors
    g = groups
    h1, m_g = first.weight.shape[:2]
    n, h2_g = last.weight.shape[:2]
    taps = weight.shape[2:]
    p1 = orthonormal(h1 // g, m_g, g, weight).reshape(g, h1 // g, m_g)
    p3 = orthonormal(n // g, h2_g, g, weight).reshape(g, n // g, h2_g)
    w = weight.reshape(g, n // g, m_g, -1)
    k = torch.einsum("gnh,gnmt,gim->ghit", p3, w, p1)  # per tap: P3ᵀ W P1ᵀ
    first.weight.copy_(p1.reshape(first.weight.shape))
    mid.weight.copy_(k.reshape(g * h2_g, h1 // g, *taps).reshape(mid.weight.shape))
    last.weight.copy_(p3.reshape(last.weight.shape))
    set_biases(factors, bias)


@torch.no_grad()
def fit_ck(target: torch.Tensor, weights: Sequence[torch.Tensor], groups: int, what: str) -> tuple[list, float]:
    """Least-squares factors of a CK chain whose composition is ``target`` (conv layout), starting
    from ``weights``; ``(factor weights, relative residual)``. Refused (:class:`PreserveFitError`)
    when the residual is above :data:`PRESERVE_TOL` for the dtype: no exact start at these widths.
    ``what`` names the kernel in the message (e.g. ``"7x7 kernel"``)."""
    result = fit_chain(target, list(weights), groups)
    tol = PRESERVE_TOL.get(target.dtype, 1e-2)
    if result.residual > tol:
        widths = [w.shape[0] for w in weights[:-1]]
        params = sum(w.numel() for w in weights)
        raise PreserveFitError(
            f"init preserve found no exact factorisation of this {what} at widths {widths}: best relative "
            f"residual {result.residual:.2g} > {tol:g} ({params} factor weights for {target.numel()} kernel "
            f"entries); a larger rate (5x5 to 9x9 fit exactly at 4) or init scratch will do",
            option=("init", "rate"),
        )
    return list(result.weights), result.residual
